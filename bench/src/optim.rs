//! Optimizer step timings against the PyTorch references (`reference/bench_optim.py`).
//!
//! Parameters: the matrices of a SmolLM2-135M-shaped model (hidden 576, intermediate 1536,
//! 9 heads of 64, 3 kv heads; 30 layers, or 3 for Muon in quick mode), fp32, fixed gradients.
//! Rows (seconds per step, smaller is better):
//! - `muon_step`: VoltTrain's [`Muon`] with its default `ns_method` (auto: on the CPU the
//!   spectral evaluation for wide matrices, the iteration per matrix for the others) against the
//!   reference Muon of `reference/optim_ref.py` looping over parameters;
//! - `muon_step_iterative`: the same with `ns_method: iterative` (the NS5 iteration for every
//!   matrix), against the same reference;
//! - `muon_step_batched`: the iteration on stacked same-shape matrices with one `bmm` per product
//!   (what runs on CUDA), against the same reference;
//! - `adamw_step`: VoltTrain's [`AdamW`] against `torch.optim.AdamW(foreach=True)`.
//!
//! The reference steps are interleaved with VoltTrain's (see [`run`]).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use tch::{Device, Kind, Tensor};

use volttrain::error::{Error, Result, TchResultExt};
use volttrain::optim::{
    AdamW, AdamWConfig, Muon, MuonConfig, MuonScale, NamedParam, NsMethod, NsPrecision, Optimizer,
    ParamGroup,
};

use crate::{Measurement, PerfOpts, Stats, time_runs};

const HIDDEN: i64 = 576;
const INTER: i64 = 1536;
const HEAD_DIM: i64 = 64;
const HEADS: i64 = 9;
const KV_HEADS: i64 = 3;

/// The matrix shapes of one decoder layer: q, k, v, o, gate, up, down.
pub fn layer_shapes() -> [[i64; 2]; 7] {
    let q = [HEADS * HEAD_DIM, HIDDEN];
    let kv = [KV_HEADS * HEAD_DIM, HIDDEN];
    [
        q,
        kv,
        kv,
        [HIDDEN, HEADS * HEAD_DIM],
        [INTER, HIDDEN],
        [INTER, HIDDEN],
        [HIDDEN, INTER],
    ]
}

/// `layers` layers of parameters (`N(0, 0.02)`) with `N(0, 1)` gradients on `device`.
pub fn make_params(layers: usize, device: Device, seed: i64) -> Result<Vec<NamedParam>> {
    tch::manual_seed(seed);
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let mut out = Vec::with_capacity(layers * 7);
    for l in 0..layers {
        for (shape, n) in layer_shapes().iter().zip(names) {
            let name = format!("model.layers.{l}.{n}.weight");
            let ctx = || format!("bench: making `{name}`");
            let p = Tensor::f_randn(shape.as_slice(), (Kind::Float, device))
                .and_then(|t| t.f_mul_scalar(0.02))
                .and_then(|t| t.f_set_requires_grad(true))
                .ctx(ctx())?;
            let g = Tensor::f_randn(shape.as_slice(), (Kind::Float, device)).ctx(ctx())?;
            // d/dp sum(p * g) = g
            p.f_mul(&g)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .ctx(ctx())?;
            out.push(NamedParam { name, tensor: p });
        }
    }
    Ok(out)
}

fn numel(params: &[NamedParam]) -> usize {
    params.iter().map(|p| p.tensor.numel()).sum()
}

/// The reference optimizers in a `bench_optim.py --serve` process, stepped one at a time.
struct RefServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    script: PathBuf,
}

impl RefServer {
    fn start(opts: &PerfOpts, args: &[String]) -> Result<RefServer> {
        let script = opts.root.join("reference").join("bench_optim.py");
        let mut child = Command::new(&opts.python)
            .arg(&script)
            .arg("--serve")
            .args(args)
            .env("OMP_NUM_THREADS", opts.threads.to_string())
            .env("MKL_NUM_THREADS", opts.threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io(&opts.python, e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::invalid(
                "bench_optim.py: no pipes to the reference process",
            ));
        };
        let mut server = RefServer {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            script,
        };
        let ready = server.read()?;
        if ready["ready"] != serde_json::Value::Bool(true) {
            return Err(Error::invalid(format!(
                "{}: expected the ready line, got {ready}",
                server.script.display()
            )));
        }
        Ok(server)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| Error::io(&self.script, e))?;
        if line.trim().is_empty() {
            return Err(Error::invalid(format!(
                "{} ended without answering (see its messages above)",
                self.script.display()
            )));
        }
        serde_json::from_str(line.trim()).map_err(|e| Error::Json {
            path: self.script.clone(),
            source: e,
        })
    }

    /// One reference step of `which` (`muon`, `adamw`); its seconds.
    fn step(&mut self, which: &str) -> Result<f64> {
        writeln!(self.stdin, "{which}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| Error::io(&self.script, e))?;
        let v = self.read()?;
        v["s"]
            .as_f64()
            .ok_or_else(|| Error::invalid(format!("{}: no seconds in {v}", self.script.display())))
    }
}

impl Drop for RefServer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// `warmup` then `runs` rounds of one VoltTrain step and one reference step, alternating which
/// goes first; returns (VoltTrain seconds, reference seconds) of the measured rounds.
fn interleave(
    opts: &PerfOpts,
    server: &mut RefServer,
    which: &str,
    mut ours: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut timed = || -> Result<f64> {
        let t = time_runs(opts.device, 0, 1, &mut ours)?;
        Ok(t[0])
    };
    let (mut v, mut r) = (Vec::new(), Vec::new());
    for round in 0..opts.warmup + opts.runs {
        let (tv, tr) = if round % 2 == 0 {
            let tv = timed()?;
            (tv, server.step(which)?)
        } else {
            let tr = server.step(which)?;
            (timed()?, tr)
        };
        if round >= opts.warmup {
            v.push(tv);
            r.push(tr);
        }
    }
    Ok((v, r))
}

/// Measures Muon and AdamW steps and their references; see the module documentation.
///
/// The reference runs as a `bench_optim.py --serve` process and its steps are interleaved with
/// VoltTrain's (one each per round), so both sides run under the same machine load.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    run_only(opts, &["muon", "adamw"])
}

/// [`run`] for some of the workloads: `"muon"`, `"adamw"`.
pub fn run_only(opts: &PerfOpts, which: &[&str]) -> Result<Vec<Measurement>> {
    if let Some(w) = which.iter().find(|w| !["muon", "adamw"].contains(*w)) {
        return Err(Error::invalid(format!(
            "optim bench: unknown workload `{w}` (muon, adamw)"
        )));
    }
    tch::set_num_threads(opts.threads as i32);
    let muon_layers = if opts.quick { 3 } else { 30 };
    let adamw_layers = 30;
    let seed = 0;
    let args = vec![
        format!("--muon-layers={muon_layers}"),
        format!("--adamw-layers={adamw_layers}"),
        format!("--threads={}", opts.threads),
        format!("--seed={seed}"),
    ];

    let mut rows = Vec::new();
    if which.contains(&"muon") {
        let mut server =
            RefServer::start(opts, &[args.clone(), vec!["--which=muon".into()]].concat())?;
        let variants = [
            (
                "muon_step",
                NsMethod::Auto,
                None,
                "auto: spectral for wide matrices",
            ),
            (
                "muon_step_iterative",
                NsMethod::Iterative,
                None,
                "NS5 iteration per matrix",
            ),
            (
                "muon_step_batched",
                NsMethod::Iterative,
                Some(true),
                "NS5 iteration on stacked same-shape batches (bmm)",
            ),
        ];
        for (workload, method, batched, what) in variants {
            let params = make_params(muon_layers, opts.device, seed)?;
            let muon_numel = numel(&params);
            let cfg = MuonConfig {
                scale: MuonScale::MatchAdamw,
                ns_precision: NsPrecision::Auto,
                ns_method: method,
                batched,
                weight_decay: 0.1,
                ..Default::default()
            };
            let mut muon = Muon::new(vec![ParamGroup::new("muon", params, 0.02, 1.0, 0.1)], cfg)?;
            let (v, r) = interleave(opts, &mut server, "muon", || muon.step())?;
            rows.push(Measurement {
                workload: workload.into(),
                metric: "s/step".into(),
                volttrain: Stats::from_samples(&v)?,
                reference: Some(Stats::from_samples(&r)?),
                reference_name: "reference Muon (PyTorch, per-parameter loop)".into(),
                higher_is_better: false,
                note: format!(
                    "SmolLM2-135M matrices x {muon_layers} layers ({muon_numel} params), fp32, \
                     ns_method {what}, {} threads",
                    opts.threads
                ),
            });
        }
    }
    if which.contains(&"adamw") {
        let mut server =
            RefServer::start(opts, &[args.clone(), vec!["--which=adamw".into()]].concat())?;
        let params = make_params(adamw_layers, opts.device, seed)?;
        let adamw_numel = numel(&params);
        let mut adamw = AdamW::new(
            vec![ParamGroup::new("adamw", params, 1e-3, 1.0, 0.01)],
            AdamWConfig::default(),
        )?;
        let (v, r) = interleave(opts, &mut server, "adamw", || adamw.step())?;
        rows.push(Measurement {
            workload: "adamw_step".into(),
            metric: "s/step".into(),
            volttrain: Stats::from_samples(&v)?,
            reference: Some(Stats::from_samples(&r)?),
            reference_name: "torch.optim.AdamW (foreach)".into(),
            higher_is_better: false,
            note: format!(
                "SmolLM2-135M matrices x {adamw_layers} layers ({adamw_numel} params), {} threads",
                opts.threads
            ),
        });
    }
    Ok(rows)
}
