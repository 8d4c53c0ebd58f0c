//! Data-parallel parity on Gloo: 2 ranks x half batch with `GradSync` give the same parameters
//! as 1 process on the concatenated batches (same seed), and both ranks end bit-identical.
//!
//! The test binary re-executes itself as the two workers (`VT_DIST_WORKER`); the single-process
//! reference runs in the parent.

mod common;

use std::ffi::OsString;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use volttrain::dist::{
    DistConfig, DistEnv, GradSync, ProcessGroup, broadcast_params, launch, shard_indices,
};

const N: usize = 32; // samples
const GLOBAL_BATCH: usize = 8;
const EPOCHS: u64 = 2;
const DATA_SEED: u64 = 17;
const LR: f64 = 0.05;
const MOMENTUM: f64 = 0.9;

/// A 2-layer MLP, 8 -> 16 -> 4, with one frozen parameter (a fixed output scale).
struct Mlp {
    params: Vec<(String, Tensor)>,
    scale: Tensor,
}

impl Mlp {
    fn new(seed: i64) -> Self {
        // the parent runs this file's tests on parallel threads, all on libtorch's one global
        // generator: without the lock one test's reseed lands between another's draws, and the
        // single-process reference starts from other weights than the ranks
        let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let p = |name: &str, shape: &[i64]| {
            let t =
                (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.3).set_requires_grad(true);
            (name.to_string(), t)
        };
        Mlp {
            params: vec![
                p("fc1.weight", &[16, 8]),
                p("fc1.bias", &[16]),
                p("fc2.weight", &[4, 16]),
                p("fc2.bias", &[4]),
            ],
            scale: Tensor::full([4], 1.5, (Kind::Float, Device::Cpu)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let w = |i: usize| &self.params[i].1;
        let h = x.linear(w(0), Some(w(1))).tanh();
        h.linear(w(2), Some(w(3))) * &self.scale
    }
}

fn dataset() -> (Tensor, Tensor) {
    // as in `Mlp::new`
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(DATA_SEED as i64);
    let x = Tensor::randn([N as i64, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([N as i64, 4], (Kind::Float, Device::Cpu));
    (x, y)
}

/// SGD with momentum (torch.optim.SGD's rule: buf = m * buf + g; p -= lr * buf).
fn sgd_step(params: &[(String, Tensor)], bufs: &mut Vec<Tensor>) {
    let _g = tch::no_grad_guard();
    if bufs.is_empty() {
        *bufs = params.iter().map(|(_, p)| p.zeros_like()).collect();
    }
    for ((_, p), b) in params.iter().zip(bufs.iter_mut()) {
        let g = p.grad();
        let _ = b.g_mul_scalar_(MOMENTUM).g_add_(&g);
        let mut p = p.shallow_clone();
        let _ = p.g_sub_(&(&*b * LR));
        let _ = p.grad().zero_();
    }
}

/// Rows of `rank`'s batch `step` in `epoch` (DistributedSampler order, world 2).
fn batch_rows(rank: usize, epoch: u64, step: usize) -> Vec<i64> {
    let local = GLOBAL_BATCH / 2;
    shard_indices(N, rank, 2, DATA_SEED, epoch, true)[step * local..(step + 1) * local]
        .iter()
        .map(|&i| i as i64)
        .collect()
}

/// Trains `EPOCHS` epochs. Each step's rows are split into `micro` micro-batches whose scaled
/// losses (1/micro each) accumulate gradients; `before_backward(last)` runs before each
/// micro-batch's backward, `sync` after the last one.
fn train(
    model: &Mlp,
    rows_of: impl Fn(u64, usize) -> Vec<i64>,
    micro: usize,
    before_backward: impl Fn(bool),
    sync: impl Fn(),
) {
    let (x, y) = dataset();
    let mut bufs = Vec::new();
    for epoch in 0..EPOCHS {
        for step in 0..N / GLOBAL_BATCH {
            let rows = rows_of(epoch, step);
            let per = rows.len() / micro;
            for m in 0..micro {
                let idx = Tensor::from_slice(&rows[m * per..(m + 1) * per]);
                let out = model.forward(&x.index_select(0, &idx));
                let loss = (out - y.index_select(0, &idx)).square().mean(Kind::Float);
                before_backward(m + 1 == micro);
                (loss / micro as f64).backward();
            }
            sync();
            sgd_step(&model.params, &mut bufs);
        }
    }
}

fn save(path: &PathBuf, params: &[(String, Tensor)]) {
    let named: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::save_multi(&named, path).unwrap();
}

#[test]
fn two_ranks_with_grad_sync_match_one_process() {
    parity("two_ranks_with_grad_sync_match_one_process", false, 1);
}

#[test]
fn two_ranks_with_overlapped_grad_sync_match_one_process() {
    parity(
        "two_ranks_with_overlapped_grad_sync_match_one_process",
        true,
        1,
    );
}

/// Gradient accumulation over 2 micro-batches per rank with the hooks off for the first one
/// (DDP's `no_sync`): still the 1-process result.
#[test]
fn two_ranks_overlapped_with_accumulation_match_one_process() {
    parity(
        "two_ranks_overlapped_with_accumulation_match_one_process",
        true,
        2,
    );
}

fn parity(name: &'static str, overlap: bool, micro: usize) {
    tch::set_num_threads(1);
    if std::env::var("VT_DIST_WORKER").ok().as_deref() == Some(name) {
        let out = PathBuf::from(std::env::var("VT_DIST_OUT").unwrap());
        let env = DistEnv::from_env().unwrap().unwrap();
        let cfg = DistConfig {
            timeout_secs: 60,
            bucket_mb: 0.0005, // 524 bytes: fc1.weight (512 B) and fc2.weight (256 B) split buckets
            ..Default::default()
        };
        let pg = ProcessGroup::new(&env, &cfg).unwrap();
        // Different init per rank: broadcast_params must make them rank 0's.
        let model = Mlp::new(100 + pg.rank() as i64);
        broadcast_params(&pg, &model.params, 0).unwrap();
        let gs = if overlap {
            GradSync::overlapped(&pg, &model.params, cfg.bucket_mb).unwrap()
        } else {
            GradSync::new(&model.params, cfg.bucket_mb).unwrap()
        };
        let n_buckets = gs.bucket_sizes().len();
        assert!(n_buckets >= 2, "{gs:?}");
        assert_eq!(gs.is_overlapped(), overlap);
        let rank = pg.rank();
        train(
            &model,
            |e, s| batch_rows(rank, e, s),
            micro,
            |last| gs.set_overlap(last),
            || {
                // Overlapped: every bucket was launched by the hooks during backward.
                let launched = gs.buckets_launched_in_backward();
                assert_eq!(launched, if overlap { n_buckets } else { 0 });
                gs.sync(&pg).unwrap();
                assert_eq!(gs.buckets_launched_in_backward(), 0);
            },
        );
        save(&out.join(format!("rank{rank}.ot")), &model.params);
        return;
    }

    let out = tempfile::tempdir().unwrap();
    let args: Vec<OsString> = [name, "--exact", "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect();
    let env = vec![
        ("VT_DIST_WORKER".to_string(), name.to_string()),
        ("VT_DIST_OUT".to_string(), out.path().display().to_string()),
    ];
    let exe = std::env::current_exe().unwrap();
    launch::spawn_workers(2, &exe, &args, &env).unwrap();

    // Single process, full global batch = rank 0's rows followed by rank 1's.
    let single = Mlp::new(100);
    train(
        &single,
        |e, s| [batch_rows(0, e, s), batch_rows(1, e, s)].concat(),
        1,
        |_| {},
        || {},
    );
    let load = |r: usize| Tensor::load_multi(out.path().join(format!("rank{r}.ot"))).unwrap();
    let (r0, r1) = (load(0), load(1));
    assert_eq!(r0.len(), single.params.len());
    let init = Mlp::new(100);
    for (((name, p), (n0, t0)), (n1, t1)) in single.params.iter().zip(&r0).zip(&r1) {
        assert_eq!((name, name), (n0, n1));
        assert!(t0.equal(t1), "{name}: ranks differ");
        let diff = (t0 - p).abs().max().double_value(&[]);
        let moved = (p - &init.params.iter().find(|(n, _)| n == name).unwrap().1)
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{name}: max |2 ranks - 1 process| = {diff:.3e} (moved {moved:.3e} from init)");
        assert!(diff < 1e-5, "{name}: {diff}");
        assert!(moved > 1e-3, "{name}: training did not move it ({moved})");
    }
}
