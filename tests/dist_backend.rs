//! Backend choice by device and where the trainer's collectives run, on real c10d groups (Gloo
//! here; the NCCL side runs in `./dev gpu-check`), and the one-GPU `training.gpu_devices`
//! selection through the command line.

use std::process::Command;

use tch::Device;
use volttrain::dist::{Backend, DistConfig, DistEnv, ProcessGroup, launch::free_port};
use volttrain::trainer::{C10dCollective, Collective};

fn single() -> DistEnv {
    DistEnv::single(free_port().unwrap())
}

#[test]
fn cpu_rank_defaults_to_gloo_and_reduces_scalars_on_the_cpu() {
    let pg = ProcessGroup::on_device(&single(), &DistConfig::default(), Device::Cpu).unwrap();
    assert_eq!(pg.backend(), Backend::Gloo);
    assert_eq!(pg.device(), Device::Cpu);
    let mut c = C10dCollective::new(pg, 25.0);
    // token counts, a loss sum and the interrupt flag, as the trainer sends them
    assert_eq!(
        c.all_reduce_f64(&[4096.0, 17.25, 0.0]).unwrap(),
        vec![4096.0, 17.25, 0.0]
    );
}

#[test]
fn gloo_override_on_a_cuda_rank_stages_scalars_on_the_cpu() {
    // No GPU is touched: Gloo stages the trainer's scalars on the host.
    let cfg = DistConfig {
        backend: Some(Backend::Gloo),
        ..Default::default()
    };
    let pg = ProcessGroup::on_device(&single(), &cfg, Device::Cuda(0)).unwrap();
    assert_eq!(pg.backend(), Backend::Gloo);
    assert_eq!(pg.device(), Device::Cpu);
    let mut c = C10dCollective::new(pg, 25.0);
    assert_eq!(c.all_reduce_f64(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn nccl_on_a_cpu_rank_is_refused_naming_the_key() {
    let cfg = DistConfig {
        backend: Some(Backend::Nccl),
        ..Default::default()
    };
    let e = ProcessGroup::on_device(&single(), &cfg, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("distributed.backend") && e.contains("gloo"),
        "{e}"
    );
}

#[test]
fn nccl_rejects_cpu_tensors_before_any_collective() {
    // The check the trainer's gradient buckets pass through, without a GPU.
    let e = volttrain::dist::check_collective_devices(
        Backend::Nccl,
        "gradient bucket",
        [("model.norm.weight", Device::Cpu)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
}

#[test]
fn one_gpu_entry_is_not_ignored() {
    if tch::Cuda::device_count() > 0 {
        eprintln!("skipped: this machine has a GPU; the check is that cuda:0 is required");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .current_dir(root)
        .args(["sft", "--config", "config/sft.yaml", "--set"])
        .arg("training.gpu_devices=[0]")
        .arg("--set")
        .arg(format!("training.output_dir={}", out.path().display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "trained on the CPU despite gpu_devices: [0]\n{err}"
    );
    assert!(
        err.contains("training.gpu_devices") && err.contains("cuda:0"),
        "{err}"
    );
}
