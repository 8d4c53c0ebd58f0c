//! Multi-process data parallel on PyTorch's c10d.
//!
//! A small C++ shim (`csrc/dist_shim.cpp`, built by `build.rs`) drives libtorch's own
//! `TCPStore` (rank 0 serves the rendezvous), `ProcessGroupGloo` (CPU ranks) and
//! `ProcessGroupNCCL` (CUDA ranks). Both backends are compiled in every provisioned build; a
//! build without gloo's or NCCL's headers leaves that backend out and says why
//! ([`gloo_build_status`], [`nccl_build_status`]), so a CPU-only single-process build needs
//! neither.
//! On top of it:
//!
//! - [`DistEnv`]: rank, world size and rendezvous address from the `torchrun`-style environment
//!   (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or from SLURM.
//! - [`ProcessGroup`]: all-reduce (sum), broadcast and barrier on tch tensors, every C++ failure
//!   (a dead peer, a timeout) returned as [`Error::Dist`] with the C++ message.
//! - [`GradSync`]: gradient averaging in per-dtype flat buckets; [`broadcast_params`].
//! - [`shard_indices`]: the per-rank index shard of `torch.utils.data.DistributedSampler`,
//!   permutation included.
//! - [`launch::spawn_workers`]: one child process per rank on this machine.
//! - [`select_device`], [`backend_for`], [`staging_device`]: which device and backend a rank
//!   uses and where each collective's tensors live; [`apply_rank_threads`]: ranks on one machine
//!   share its cores.
//!
//! ```no_run
//! use volttrain::dist::{DistConfig, DistEnv, ProcessGroup};
//! # fn main() -> volttrain::Result<()> {
//! if let Some(env) = DistEnv::from_env()? {
//!     let pg = ProcessGroup::new(&env, &DistConfig::default())?;
//!     let mut t = [tch::Tensor::from_slice(&[pg.rank() as f32])];
//!     pg.all_reduce_sum(&mut t)?;
//! }
//! # Ok(())
//! # }
//! ```

mod device;
mod grad_sync;
pub mod launch;
mod sampler;
mod threads;

use std::ffi::{CString, c_char, c_int};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};
use crate::ffi::dist as ffi;

pub use device::{backend_for, check_collective_devices, select_device, staging_device};
pub use grad_sync::{GradSync, broadcast_params};
pub use launch::init_from_env;
pub use sampler::{Mt19937, shard_indices, torch_randperm};
pub use threads::{
    ThreadSource, apply_rank_threads, available_cores, local_ranks_from_env, rank_threads,
};

/// Which c10d backend carries the collectives ([`backend_for`] picks one by device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Gloo over TCP: CPU tensors (the default for CPU ranks).
    #[default]
    Gloo,
    /// NCCL: CUDA tensors (the default for CUDA ranks); only in builds compiled with NCCL
    /// ([`nccl_available`]).
    Nccl,
}

impl Backend {
    /// The lowercase name (`gloo`, `nccl`), as in the config.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl Backend {
    fn code(self) -> c_int {
        match self {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        }
    }
}

/// Whether this build of VoltTrain was compiled with Gloo support (the backend of CPU ranks;
/// left out when gloo's headers were missing at build time, see [`gloo_build_status`]).
pub fn gloo_available() -> bool {
    ffi::has_gloo()
}

/// How the build went for Gloo: `compiled`, or `not compiled: <why>` (what build.rs found
/// missing and how to fix it).
pub fn gloo_build_status() -> &'static str {
    env!("VOLTTRAIN_GLOO_BUILD")
}

/// Whether this build of VoltTrain was compiled with NCCL support.
pub fn nccl_available() -> bool {
    ffi::has_nccl()
}

/// How the build went for NCCL: `compiled`, or `not compiled: <why>` (what build.rs found
/// missing and how to fix it). `volttrain env` prints it.
pub fn nccl_build_status() -> &'static str {
    env!("VOLTTRAIN_NCCL_BUILD")
}

/// The c10d backends compiled into this build, in order (`["gloo"]` or `["gloo", "nccl"]` in
/// every provisioned build).
pub fn compiled_backends() -> Vec<Backend> {
    let mut v = Vec::new();
    if gloo_available() {
        v.push(Backend::Gloo);
    }
    if nccl_available() {
        v.push(Backend::Nccl);
    }
    v
}

/// Settings of the distributed run (the `distributed:` section of a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// Collective backend. Default by device ([`backend_for`]): `nccl` for CUDA ranks, `gloo`
    /// for CPU ranks (DDP's usual choice).
    pub backend: Option<Backend>,
    /// Rendezvous address used when `MASTER_ADDR` is not set. Default none (then required from
    /// the environment when the world size is above 1; `127.0.0.1` for a single process).
    pub master_addr: Option<String>,
    /// Rendezvous port used when `MASTER_PORT` is not set. Default none (then 29500, torch's
    /// `TCPStoreOptions::kDefaultPort`).
    pub master_port: Option<u16>,
    /// Seconds a rendezvous or a collective may wait for its peers before the job fails.
    /// Default 1800, torch's `default_pg_timeout` (`torch/distributed/constants.py`).
    pub timeout_secs: u64,
    /// Size of a gradient bucket in MB. Default 25, DDP's `bucket_cap_mb`.
    pub bucket_mb: f64,
    /// Network interface for Gloo (like `GLOO_SOCKET_IFNAME`, which is read when this is
    /// unset). Default none: bind to `127.0.0.1` when the master is loopback, else Gloo's
    /// default device (this host's name).
    pub gloo_socket_ifname: Option<String>,
    /// Gloo worker threads. Default 2, `ProcessGroupGloo::Options::threads`.
    pub gloo_threads: u32,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: None,
            master_addr: None,
            master_port: None,
            timeout_secs: 1800,
            bucket_mb: 25.0,
            gloo_socket_ifname: None,
            gloo_threads: 2,
        }
    }
}

impl DistConfig {
    /// Checks the values, naming the bad key.
    pub fn validate(&self) -> Result<()> {
        if self.timeout_secs == 0 {
            return Err(Error::config(
                "distributed.timeout_secs",
                "must be > 0 (seconds a collective waits for its peers)",
            ));
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return Err(Error::config(
                "distributed.bucket_mb",
                format!("must be a positive number of MB, got {}", self.bucket_mb),
            ));
        }
        if self.gloo_threads == 0 {
            return Err(Error::config("distributed.gloo_threads", "must be >= 1"));
        }
        if self.master_port == Some(0) {
            return Err(Error::config(
                "distributed.master_port",
                "must be 1..=65535",
            ));
        }
        Ok(())
    }
}

/// Where this process sits in the job, read from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank on this machine (selects the GPU).
    pub local_rank: usize,
    /// Rendezvous host (`MASTER_ADDR`), if set.
    pub master_addr: Option<String>,
    /// Rendezvous port (`MASTER_PORT`), if set.
    pub master_port: Option<u16>,
}

impl DistEnv {
    /// A single process (rank 0 of 1) rendezvousing on `127.0.0.1:port`.
    pub fn single(port: u16) -> Self {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
        }
    }

    /// The CUDA device of this rank when `training.gpu_devices` lists the devices of this
    /// machine: `gpu_devices[local_rank]` (all of them, in order, when the list is empty).
    pub fn cuda_device(&self, gpu_devices: &[usize]) -> Result<tch::Device> {
        if gpu_devices.is_empty() {
            return Ok(tch::Device::Cuda(self.local_rank));
        }
        gpu_devices
            .get(self.local_rank)
            .map(|&d| tch::Device::Cuda(d))
            .ok_or_else(|| {
                Error::config(
                    "training.gpu_devices",
                    format!(
                        "lists {} device(s) but this process has LOCAL_RANK {}; start one process \
                         per listed device",
                        gpu_devices.len(),
                        self.local_rank
                    ),
                )
            })
    }

    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (torchrun,
    /// [`launch::spawn_workers`]), falling back to SLURM's `SLURM_PROCID`, `SLURM_NTASKS`,
    /// `SLURM_LOCALID`. `Ok(None)` when neither `RANK`/`WORLD_SIZE` nor SLURM's variables are
    /// set: not a distributed run.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests, embedding hosts).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let (rank_key, world_key, local_key) =
            if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
                ("RANK", "WORLD_SIZE", "LOCAL_RANK")
            } else if get("SLURM_PROCID").is_some() || get("SLURM_NTASKS").is_some() {
                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
            } else {
                return Ok(None);
            };
        let parse = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::config(
                        format!("env {k}"),
                        format!("must be a non-negative integer, got `{v}`"),
                    )
                }),
            }
        };
        let need = |k: &str, other: &str| -> Result<usize> {
            parse(k)?.ok_or_else(|| {
                Error::config(
                    format!("env {k}"),
                    format!("is not set but {other} is; a launcher must set both"),
                )
            })
        };
        let rank = need(rank_key, world_key)?;
        let world_size = need(world_key, rank_key)?;
        if world_size == 0 {
            return Err(Error::config(format!("env {world_key}"), "must be >= 1"));
        }
        if rank >= world_size {
            return Err(Error::config(
                format!("env {rank_key}"),
                format!("{rank} is not below {world_key}={world_size}"),
            ));
        }
        let local_rank = parse(local_key)?.unwrap_or(rank);
        let master_port = match get("MASTER_PORT") {
            None => None,
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    return Err(Error::config(
                        "env MASTER_PORT",
                        format!("must be a port number 1..=65535, got `{v}`"),
                    ));
                }
            },
        };
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").map(|s| s.trim().to_string()),
            master_port,
        }))
    }
}

/// A c10d process group: one per process, all ranks calling the same collectives in the same
/// order. Dropping it shuts the backend down.
pub struct ProcessGroup {
    raw: NonNull<ffi::VtPg>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    /// Where scalar helpers ([`ProcessGroup::all_reduce_mean`]) stage their tensors.
    device: tch::Device,
}

// SAFETY: the shim's handle owns c10d objects that are used from one thread at a time (the
// group is not `Sync`); c10d process groups may be moved between threads.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("backend", &self.backend)
            .finish()
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{what} `{s}` contains a NUL byte")))
}

impl ProcessGroup {
    /// Rendezvous with the other ranks and build the backend. Rank 0 serves the TCP store on
    /// `MASTER_ADDR:MASTER_PORT`; every rank waits at most `cfg.timeout_secs` for the others.
    /// The rank computes on the CPU, or on `cuda:LOCAL_RANK` when `cfg.backend` is `nccl`; see
    /// [`ProcessGroup::on_device`] for a rank on a chosen device.
    pub fn new(env: &DistEnv, cfg: &DistConfig) -> Result<Self> {
        let device = match cfg.backend {
            Some(Backend::Nccl) => tch::Device::Cuda(env.local_rank),
            _ => tch::Device::Cpu,
        };
        Self::on_device(env, cfg, device)
    }

    /// [`ProcessGroup::new`] for a rank computing on `device`: the backend is
    /// `cfg.backend`, else [`backend_for`] the device (NCCL on CUDA, Gloo on the CPU), and the
    /// group's own tensors are staged on [`staging_device`].
    pub fn on_device(env: &DistEnv, cfg: &DistConfig, device: tch::Device) -> Result<Self> {
        cfg.validate()?;
        let backend = backend_for(cfg.backend, device);
        let staging = staging_device(backend, device)?;
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(Error::Dist(format!(
                "rank {} is outside world size {}",
                env.rank, env.world_size
            )));
        }
        if backend == Backend::Gloo && !gloo_available() {
            return Err(Error::config(
                "distributed.backend",
                format!(
                    "gloo (the default for CPU ranks) is not compiled into this build ({}); \
                     rebuild after tools/provision.sh (it installs libgloo-dev)",
                    gloo_build_status()
                ),
            ));
        }
        if backend == Backend::Nccl && !nccl_available() {
            return Err(Error::config(
                "distributed.backend",
                format!(
                    "nccl (the default for CUDA ranks) is not compiled into this build ({}); \
                     rebuild after tools/provision.sh, or set distributed.backend: gloo",
                    nccl_build_status()
                ),
            ));
        }
        let addr = env
            .master_addr
            .clone()
            .or_else(|| cfg.master_addr.clone())
            .or_else(|| (env.world_size == 1).then(|| "127.0.0.1".to_string()))
            .ok_or_else(|| {
                Error::config(
                    "env MASTER_ADDR",
                    "is not set (nor distributed.master_addr); set it to rank 0's host",
                )
            })?;
        let port = env.master_port.or(cfg.master_port).unwrap_or(29500);
        let iface = cfg
            .gloo_socket_ifname
            .clone()
            .or_else(|| std::env::var("GLOO_SOCKET_IFNAME").ok())
            .unwrap_or_default();
        let loopback = addr == "localhost"
            || addr
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
        let host = if iface.is_empty() && loopback {
            "127.0.0.1"
        } else {
            ""
        };
        let c_addr = cstring("MASTER_ADDR", &addr)?;
        let c_iface = cstring("gloo_socket_ifname", &iface)?;
        let c_host = cstring("host", host)?;
        let c_prefix = cstring("prefix", "volttrain")?;
        let rank = c_int::try_from(env.rank)
            .map_err(|_| Error::Dist(format!("rank {} is too large", env.rank)))?;
        let world = c_int::try_from(env.world_size)
            .map_err(|_| Error::Dist(format!("world size {} is too large", env.world_size)))?;
        let timeout_ms = i64::try_from(cfg.timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let threads = c_int::try_from(cfg.gloo_threads).unwrap_or(c_int::MAX);
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: all strings outlive the call; `err` receives a shim string on failure.
        let raw = unsafe {
            ffi::vt_dist_pg_new(
                backend.code(),
                c_addr.as_ptr(),
                port,
                rank,
                world,
                timeout_ms,
                c_iface.as_ptr(),
                c_host.as_ptr(),
                c_prefix.as_ptr(),
                threads,
                &mut err,
            )
        };
        match NonNull::new(raw) {
            Some(raw) => Ok(ProcessGroup {
                raw,
                rank: env.rank,
                world_size: env.world_size,
                backend,
                device: staging,
            }),
            None => {
                // SAFETY: on a null handle the shim set `err` (or left it null).
                let e = match unsafe { ffi::take_err(err, "creating the process group") } {
                    Error::Dist(m) => m,
                    other => other.to_string(),
                };
                Err(Error::Dist(format!(
                    "rank {} of {} at {addr}:{port}: {e}",
                    env.rank, env.world_size
                )))
            }
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Sets the device this rank computes on (NCCL: its GPU, e.g. from
    /// [`DistEnv::cuda_device`]); helpers that make their own tensors put them there. Defaults
    /// to the CPU for Gloo and `cuda:LOCAL_RANK` for NCCL.
    pub fn with_device(mut self, device: tch::Device) -> Self {
        self.device = device;
        self
    }

    /// The device set by [`ProcessGroup::with_device`].
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Whether this is rank 0 (the one that saves checkpoints and writes logs).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn check_tensors(&self, op: &str, tensors: &[Tensor]) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            if !t.defined() {
                return Err(Error::Shape {
                    op: op.to_string(),
                    msg: format!("tensor {i} is undefined"),
                });
            }
            if !t.is_contiguous() {
                return Err(Error::Shape {
                    op: op.to_string(),
                    msg: format!(
                        "tensor {i} (shape {:?}) is not contiguous; call .contiguous() first",
                        t.size()
                    ),
                });
            }
            if self.backend == Backend::Nccl && t.device() == tch::Device::Cpu {
                return Err(Error::Unsupported {
                    what: op.to_string(),
                    msg: format!("tensor {i} is on the CPU but the backend is nccl"),
                });
            }
        }
        Ok(())
    }

    /// Sums each tensor over all ranks, in place (one collective per tensor, issued together).
    /// Tensors must be contiguous and the same shape and dtype on every rank. Run it with
    /// autograd off when a tensor is a parameter.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.check_tensors("all_reduce", tensors)?;
        if tensors.is_empty() {
            return Ok(());
        }
        let ptrs = ffi::tensor_ptrs(tensors);
        ffi::check("all_reduce", |err| {
            // SAFETY: `ptrs` point at tensors borrowed mutably for the call; the handle is live.
            unsafe {
                ffi::vt_dist_all_reduce_sum(self.raw.as_ptr(), ptrs.as_ptr(), ptrs.len(), err)
            }
        })
        .map_err(|e| self.tag(e))
    }

    /// Copies each tensor of rank `root` into the same tensor on every other rank, in place.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::invalid(format!(
                "broadcast: root rank {root} is outside world size {}",
                self.world_size
            )));
        }
        self.check_tensors("broadcast", tensors)?;
        if tensors.is_empty() {
            return Ok(());
        }
        let ptrs = ffi::tensor_ptrs(tensors);
        let root = root as c_int; // < world_size, which fits in c_int (checked in `new`)
        ffi::check("broadcast", |err| {
            // SAFETY: as in `all_reduce_sum`.
            unsafe {
                ffi::vt_dist_broadcast(self.raw.as_ptr(), ptrs.as_ptr(), ptrs.len(), root, err)
            }
        })
        .map_err(|e| self.tag(e))
    }

    /// Waits until every rank reaches the barrier (or the timeout passes).
    pub fn barrier(&self) -> Result<()> {
        ffi::check("barrier", |err| {
            // SAFETY: the handle is live.
            unsafe { ffi::vt_dist_barrier(self.raw.as_ptr(), err) }
        })
        .map_err(|e| self.tag(e))
    }

    /// Mean over ranks of each value (losses, metrics for logging), in f64.
    pub fn all_reduce_mean(&self, values: &[f64]) -> Result<Vec<f64>> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let mut t = [Tensor::from_slice(values)];
        if self.device != tch::Device::Cpu {
            t[0] = t[0]
                .f_to_device(self.device)
                .ctx("all_reduce_mean: copy to the rank's device")?;
        }
        self.all_reduce_sum(&mut t)?;
        let out = t[0]
            .f_to_kind(Kind::Double)
            .and_then(|x| x.f_to_device(tch::Device::Cpu))
            .ctx("all_reduce_mean: read back")?;
        let v = Vec::<f64>::try_from(&out).ctx("all_reduce_mean: read back")?;
        Ok(v.into_iter().map(|x| x / self.world_size as f64).collect())
    }

    pub(crate) fn raw(&self) -> *mut ffi::VtPg {
        self.raw.as_ptr()
    }

    pub(crate) fn tag(&self, e: Error) -> Error {
        match e {
            Error::Dist(m) => Error::Dist(format!("rank {}/{}: {m}", self.rank, self.world_size)),
            other => other,
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from `vt_dist_pg_new` and is freed exactly once.
        unsafe { ffi::vt_dist_pg_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_torchrun_style() {
        let e = DistEnv::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29501"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: Some("node0".into()),
                master_port: Some(29501)
            }
        );
    }

    #[test]
    fn env_slurm_fallback_and_none() {
        let e = DistEnv::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!(e.master_addr, None);
        assert!(DistEnv::from_vars(vars(&[])).unwrap().is_none());
    }

    #[test]
    fn env_bad_values_name_the_variable() {
        let msg = |p: &[(&str, &str)]| DistEnv::from_vars(vars(p)).unwrap_err().to_string();
        assert!(msg(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("env RANK"));
        assert!(msg(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("not below WORLD_SIZE=2"));
        assert!(msg(&[("RANK", "0")]).contains("env WORLD_SIZE"));
        assert!(
            msg(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")])
                .contains("MASTER_PORT")
        );
        assert!(msg(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("must be >= 1"));
    }

    #[test]
    fn cuda_device_from_gpu_devices() {
        let mut e = DistEnv::single(1);
        e.local_rank = 1;
        assert_eq!(e.cuda_device(&[2, 5]).unwrap(), tch::Device::Cuda(5));
        assert_eq!(e.cuda_device(&[]).unwrap(), tch::Device::Cuda(1));
        let msg = e.cuda_device(&[3]).unwrap_err().to_string();
        assert!(
            msg.contains("training.gpu_devices") && msg.contains("LOCAL_RANK 1"),
            "{msg}"
        );
    }

    #[test]
    fn config_validation_names_keys() {
        let c = DistConfig {
            bucket_mb: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("bucket_mb"));
        let c: DistConfig = serde_yaml::from_str("backend: nccl\ntimeout_secs: 5\n").unwrap();
        assert_eq!(c.backend, Some(Backend::Nccl));
        assert_eq!(DistConfig::default().backend, None);
        assert_eq!(c.timeout_secs, 5);
        assert_eq!(c.bucket_mb, 25.0);
        assert!(serde_yaml::from_str::<DistConfig>("backend: mpi\n").is_err());
    }

    #[test]
    fn nccl_refused_without_support() {
        if nccl_available() {
            return;
        }
        let cfg = DistConfig {
            backend: Some(Backend::Nccl),
            ..Default::default()
        };
        let e = ProcessGroup::new(&DistEnv::single(1), &cfg).unwrap_err();
        assert!(e.to_string().contains("is not compiled"), "{e}");
        // The default for a CUDA rank is nccl too.
        let e = ProcessGroup::on_device(
            &DistEnv::single(1),
            &DistConfig::default(),
            tch::Device::Cuda(0),
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not compiled"), "{e}");
    }
}
