//! Which device a rank trains on, which c10d backend it uses, and where each collective's
//! tensors live.
//!
//! The rules (as `torchrun` + DDP users expect them):
//!
//! - A rank on a CUDA device uses NCCL, a rank on the CPU uses Gloo; `distributed.backend`
//!   overrides ([`backend_for`]).
//! - NCCL only takes CUDA tensors: the trainer's scalar collectives (token counts, loss and eval
//!   sums, the interrupt flag) are staged on the rank's GPU, gradient buckets stay where the
//!   gradients are ([`staging_device`], [`check_collective_devices`]). Gloo stages scalars on the
//!   CPU.
//! - `training.gpu_devices` lists this machine's GPUs, one process each; with one entry the single
//!   process trains on that GPU ([`select_device`]).

use tch::Device;

use super::{Backend, DistEnv};
use crate::error::{Error, Result};

/// The backend a rank computing on `device` uses: `configured` when set, else NCCL on CUDA and
/// Gloo on the CPU.
pub fn backend_for(configured: Option<Backend>, device: Device) -> Backend {
    match (configured, device) {
        (Some(b), _) => b,
        (None, Device::Cuda(_)) => Backend::Nccl,
        (None, _) => Backend::Gloo,
    }
}

/// Where a collective's own tensors (the scalar all-reduces of the trainer) are staged: the
/// rank's GPU under NCCL, the CPU under Gloo. An error when NCCL is asked for on a rank that does
/// not compute on a GPU.
pub fn staging_device(backend: Backend, compute: Device) -> Result<Device> {
    match backend {
        Backend::Gloo => Ok(Device::Cpu),
        Backend::Nccl => match compute {
            Device::Cuda(_) => Ok(compute),
            other => Err(Error::config(
                "distributed.backend",
                format!(
                    "nccl needs the rank's tensors on a CUDA device but this rank computes on \
                     {other:?}; use backend gloo for CPU ranks"
                ),
            )),
        },
    }
}

/// Checks that every named tensor of a collective (`(name, device)`: a gradient bucket's
/// parameters, a broadcast's parameters) lives where `backend` can reduce it: CUDA under NCCL.
/// Gloo takes CPU tensors and, through host copies, CUDA ones.
pub fn check_collective_devices<'a>(
    backend: Backend,
    what: &str,
    tensors: impl IntoIterator<Item = (&'a str, Device)>,
) -> Result<()> {
    if backend != Backend::Nccl {
        return Ok(());
    }
    for (name, d) in tensors {
        if !d.is_cuda() {
            return Err(Error::Unsupported {
                what: what.to_string(),
                msg: format!(
                    "`{name}` is on {d:?} but the backend is nccl, which only reduces CUDA \
                     tensors; move the model to the rank's GPU or set distributed.backend: gloo"
                ),
            });
        }
    }
    Ok(())
}

/// The device this process trains on.
///
/// - `env` is `Some` in a data-parallel worker: with `gpu_devices` listed (or `model.device` a
///   CUDA device) its GPU is `gpu_devices[LOCAL_RANK]` (`cuda:LOCAL_RANK` for an empty list),
///   else the CPU (`--nproc N` on CPU).
/// - A single process with exactly one `gpu_devices` entry trains on that GPU; a `model.device`
///   that names another device is a conflict.
/// - Otherwise `model_device` (from `model.device`, default CUDA when available).
///
/// `cuda_count` is the number of CUDA devices libtorch sees; a listed device beyond it is an
/// error naming `training.gpu_devices`.
pub fn select_device(
    model_device: Device,
    model_device_set: bool,
    gpu_devices: &[usize],
    env: Option<&DistEnv>,
    cuda_count: usize,
) -> Result<Device> {
    let check = |d: Device, who: String| -> Result<Device> {
        match d {
            Device::Cuda(i) if i >= cuda_count => Err(Error::config(
                "training.gpu_devices",
                format!(
                    "{who} needs cuda:{i} but libtorch sees {cuda_count} CUDA device(s); list \
                     existing GPUs, or use `--nproc N` for CPU processes (Gloo)"
                ),
            )),
            d => Ok(d),
        }
    };
    match env {
        Some(env) => {
            if gpu_devices.is_empty() && !model_device.is_cuda() {
                return Ok(Device::Cpu);
            }
            let d = env.cuda_device(gpu_devices)?;
            check(d, format!("rank {}", env.rank))
        }
        None => match gpu_devices {
            [] => Ok(model_device),
            [g] => {
                let d = Device::Cuda(*g);
                if model_device_set && model_device != d {
                    return Err(Error::config(
                        "training.gpu_devices",
                        format!(
                            "selects cuda:{g} but model.device is {model_device:?}; remove one \
                             of them"
                        ),
                    ));
                }
                check(d, "this process".into())
            }
            // Several entries start one process per GPU (the command line's launcher); a host
            // calling the library directly gets the first.
            [g, ..] => check(Device::Cuda(*g), "this process".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_device_unless_configured() {
        assert_eq!(backend_for(None, Device::Cuda(3)), Backend::Nccl);
        assert_eq!(backend_for(None, Device::Cpu), Backend::Gloo);
        assert_eq!(
            backend_for(Some(Backend::Gloo), Device::Cuda(0)),
            Backend::Gloo
        );
        assert_eq!(backend_for(Some(Backend::Nccl), Device::Cpu), Backend::Nccl);
    }

    #[test]
    fn scalar_collectives_are_staged_where_the_backend_reduces() {
        assert_eq!(
            staging_device(Backend::Nccl, Device::Cuda(2)).unwrap(),
            Device::Cuda(2)
        );
        assert_eq!(
            staging_device(Backend::Gloo, Device::Cuda(2)).unwrap(),
            Device::Cpu
        );
        assert_eq!(
            staging_device(Backend::Gloo, Device::Cpu).unwrap(),
            Device::Cpu
        );
        let e = staging_device(Backend::Nccl, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("distributed.backend") && e.contains("gloo"),
            "{e}"
        );
    }

    #[test]
    fn nccl_buckets_must_be_on_cuda() {
        let ok = [("a", Device::Cuda(1)), ("b", Device::Cuda(1))];
        check_collective_devices(Backend::Nccl, "gradient bucket", ok).unwrap();
        let bad = [("a", Device::Cuda(1)), ("lm_head.weight", Device::Cpu)];
        let e = check_collective_devices(Backend::Nccl, "gradient bucket", bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`lm_head.weight`") && e.contains("nccl"), "{e}");
        check_collective_devices(Backend::Gloo, "gradient bucket", bad).unwrap();
    }

    #[test]
    fn one_gpu_entry_selects_that_gpu() {
        let cpu = Device::Cpu;
        assert_eq!(
            select_device(cpu, false, &[1], None, 2).unwrap(),
            Device::Cuda(1)
        );
        // model.device agreeing with the entry is fine, disagreeing is a conflict.
        assert_eq!(
            select_device(Device::Cuda(1), true, &[1], None, 2).unwrap(),
            Device::Cuda(1)
        );
        let e = select_device(cpu, true, &[1], None, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training.gpu_devices") && e.contains("model.device"),
            "{e}"
        );
        // A GPU that is not there.
        let e = select_device(cpu, false, &[3], None, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:3") && e.contains("2 CUDA device"), "{e}");
        let e = select_device(cpu, false, &[0], None, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 CUDA device"), "{e}");
        // No list: model.device.
        assert_eq!(select_device(cpu, true, &[], None, 0).unwrap(), cpu);
        assert_eq!(
            select_device(Device::Cuda(0), false, &[], None, 1).unwrap(),
            Device::Cuda(0)
        );
    }

    #[test]
    fn workers_take_their_local_rank_gpu_or_the_cpu() {
        let mut env = DistEnv::single(1);
        env.world_size = 2;
        env.rank = 1;
        env.local_rank = 1;
        assert_eq!(
            select_device(Device::Cpu, false, &[4, 6], Some(&env), 8).unwrap(),
            Device::Cuda(6)
        );
        assert_eq!(
            select_device(Device::Cpu, true, &[], Some(&env), 0).unwrap(),
            Device::Cpu
        );
        assert_eq!(
            select_device(Device::Cuda(0), true, &[], Some(&env), 2).unwrap(),
            Device::Cuda(1)
        );
        let e = select_device(Device::Cpu, false, &[4, 6], Some(&env), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 needs cuda:6"), "{e}");
    }
}
