//! CPU data-parallel scaling on Gloo: tokens/s of 2 processes x 1 thread against 1 process x 1
//! thread, same model and same global batch.
//!
//! ```text
//! cargo run -p volttrain-bench --example dist_scaling -- [--steps 20] [--batch 16] [--seq 128] \
//!     [--repeats 2]
//! ```
//!
//! (The work is libtorch's; the dev profile is enough.) The program is its own worker: without
//! `RANK` in the environment it launches itself through `dist::launch::spawn_self` (1
//! process, then 2, alternating `--repeats` times), each worker pinned to one intra-op thread;
//! rank 0 reports the global batch's tokens/s. The 2-process run is measured twice: `GradSync` after backward, and `GradSync::overlapped` (all-reduce during
//! backward).
//!
//! The model is a token MLP language model: embedding(512, 128) -> linear 128x512 -> GELU ->
//! linear 512x512 -> GELU -> linear 512x512(vocab), cross-entropy on the next token, SGD.
//! One step = forward + backward + `GradSync` (all ranks) + update.

use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use volttrain::dist::{DistConfig, DistEnv, GradSync, ProcessGroup, broadcast_params, launch};
use volttrain::error::TchResultExt;
use volttrain::{Error, Result};

const VOCAB: i64 = 512;
const DIM: i64 = 128;
const HIDDEN: i64 = 512;

#[derive(Clone, Copy)]
struct Opts {
    steps: usize,
    batch: usize,
    seq: usize,
    repeats: usize,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        steps: 20,
        batch: 16,
        seq: 128,
        repeats: 2,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| Error::invalid(format!("{a} needs a value")))?;
        let n: usize = v
            .parse()
            .map_err(|_| Error::invalid(format!("{a}: `{v}` is not a positive integer")))?;
        match a.as_str() {
            "--steps" => o.steps = n,
            "--batch" => o.batch = n,
            "--seq" => o.seq = n,
            "--repeats" => o.repeats = n,
            _ => return Err(Error::invalid(format!("unknown argument {a}"))),
        }
    }
    if !o.batch.is_multiple_of(2) || o.batch == 0 || o.steps == 0 || o.seq < 2 || o.repeats == 0 {
        return Err(Error::invalid(
            "--batch must be even and > 0, --steps and --repeats > 0, --seq >= 2",
        ));
    }
    Ok(o)
}

fn params(seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(seed);
    let p = |name: &str, shape: &[i64], std: f64| {
        let t = (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std).set_requires_grad(true);
        (name.to_string(), t)
    };
    vec![
        p("embed", &[VOCAB, DIM], 1.0),
        p("fc1.weight", &[HIDDEN, DIM], (DIM as f64).powf(-0.5)),
        p("fc1.bias", &[HIDDEN], 0.0),
        p("fc2.weight", &[HIDDEN, HIDDEN], (HIDDEN as f64).powf(-0.5)),
        p("fc2.bias", &[HIDDEN], 0.0),
        p("head.weight", &[VOCAB, HIDDEN], (HIDDEN as f64).powf(-0.5)),
    ]
}

fn step(ps: &[(String, Tensor)], tokens: &Tensor) -> Result<f64> {
    let w = |i: usize| &ps[i].1;
    let inp = tokens.f_narrow(1, 0, tokens.size()[1] - 1).ctx("inputs")?;
    let tgt = tokens.f_narrow(1, 1, tokens.size()[1] - 1).ctx("targets")?;
    let h = Tensor::f_embedding(w(0), &inp, -1, false, false).ctx("embedding")?;
    let h = h.f_linear(w(1), Some(w(2))).ctx("fc1")?.gelu("none");
    let h = h.f_linear(w(3), Some(w(4))).ctx("fc2")?.gelu("none");
    let logits = h.f_linear::<&Tensor>(w(5), None).ctx("head")?;
    let loss = logits
        .f_view([-1, VOCAB])
        .and_then(|l| {
            l.f_cross_entropy_loss::<&Tensor>(
                &tgt.reshape([-1]),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        })
        .ctx("loss")?;
    loss.f_backward().ctx("backward")?;
    Ok(loss.double_value(&[]))
}

fn sgd(ps: &[(String, Tensor)], lr: f64) -> Result<()> {
    let _g = tch::no_grad_guard();
    for (name, p) in ps {
        let mut g = p.grad();
        let mut p = p.shallow_clone();
        let _ = p.f_sub_(&(&g * lr)).ctx(format!("update {name}"))?;
        let _ = g.f_zero_().ctx("zero grad")?;
    }
    Ok(())
}

fn worker(env: DistEnv, o: Opts) -> Result<()> {
    tch::set_num_threads(1);
    let pg = ProcessGroup::new(&env, &DistConfig::default())?;
    let world = pg.world_size();
    let ps = params(1 + pg.rank() as i64);
    broadcast_params(&pg, &ps, 0)?;
    let gs = if std::env::var("VT_BENCH_OVERLAP").as_deref() == Ok("1") {
        GradSync::overlapped(&pg, &ps, 25.0)?
    } else {
        GradSync::new(&ps, 25.0)?
    };
    // Global batch of token rows; this rank takes its contiguous slice.
    tch::manual_seed(7);
    let all = Tensor::randint(
        VOCAB,
        [o.batch as i64, o.seq as i64],
        (Kind::Int64, Device::Cpu),
    );
    let local = (o.batch / world) as i64;
    let mine = all.narrow(0, pg.rank() as i64 * local, local);
    // Returns the last loss and the seconds spent inside `GradSync::sync`.
    let run = |n: usize| -> Result<(f64, f64)> {
        let (mut loss, mut in_sync) = (0.0, 0.0);
        for _ in 0..n {
            loss = step(&ps, &mine)?;
            let t = Instant::now();
            gs.sync(&pg)?;
            in_sync += t.elapsed().as_secs_f64();
            sgd(&ps, 0.05)?;
        }
        Ok((loss, in_sync))
    };
    run(2)?; // warm-up
    pg.barrier()?;
    let t0 = Instant::now();
    let (loss, in_sync) = run(o.steps)?;
    pg.barrier()?;
    let secs = t0.elapsed().as_secs_f64();
    let mean_loss = pg.all_reduce_mean(&[loss])?[0];
    if pg.is_main() {
        let tokens = (o.batch * (o.seq - 1) * o.steps) as f64;
        let line = format!(
            "{} {} {} {}",
            world,
            tokens / secs,
            mean_loss,
            in_sync / secs
        );
        let out = std::env::var("VT_BENCH_OUT")
            .map_err(|_| Error::invalid("VT_BENCH_OUT is not set (run without RANK)"))?;
        std::fs::write(&out, line).map_err(|e| Error::io(&out, e))?;
    }
    Ok(())
}

/// Runs one configuration; returns (tokens/s, share of rank 0's time spent in `sync`).
fn run_world(nproc: usize, overlap: bool, out: &Path) -> Result<(f64, f64)> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let env = vec![
        ("OMP_NUM_THREADS".to_string(), "1".to_string()),
        ("VT_BENCH_OUT".to_string(), out.display().to_string()),
        ("VT_BENCH_OVERLAP".to_string(), (overlap as u8).to_string()),
    ];
    launch::spawn_self(nproc, &args, &env)?;
    let s = std::fs::read_to_string(out).map_err(|e| Error::io(out, e))?;
    let field = |i: usize| -> Result<f64> {
        s.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::invalid(format!("bad worker report `{s}`")))
    };
    Ok((field(1)?, field(3)?))
}

fn main() -> Result<()> {
    let o = parse_opts()?;
    if let Some(env) = DistEnv::from_env()? {
        return worker(env, o);
    }
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let out = dir.path().join("report");
    let (mut best1, mut best2, mut best2o) = (0.0f64, 0.0f64, 0.0f64);
    for r in 0..o.repeats {
        let (t1, _) = run_world(1, false, &out)?;
        let (t2, s2) = run_world(2, false, &out)?;
        let (t2o, s2o) = run_world(2, true, &out)?;
        println!(
            "repeat {r}: 1 proc x 1 thread {t1:.0} tokens/s; 2 procs x 1 thread {t2:.0} tokens/s \
             (GradSync after backward, {:.1}% of the time in sync), {t2o:.0} tokens/s (overlapped \
             with backward, {:.1}% waiting in sync)",
            100.0 * s2,
            100.0 * s2o
        );
        best1 = best1.max(t1);
        best2 = best2.max(t2);
        best2o = best2o.max(t2o);
    }
    println!(
        "global batch {} x {} tokens, {} steps, best of {}: 1 proc {best1:.0} tokens/s; 2 procs \
         {best2:.0} tokens/s = {:.2}x, overlapped {best2o:.0} tokens/s = {:.2}x (ideal 2.00x)",
        o.batch,
        o.seq - 1,
        o.steps,
        o.repeats,
        best2 / best1,
        best2o / best1
    );
    Ok(())
}
