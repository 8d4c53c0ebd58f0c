//! What `volttrain env` reports (what `python -m torch.utils.collect_env` is to PyTorch): the
//! VoltTrain and libtorch versions and where libtorch was loaded from, the CUDA devices with
//! their name, compute capability and memory, bf16 and FP8 support, the distributed backends
//! compiled in (and why NCCL is not, when it is not), the fused CPU kernels and the thread
//! count.
//!
//! [`cuda_peak_allocated`] and [`reset_cuda_peak`] read libtorch's CUDA allocator statistics,
//! for hosts that report peak device memory (the GPU benchmark does).
//!
//! GPU names, capabilities and memory come from the CUDA driver API (`libcuda.so.1`, loaded at
//! run time), which needs no CUDA headers at build time and allocates nothing on the devices.

use std::ffi::{c_char, c_int};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CudaDevice {
    /// The index libtorch uses (`cuda:N`).
    pub index: usize,
    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Compute capability, e.g. `[9, 0]` for Hopper.
    pub capability: [i32; 2],
    /// Total device memory in bytes.
    pub total_memory_bytes: u64,
    /// bf16 tensor-core math: compute capability 8.0 (Ampere) or newer.
    pub bf16: bool,
    /// FP8 products through libtorch's `_scaled_mm` (capability 8.9+), probed on the device.
    pub fp8: bool,
}

/// The report; `volttrain env --json` prints it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvReport {
    /// This crate's version.
    pub volttrain_version: String,
    /// The libtorch VoltTrain is built for (tch's pin).
    pub libtorch_version: String,
    /// The torch build actually loaded (its `version.py`, e.g. `2.11.0+cu130`), when found.
    pub libtorch_loaded_version: Option<String>,
    /// The directory `libtorch_cpu.so` was loaded from.
    pub libtorch_path: Option<String>,
    /// libtorch sees a CUDA device.
    pub cuda_available: bool,
    /// CUDA devices libtorch sees.
    pub cuda_device_count: usize,
    /// Why the device details are missing, when libtorch sees GPUs but the driver API could
    /// not be asked.
    pub cuda_error: Option<String>,
    /// The CUDA devices, as the driver describes them.
    pub cuda_devices: Vec<CudaDevice>,
    /// libtorch can use cuDNN.
    pub cudnn_available: bool,
    /// The CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16); without them bf16 on the
    /// CPU is emulated and slow, so CPU training runs in fp32.
    pub cpu_bf16_native: bool,
    /// FP8 on the CPU is always emulated (fp32 products of FP8-rounded values).
    pub cpu_fp8: String,
    /// The c10d backends compiled in, e.g. `["gloo", "nccl"]`.
    pub distributed_backends: Vec<String>,
    /// How the build went for NCCL: `compiled`, or `not compiled: <why>`.
    pub nccl_build: String,
    /// How the build went for Gloo (the CPU ranks' backend): `compiled`, or
    /// `not compiled: <why>`.
    pub gloo_build: String,
    /// The fused CPU kernels (`crate::fused`) are in use.
    pub fused_cpu_kernels: bool,
    /// libtorch's intra-op threads in this process.
    pub threads: i32,
    /// Cores this process may use.
    pub cpu_cores: usize,
    /// `OMP_NUM_THREADS`, when set.
    pub omp_num_threads: Option<String>,
}

impl EnvReport {
    /// Collects the report. Touches each GPU only to probe FP8 (a 16x16 product).
    pub fn collect() -> EnvReport {
        let cuda_count = tch::Cuda::device_count().max(0) as usize;
        let (cuda_devices, cuda_error) = if cuda_count == 0 {
            (Vec::new(), None)
        } else {
            match driver_devices() {
                Ok(v) => (v, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            }
        };
        let libtorch_path = loaded_library_dir("libtorch_cpu.so");
        let libtorch_loaded_version = libtorch_path
            .as_deref()
            .and_then(|lib| torch_version_py(Path::new(lib)));
        EnvReport {
            volttrain_version: env!("CARGO_PKG_VERSION").to_string(),
            libtorch_version: crate::LIBTORCH_VERSION.to_string(),
            libtorch_loaded_version,
            libtorch_path,
            cuda_available: tch::Cuda::is_available(),
            cuda_device_count: cuda_count,
            cuda_error,
            cuda_devices,
            cudnn_available: tch::Cuda::cudnn_is_available(),
            cpu_bf16_native: cpu_flags()
                .iter()
                .any(|f| f == "avx512_bf16" || f == "amx_bf16"),
            cpu_fp8: "emulated".into(),
            distributed_backends: crate::dist::compiled_backends()
                .into_iter()
                .map(|b| b.name().to_string())
                .collect(),
            nccl_build: crate::dist::nccl_build_status().to_string(),
            gloo_build: crate::dist::gloo_build_status().to_string(),
            fused_cpu_kernels: crate::fused::enabled(),
            threads: tch::get_num_threads(),
            cpu_cores: crate::dist::available_cores(),
            omp_num_threads: std::env::var("OMP_NUM_THREADS").ok(),
        }
    }

    /// The JSON form (`volttrain env --json`).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Internal(format!("env report: {e}")))
    }

    /// The text form (`volttrain env`).
    pub fn to_text(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<24}{v}\n"));
        line("VoltTrain", self.volttrain_version.clone());
        line(
            "libtorch",
            format!(
                "{} (loaded: {})",
                self.libtorch_version,
                self.libtorch_loaded_version.as_deref().unwrap_or("unknown")
            ),
        );
        line(
            "libtorch path",
            self.libtorch_path
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        );
        line(
            "CUDA available",
            format!(
                "{} ({} device(s))",
                yn(self.cuda_available),
                self.cuda_device_count
            ),
        );
        for d in &self.cuda_devices {
            line(
                &format!("  cuda:{}", d.index),
                format!(
                    "{}, capability {}.{}, {:.1} GiB, bf16 {}, fp8 {}",
                    d.name,
                    d.capability[0],
                    d.capability[1],
                    d.total_memory_bytes as f64 / (1u64 << 30) as f64,
                    yn(d.bf16),
                    yn(d.fp8)
                ),
            );
        }
        if let Some(e) = &self.cuda_error {
            line("  device details", format!("unavailable: {e}"));
        }
        line("cuDNN", yn(self.cudnn_available).into());
        line(
            "CPU bf16",
            if self.cpu_bf16_native {
                "native".into()
            } else {
                "emulated (CPU training runs in fp32)".into()
            },
        );
        line("CPU fp8", self.cpu_fp8.clone());
        line("distributed backends", self.distributed_backends.join(", "));
        line("NCCL build", self.nccl_build.clone());
        line("Gloo build", self.gloo_build.clone());
        line("fused CPU kernels", yn(self.fused_cpu_kernels).into());
        line(
            "threads",
            format!(
                "{} intra-op, {} core(s), OMP_NUM_THREADS={}",
                self.threads,
                self.cpu_cores,
                self.omp_num_threads.as_deref().unwrap_or("unset")
            ),
        );
        s
    }
}

/// The directory of a shared library mapped into this process (from `/proc/self/maps`).
fn loaded_library_dir(file: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|n| n == file))
        .and_then(|p| Path::new(p).parent().map(|d| d.display().to_string()))
}

/// `__version__` from the `version.py` next to a torch wheel's `lib/`.
fn torch_version_py(lib: &Path) -> Option<String> {
    let py: PathBuf = lib.parent()?.join("version.py");
    let text = std::fs::read_to_string(py).ok()?;
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("__version__")?;
        let v = rest.trim_start().strip_prefix('=')?.trim();
        let v = v.split('#').next()?.trim();
        Some(v.trim_matches(|c| c == '\'' || c == '"').to_string())
    })
}

fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// The CUDA devices through the driver API.
fn driver_devices() -> Result<Vec<CudaDevice>> {
    type Init = unsafe extern "C" fn(u32) -> c_int;
    type Count = unsafe extern "C" fn(*mut c_int) -> c_int;
    type Name = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type Attr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    type Mem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR (cuda.h).
    const CC_MAJOR: c_int = 75;
    const CC_MINOR: c_int = 76;
    let err = |what: &str, rc: c_int| Error::Unsupported {
        what: "CUDA".into(),
        msg: format!("CUDA driver {what} returned {rc}"),
    };
    // SAFETY: libcuda.so.1 is the CUDA driver library; loading it runs no user code. It stays
    // loaded for the process (libtorch has it loaded already when CUDA is available).
    let lib =
        unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| Error::Unsupported {
            what: "CUDA".into(),
            msg: format!("cannot load libcuda.so.1: {e}"),
        })?;
    // SAFETY: the symbol types are the driver API's C signatures (cuda.h), unchanged since
    // CUDA 3.2 (`cuDeviceTotalMem_v2`).
    let (init, count, name, attr, mem) = unsafe {
        let sym = |n: &[u8]| Error::Unsupported {
            what: "CUDA".into(),
            msg: format!(
                "libcuda.so.1 has no {}",
                String::from_utf8_lossy(&n[..n.len() - 1])
            ),
        };
        (
            *lib.get::<Init>(b"cuInit\0").map_err(|_| sym(b"cuInit\0"))?,
            *lib.get::<Count>(b"cuDeviceGetCount\0")
                .map_err(|_| sym(b"cuDeviceGetCount\0"))?,
            *lib.get::<Name>(b"cuDeviceGetName\0")
                .map_err(|_| sym(b"cuDeviceGetName\0"))?,
            *lib.get::<Attr>(b"cuDeviceGetAttribute\0")
                .map_err(|_| sym(b"cuDeviceGetAttribute\0"))?,
            *lib.get::<Mem>(b"cuDeviceTotalMem_v2\0")
                .map_err(|_| sym(b"cuDeviceTotalMem_v2\0"))?,
        )
    };
    let mut out = Vec::new();
    // SAFETY: plain driver calls with out-pointers to live locals and a sized name buffer.
    unsafe {
        let rc = init(0);
        if rc != 0 {
            return Err(err("cuInit", rc));
        }
        let mut n: c_int = 0;
        let rc = count(&mut n);
        if rc != 0 {
            return Err(err("cuDeviceGetCount", rc));
        }
        for i in 0..n {
            let mut buf = [0 as c_char; 256];
            let rc = name(buf.as_mut_ptr(), buf.len() as c_int, i);
            if rc != 0 {
                return Err(err("cuDeviceGetName", rc));
            }
            let dev_name = std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            let (mut major, mut minor) = (0, 0);
            let rc = attr(&mut major, CC_MAJOR, i);
            if rc != 0 {
                return Err(err("cuDeviceGetAttribute", rc));
            }
            let rc = attr(&mut minor, CC_MINOR, i);
            if rc != 0 {
                return Err(err("cuDeviceGetAttribute", rc));
            }
            let mut bytes: usize = 0;
            let rc = mem(&mut bytes, i);
            if rc != 0 {
                return Err(err("cuDeviceTotalMem_v2", rc));
            }
            let index = i as usize;
            out.push(CudaDevice {
                index,
                name: dev_name,
                capability: [major, minor],
                total_memory_bytes: bytes as u64,
                bf16: major >= 8,
                fp8: crate::quant::fp8::fp8_kernels_available(tch::Device::Cuda(index)),
            });
        }
    }
    std::mem::forget(lib);
    Ok(out)
}

/// CUDA caching-allocator statistics, from the C++ shim (`csrc/cuda_stats.cpp`): compiled in
/// with the CUDA host headers (the builds that have NCCL), reporting "not available" otherwise.
mod cuda_stats {
    use std::ffi::c_int;

    unsafe extern "C" {
        pub(super) fn vt_cuda_stats_compiled() -> c_int;
        pub(super) fn vt_cuda_peak_allocated(device: c_int) -> i64;
        pub(super) fn vt_cuda_reset_peak(device: c_int) -> c_int;
    }
}

/// Whether [`cuda_peak_allocated`] and [`reset_cuda_peak`] are compiled into this build.
pub fn cuda_memory_stats_available() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { cuda_stats::vt_cuda_stats_compiled() == 1 }
}

/// Peak bytes allocated on CUDA device `index` by libtorch's caching allocator since the process
/// start or the last [`reset_cuda_peak`] (`torch.cuda.max_memory_allocated`); `None` when the
/// statistics are not compiled in or the allocator cannot answer.
pub fn cuda_peak_allocated(index: usize) -> Option<u64> {
    let device = c_int::try_from(index).ok()?;
    // SAFETY: plain call; the shim catches every C++ exception and reports -1.
    let v = unsafe { cuda_stats::vt_cuda_peak_allocated(device) };
    u64::try_from(v).ok()
}

/// Restarts [`cuda_peak_allocated`] of device `index` from what is allocated now
/// (`torch.cuda.reset_peak_memory_stats`); `false` when not available.
pub fn reset_cuda_peak(index: usize) -> bool {
    let Ok(device) = c_int::try_from(index) else {
        return false;
    };
    // SAFETY: plain call; the shim catches every C++ exception and reports -1.
    unsafe { cuda_stats::vt_cuda_reset_peak(device) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_py_is_parsed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib")).unwrap();
        std::fs::write(
            d.path().join("version.py"),
            "from typing import Optional\n__version__ = '2.11.0+cu130'\ncuda = '13.0'\n",
        )
        .unwrap();
        assert_eq!(
            torch_version_py(&d.path().join("lib")).as_deref(),
            Some("2.11.0+cu130")
        );
    }

    /// Peak CUDA memory reads as "not available" where there is no device to read, and a reset
    /// succeeds exactly where the statistics can be read.
    #[test]
    fn cuda_peak_memory() {
        if !tch::Cuda::is_available() {
            assert_eq!(cuda_peak_allocated(0), None);
            assert!(!reset_cuda_peak(0));
            return;
        }
        if !cuda_memory_stats_available() {
            assert_eq!(cuda_peak_allocated(0), None);
            return;
        }
        assert!(reset_cuda_peak(0));
        let before = cuda_peak_allocated(0).unwrap();
        let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
        let peak = cuda_peak_allocated(0).unwrap();
        drop(t);
        assert!(peak >= before + (4 << 20), "peak {peak}, before {before}");
    }
}
