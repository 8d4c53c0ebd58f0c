//! Issue #14: Muon's spectral Newton-Schulz keeps every tensor on the parameter's device. The
//! path is device-generic (no host round trip: norm, eigenvalue polynomial and products are
//! tensors on the gradient's device); on the CPU it runs here, on CUDA in the GPU-only test.

use tch::{Device, Kind, Tensor};
use volttrain::optim::muon::{newton_schulz, newton_schulz_spectral};
use volttrain::optim::{Muon, MuonConfig, NamedParam, NsMethod, Optimizer, ParamGroup};

const COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_device(Device::Cpu).to_kind(Kind::Double),
        b.to_device(Device::Cpu).to_kind(Kind::Double),
    );
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// Spectral NS on `device` equals the fp64 iteration (on the CPU) and stays on `device`,
/// for wide, tall and scaled inputs.
fn spectral_on(device: Device) {
    tch::manual_seed(3);
    for (m, n, factor) in [(64i64, 160i64, 1.0), (160, 64, 0.7), (48, 96, 2.0)] {
        let g = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
        let truth = newton_schulz(
            &g.to_kind(Kind::Double).unsqueeze(0),
            5,
            COEFFS,
            1e-7,
            Kind::Double,
        )
        .unwrap()
        .squeeze_dim(0)
            * factor;
        let out = newton_schulz_spectral(&g.to_device(device), 5, COEFFS, 1e-7, factor).unwrap();
        assert_eq!(out.device(), device, "{m}x{n}: result device");
        assert_eq!(out.kind(), Kind::Float);
        assert_eq!(out.size(), vec![m, n]);
        let e = rel(&out, &truth);
        assert!(e < 5e-5, "{m}x{n} on {device:?}: error {e:e}");
    }
}

/// One Muon step with `ns_method: spectral` on `device` equals the iterative step in fp32.
fn muon_step_on(device: Device) {
    tch::manual_seed(4);
    let p0 = Tensor::randn([96, 40], (Kind::Float, Device::Cpu));
    let g0 = Tensor::randn([96, 40], (Kind::Float, Device::Cpu));
    let run = |method: NsMethod| -> Tensor {
        let p = p0.to_device(device).copy().set_requires_grad(true);
        // set the gradient through a backward: p.grad = g0
        (&p * g0.to_device(device)).sum(Kind::Float).backward();
        let groups = vec![ParamGroup {
            name: "muon".into(),
            params: vec![NamedParam::new("w", &p)],
            lr: 0.02,
            lr_mult: 1.0,
            weight_decay: 0.0,
        }];
        let cfg = MuonConfig {
            ns_method: method,
            ns_precision: volttrain::optim::NsPrecision::Fp32,
            ..Default::default()
        };
        let mut opt = Muon::new(groups, cfg).unwrap();
        opt.step().unwrap();
        p.detach()
    };
    let spectral = run(NsMethod::Spectral);
    let iterative = run(NsMethod::Iterative);
    assert_eq!(spectral.device(), device);
    let (d_s, d_i) = (
        &spectral - &p0.to_device(device),
        &iterative - &p0.to_device(device),
    );
    let e = rel(&d_s, &d_i);
    assert!(e < 1e-4, "{device:?}: spectral vs iterative update {e:e}");
}

#[test]
fn spectral_path_stays_on_the_cpu_and_matches_fp64() {
    spectral_on(Device::Cpu);
    muon_step_on(Device::Cpu);
}

#[test]
fn spectral_path_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!(
            "spectral_path_on_cuda: skipped, no CUDA device (tch::Cuda::is_available() is false)"
        );
        return;
    }
    spectral_on(Device::Cuda(0));
    muon_step_on(Device::Cuda(0));
}
