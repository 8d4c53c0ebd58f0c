//! Mixed precision: one policy ([`Precision`]) and one code path on the CPU and on CUDA.
//!
//! `bf16` and `fp16` turn on libtorch's autocast for the training device with the dtype set
//! explicitly (through the C++ shim, `csrc/amp.cpp`: tch never sets it, and libtorch's CUDA
//! default is float16). Autocast runs matrix products (`linear`, `matmul`, `bmm`, attention) in
//! the half kind and keeps everything else in the kind of its inputs, exactly as
//! `torch.autocast(device, dtype=...)` does; parameters and optimizer state stay in their own
//! kind (fp32 for everything trainable). Backward runs outside autocast, as in PyTorch's recipe.
//!
//! `fp16` also scales the loss ([`LossScaler`], the semantics of `torch.amp.GradScaler`).
//!
//! While autocast is on for the CPU, the fused CPU ops ([`crate::fused`]) step aside
//! ([`autocast_active`]): one of them (the LM head's cross-entropy) holds a matrix product that
//! autocast would run in the half kind, and the composite ops are the code CUDA runs.

mod scaler;

use std::ffi::c_int;

use tch::{Device, Kind};

pub use scaler::{LossScaler, LossScalerConfig, LossScalerState};

use crate::error::{Error, Result};
use crate::ffi;
use crate::ffi::kernels::{vt_amp_cuda_bf16_supported, vt_amp_enter, vt_amp_exit, vt_amp_state};

/// The training precision (`training.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 autocast on CUDA devices that compute bf16 natively (compute capability 8.0+), fp32
    /// everywhere else (the CPU, older GPUs).
    #[default]
    Auto,
    /// Everything in fp32.
    Fp32,
    /// bf16 autocast on the training device, CPU or CUDA. On CPUs without bf16 instructions
    /// (no AVX512-BF16/AMX) matrix products run about 200x slower than fp32: allowed, but slow.
    Bf16,
    /// fp16 autocast with dynamic loss scaling ([`LossScaler`]).
    Fp16,
}

impl Precision {
    /// The autocast kind on `device`: `None` for fp32.
    pub fn autocast_kind(self, device: Device) -> Option<Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
            Precision::Auto => {
                (device.is_cuda() && cuda_bf16_supported()).then_some(Kind::BFloat16)
            }
        }
    }

    /// Whether the loss is scaled ([`LossScaler`]): fp16 only, as with `torch.amp.GradScaler`
    /// (bf16 has fp32's exponent range and needs none).
    pub fn loss_scaling(self, device: Device) -> bool {
        self.autocast_kind(device) == Some(Kind::Half)
    }
}

/// Whether the current CUDA device computes bf16 natively (compute capability 8.0 or newer;
/// `torch.cuda.is_bf16_supported(including_emulation=False)`). `false` without CUDA.
pub fn cuda_bf16_supported() -> bool {
    if !tch::Cuda::is_available() {
        return false;
    }
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { vt_amp_cuda_bf16_supported() != 0 }
}

fn device_code(device: Device) -> Result<c_int> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(Error::Unsupported {
            what: "autocast".into(),
            msg: format!("unsupported device {other:?} (CPU and CUDA only)"),
        }),
    }
}

fn kind_code(kind: Kind) -> Result<c_int> {
    match kind {
        Kind::Half => Ok(0),
        Kind::BFloat16 => Ok(1),
        other => Err(Error::Unsupported {
            what: "autocast".into(),
            msg: format!("dtype must be float16 or bfloat16, got {other:?}"),
        }),
    }
}

/// An autocast setting: which device type and which half kind (`None`: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autocast {
    /// The device type whose autocast state is set (CPU or CUDA).
    pub device: Device,
    /// The half kind eligible ops run in (`Half` or `BFloat16`); `None`: autocast off.
    pub kind: Option<Kind>,
}

impl Autocast {
    /// `precision` resolved for `device`.
    pub fn new(precision: Precision, device: Device) -> Self {
        Autocast {
            device,
            kind: precision.autocast_kind(device),
        }
    }

    /// Autocast off (fp32).
    pub fn off(device: Device) -> Self {
        Autocast { device, kind: None }
    }

    /// Runs `f` inside the autocast region (`with torch.autocast(device_type, dtype=kind):`),
    /// or plainly when off. The previous state comes back when `f` returns, whatever it returns.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(kind) = self.kind else {
            return f();
        };
        let _region = Region::enter(self.device, kind)?;
        f()
    }
}

/// An entered autocast region; leaving it (drop) restores the previous state.
struct Region {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Region {
    fn enter(device: Device, kind: Kind) -> Result<Self> {
        let (d, k) = (device_code(device)?, kind_code(kind)?);
        let (mut prev_enabled, mut prev_dtype) = (0, -1);
        // SAFETY: plain values and out-pointers that outlive the call.
        ffi::kernel("autocast enter", |err| unsafe {
            vt_amp_enter(d, k, 1, &mut prev_enabled, &mut prev_dtype, err)
        })?;
        Ok(Region {
            device: d,
            prev_enabled,
            prev_dtype,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: plain values; the shim catches every exception.
        let r = ffi::call("autocast exit", |err| unsafe {
            vt_amp_exit(self.device, self.prev_enabled, self.prev_dtype, err)
        });
        if let Err(e) = r {
            tracing::error!("{e}");
        }
    }
}

/// Whether autocast is on for `device`'s type, and its kind.
pub fn autocast_state(device: Device) -> Result<Option<Kind>> {
    let d = device_code(device)?;
    let (mut on, mut k) = (0, -1);
    // SAFETY: out-pointers that outlive the call.
    ffi::kernel("autocast state", |err| unsafe {
        vt_amp_state(d, &mut on, &mut k, err)
    })?;
    Ok((on != 0).then_some(match k {
        0 => Kind::Half,
        1 => Kind::BFloat16,
        _ => Kind::Float,
    }))
}

/// Whether autocast is on for `device`'s type (false when it cannot be read).
pub fn autocast_active(device: Device) -> bool {
    matches!(autocast_state(device), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_region_sets_dtype_and_restores() {
        assert_eq!(autocast_state(Device::Cpu).unwrap(), None);
        let a = Autocast {
            device: Device::Cpu,
            kind: Some(Kind::Half),
        };
        a.run(|| {
            assert_eq!(autocast_state(Device::Cpu)?, Some(Kind::Half));
            let x = tch::Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
            let w = tch::Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
            assert_eq!(x.linear::<&tch::Tensor>(&w, None).kind(), Kind::Half);
            // elementwise ops keep their inputs' kind
            assert_eq!((&x * 2.0).kind(), Kind::Float);
            Autocast {
                device: Device::Cpu,
                kind: Some(Kind::BFloat16),
            }
            .run(|| {
                assert_eq!(autocast_state(Device::Cpu)?, Some(Kind::BFloat16));
                Ok(())
            })?;
            assert_eq!(autocast_state(Device::Cpu)?, Some(Kind::Half));
            Ok(())
        })
        .unwrap();
        assert_eq!(autocast_state(Device::Cpu).unwrap(), None);
        // an error inside leaves the state as it was
        let r: Result<()> = a.run(|| Err(Error::invalid("boom")));
        assert!(r.is_err());
        assert_eq!(autocast_state(Device::Cpu).unwrap(), None);
    }

    #[test]
    fn policy_resolution() {
        assert_eq!(Precision::Auto.autocast_kind(Device::Cpu), None);
        assert_eq!(Precision::Fp32.autocast_kind(Device::Cpu), None);
        assert_eq!(
            Precision::Bf16.autocast_kind(Device::Cpu),
            Some(Kind::BFloat16)
        );
        assert_eq!(Precision::Fp16.autocast_kind(Device::Cpu), Some(Kind::Half));
        assert!(Precision::Fp16.loss_scaling(Device::Cpu));
        assert!(!Precision::Bf16.loss_scaling(Device::Cpu));
    }
}
