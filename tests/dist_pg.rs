//! Multi-process tests of `volttrain::dist` on Gloo over 127.0.0.1.
//!
//! Each test re-executes this test binary as its workers: the parent runs the test normally;
//! a child gets `VT_DIST_WORKER=<test name>` and runs the same test (`--exact`), which then
//! takes the worker branch. Workers write their results under `VT_DIST_OUT` so the parent can
//! check that they really ran.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use volttrain::dist::{DistConfig, DistEnv, ProcessGroup, launch};

/// `Some(out_dir)` when this process is a worker of test `name`.
fn worker_of(name: &str) -> Option<PathBuf> {
    (std::env::var("VT_DIST_WORKER").ok().as_deref() == Some(name))
        .then(|| PathBuf::from(std::env::var("VT_DIST_OUT").expect("VT_DIST_OUT")))
}

fn worker_args(name: &str) -> Vec<OsString> {
    [name, "--exact", "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect()
}

fn worker_env(name: &str, out: &Path) -> Vec<(String, String)> {
    vec![
        ("VT_DIST_WORKER".into(), name.into()),
        ("VT_DIST_OUT".into(), out.display().to_string()),
        ("OMP_NUM_THREADS".into(), "1".into()),
    ]
}

fn exe() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

fn pg_from_env(timeout_secs: u64) -> ProcessGroup {
    let env = DistEnv::from_env().unwrap().expect("launcher env");
    let cfg = DistConfig {
        timeout_secs,
        ..Default::default()
    };
    ProcessGroup::new(&env, &cfg).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// Starts `n` workers by hand (not through `spawn_workers`, which would kill the others when one
/// dies), on a fresh port, with `extra` environment; their output goes to `rank<r>.log` (these
/// workers fail on purpose, and their panics would only clutter the test output).
fn start_ranks(name: &str, out: &Path, n: usize, extra: &[(&str, &str)]) -> Vec<Child> {
    let port = launch::free_port().unwrap();
    (0..n)
        .map(|rank| {
            let log = std::fs::File::create(out.join(format!("rank{rank}.log"))).unwrap();
            Command::new(exe())
                .args(worker_args(name))
                .envs(worker_env(name, out))
                .envs(extra.iter().copied())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect()
}

fn wait_for_file(p: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            t0.elapsed() < limit,
            "{} not written within {limit:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `c` at most `limit`; returns its exit status and the time it took.
fn wait_bounded(c: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return (s, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("process still running after {limit:?}: a rank hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn all_reduce_broadcast_barrier_two_ranks() {
    const NAME: &str = "all_reduce_broadcast_barrier_two_ranks";
    if let Some(out) = worker_of(NAME) {
        let t0 = Instant::now();
        let pg = pg_from_env(60);
        let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
        let r = pg.rank() as f64;
        // Two tensors of different shape and dtype in one call.
        let mut ts = [
            Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]) * (r + 1.0),
            Tensor::full([5], r + 0.5, (Kind::Double, Device::Cpu)),
        ];
        pg.all_reduce_sum(&mut ts).unwrap();
        let mut b = [Tensor::full([4], r + 10.0, (Kind::Float, Device::Cpu))];
        pg.broadcast(&mut b, 1).unwrap();
        pg.barrier().unwrap();
        let mean = pg.all_reduce_mean(&[r, 2.0 * r + 1.0]).unwrap();
        // 16 MB all-reduce (4 Mi floats), timed after a warm-up.
        let mut big = [Tensor::ones([4 << 20], (Kind::Float, Device::Cpu))];
        pg.all_reduce_sum(&mut big).unwrap();
        let t1 = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            pg.all_reduce_sum(&mut big).unwrap();
        }
        let big_ms = t1.elapsed().as_secs_f64() * 1e3 / reps as f64;
        // ones -> 2 after the warm-up, then doubled 5 times: 2^6
        let big_ok = to_vec(&big[0].min()) == [64.0] && to_vec(&big[0].max()) == [64.0];
        let json = serde_json::json!({
            "rank": pg.rank(), "world": pg.world_size(),
            "sum_f32": to_vec(&ts[0]), "sum_f64": to_vec(&ts[1]),
            "bcast": to_vec(&b[0]), "mean": mean, "big_ok": big_ok,
            "setup_ms": setup_ms, "allreduce_16mb_ms": big_ms,
        });
        std::fs::write(
            out.join(format!("rank{}.json", pg.rank())),
            json.to_string(),
        )
        .unwrap();
        return;
    }
    let out = tempfile::tempdir().unwrap();
    launch::spawn_workers(2, &exe(), &worker_args(NAME), &worker_env(NAME, out.path())).unwrap();
    for rank in 0..2 {
        let p = out.path().join(format!("rank{rank}.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let f = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        assert_eq!(v["rank"], rank);
        assert_eq!(v["world"], 2);
        // sum over ranks r=0,1 of arange(12) * (r + 1) = 3 * arange(12)
        let want: Vec<f64> = (0..12).map(|i| 3.0 * i as f64).collect();
        assert_eq!(f("sum_f32"), want);
        assert_eq!(f("sum_f64"), vec![2.0; 5]); // 0.5 + 1.5
        assert_eq!(f("bcast"), vec![11.0; 4]); // root 1 holds 1 + 10
        assert_eq!(f("mean"), vec![0.5, 2.0]); // mean(0, 1), mean(1, 3)
        assert_eq!(v["big_ok"], true);
        eprintln!(
            "rank {rank}: process-group set-up {:.1} ms, 16 MB all-reduce {:.1} ms",
            v["setup_ms"].as_f64().unwrap(),
            v["allreduce_16mb_ms"].as_f64().unwrap()
        );
    }
}

#[test]
fn bad_arguments_are_errors_not_crashes() {
    const NAME: &str = "bad_arguments_are_errors_not_crashes";
    if let Some(out) = worker_of(NAME) {
        let pg = pg_from_env(60);
        let nc = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let e1 = pg.all_reduce_sum(&mut [nc]).unwrap_err().to_string();
        let e2 = pg.broadcast(&mut [Tensor::zeros([2], (Kind::Float, Device::Cpu))], 5);
        let e2 = e2.unwrap_err().to_string();
        let json = serde_json::json!({"e1": e1, "e2": e2});
        std::fs::write(
            out.join(format!("rank{}.json", pg.rank())),
            json.to_string(),
        )
        .unwrap();
        return;
    }
    let out = tempfile::tempdir().unwrap();
    launch::spawn_workers(2, &exe(), &worker_args(NAME), &worker_env(NAME, out.path())).unwrap();
    for rank in 0..2 {
        let p = out.path().join(format!("rank{rank}.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert!(v["e1"].as_str().unwrap().contains("not contiguous"), "{v}");
        assert!(v["e2"].as_str().unwrap().contains("root rank 5"), "{v}");
    }
}

/// Worker loop for the failure tests: all-reduce until an error, which is written to
/// `err<rank>.txt` before the worker fails. `ready<rank>` marks the first success. With
/// `VT_HANG_RANK=<r>`, rank r stops taking part (sleeps) once ready.
fn failure_worker(out: &Path, timeout_secs: u64) {
    let pg = pg_from_env(timeout_secs);
    let rank = pg.rank();
    let hang = std::env::var("VT_HANG_RANK")
        .ok()
        .and_then(|s| s.parse::<usize>().ok());
    let mut t = [Tensor::ones([1 << 16], (Kind::Float, Device::Cpu))];
    let mut first = true;
    loop {
        if let Err(e) = pg.all_reduce_sum(&mut t) {
            std::fs::write(out.join(format!("err{rank}.txt")), e.to_string()).unwrap();
            panic!("rank {rank}: {e}");
        }
        let _ = t[0].fill_(1.0);
        if first {
            std::fs::write(out.join(format!("ready{rank}")), "").unwrap();
            first = false;
        }
        if hang == Some(rank) {
            std::thread::sleep(Duration::from_secs(600));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_peer_fails_the_other_rank_quickly() {
    const NAME: &str = "killed_peer_fails_the_other_rank_quickly";
    const TIMEOUT: u64 = 20;
    if let Some(out) = worker_of(NAME) {
        failure_worker(&out, TIMEOUT);
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut ranks = start_ranks(NAME, out.path(), 2, &[]);
    for r in 0..2 {
        wait_for_file(
            &out.path().join(format!("ready{r}")),
            Duration::from_secs(60),
        );
    }
    ranks[1].kill().unwrap();
    let _ = ranks[1].wait();
    // A dead peer closes its sockets: rank 0 must fail well before the collective timeout.
    let (status, took) = wait_bounded(&mut ranks[0], Duration::from_secs(TIMEOUT + 10));
    assert!(!status.success(), "rank 0 must fail when its peer dies");
    let msg = std::fs::read_to_string(out.path().join("err0.txt")).unwrap();
    assert!(
        msg.starts_with("distributed: rank 0/2: all_reduce: "),
        "{msg}"
    );
    assert!(took < Duration::from_secs(TIMEOUT), "took {took:?}");
    eprintln!("rank 0 failed {took:?} after its peer was killed: {msg}");
}

#[test]
fn hung_peer_fails_the_other_rank_within_the_timeout() {
    const NAME: &str = "hung_peer_fails_the_other_rank_within_the_timeout";
    const TIMEOUT: u64 = 3;
    if let Some(out) = worker_of(NAME) {
        failure_worker(&out, TIMEOUT);
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut ranks = start_ranks(NAME, out.path(), 2, &[("VT_HANG_RANK", "1")]);
    for r in 0..2 {
        wait_for_file(
            &out.path().join(format!("ready{r}")),
            Duration::from_secs(60),
        );
    }
    let (status, took) = wait_bounded(&mut ranks[0], Duration::from_secs(TIMEOUT + 15));
    let _ = ranks[1].kill();
    let _ = ranks[1].wait();
    assert!(!status.success(), "rank 0 must fail when its peer hangs");
    let msg = std::fs::read_to_string(out.path().join("err0.txt")).unwrap();
    assert!(msg.contains("rank 0/2: all_reduce"), "{msg}");
    // It waited for the peer about as long as configured, not forever and not zero.
    assert!(took >= Duration::from_secs(TIMEOUT) / 2, "took {took:?}");
    eprintln!("rank 0 failed {took:?} after its peer stopped (timeout {TIMEOUT} s): {msg}");
}

#[test]
fn launcher_stops_all_ranks_when_one_fails() {
    const NAME: &str = "launcher_stops_all_ranks_when_one_fails";
    if worker_of(NAME).is_some() {
        let env = DistEnv::from_env().unwrap().unwrap();
        if env.rank == 1 {
            std::process::exit(3);
        }
        // Rank 0 would wait a long time; the launcher must kill it.
        std::thread::sleep(Duration::from_secs(300));
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let e = launch::spawn_workers(2, &exe(), &worker_args(NAME), &worker_env(NAME, out.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 of 2 failed (exit status 3)"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

/// NCCL, world size 1: on a GPU machine with an NCCL build, an all-reduce and a broadcast of CUDA
/// tensors; without a GPU (NCCL build) the group must fail with an error, not crash; builds
/// without NCCL skip (CI has no GPU).
#[test]
fn nccl_world_size_one() {
    use volttrain::dist::{Backend, nccl_available};
    if !nccl_available() {
        eprintln!("skipped: this build has no NCCL (headers not found at build time)");
        return;
    }
    let cfg = DistConfig {
        backend: Some(Backend::Nccl),
        timeout_secs: 60,
        ..Default::default()
    };
    let env = DistEnv::single(launch::free_port().unwrap());
    if !tch::Cuda::is_available() {
        let r = ProcessGroup::new(&env, &cfg).and_then(|pg| {
            pg.all_reduce_sum(&mut [Tensor::ones([4], (Kind::Float, Device::Cuda(0)))])
        });
        let e = r.expect_err("NCCL without a GPU must fail").to_string();
        eprintln!("NCCL build, no GPU: {e}");
        return;
    }
    let pg = ProcessGroup::new(&env, &cfg).unwrap();
    let x = Tensor::arange(8, (Kind::Float, Device::Cuda(0)));
    let mut t = [x.copy()];
    pg.all_reduce_sum(&mut t).unwrap();
    pg.broadcast(&mut t, 0).unwrap();
    pg.barrier().unwrap();
    assert_eq!(
        to_vec(&t[0].to_device(Device::Cpu)),
        to_vec(&x.to_device(Device::Cpu))
    );
    assert_eq!(pg.all_reduce_mean(&[3.0]).unwrap(), vec![3.0]);
    eprintln!(
        "NCCL world size 1 on {:?}: all_reduce, broadcast, barrier ok",
        Device::Cuda(0)
    );
}

/// A parameter used on rank 0 only: rank 1 contributes zeros (as DDP does for unused
/// parameters), so both ranks end with grad = rank 0's grad / 2, in both GradSync modes; a
/// parameter used by no rank gets a zero gradient.
#[test]
fn grad_sync_handles_parameters_without_gradients() {
    use volttrain::dist::GradSync;
    const NAME: &str = "grad_sync_handles_parameters_without_gradients";
    if let Some(out) = worker_of(NAME) {
        let pg = pg_from_env(60);
        let rank = pg.rank();
        let mut report = serde_json::Map::new();
        for overlap in [false, true] {
            let mk =
                |v: f64| Tensor::full([3], v, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let params = vec![
                ("a".to_string(), mk(1.0)),
                ("b".to_string(), mk(2.0)),
                ("never".to_string(), mk(3.0)),
            ];
            let gs = if overlap {
                GradSync::overlapped(&pg, &params, 25.0).unwrap()
            } else {
                GradSync::new(&params, 25.0).unwrap()
            };
            let (a, b) = (&params[0].1, &params[1].1);
            // loss = sum(a * (rank + 1)) [+ sum(b * b) on rank 0]
            let mut loss = (a * (rank as f64 + 1.0)).sum(Kind::Float);
            if rank == 0 {
                loss += (b * b).sum(Kind::Float);
            }
            loss.backward();
            gs.sync(&pg).unwrap();
            let key = if overlap { "overlapped" } else { "sync" };
            report.insert(
                key.into(),
                serde_json::json!({
                    "a": to_vec(&a.grad()),
                    "b": to_vec(&b.grad()),
                    "never": to_vec(&params[2].1.grad()),
                }),
            );
        }
        let path = out.join(format!("rank{rank}.json"));
        std::fs::write(path, serde_json::Value::Object(report).to_string()).unwrap();
        return;
    }
    let out = tempfile::tempdir().unwrap();
    launch::spawn_workers(2, &exe(), &worker_args(NAME), &worker_env(NAME, out.path())).unwrap();
    for rank in 0..2 {
        let p = out.path().join(format!("rank{rank}.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for mode in ["sync", "overlapped"] {
            let f = |k: &str| -> Vec<f64> {
                let arr = v[mode][k].as_array().unwrap();
                arr.iter().map(|x| x.as_f64().unwrap()).collect()
            };
            // d/da: mean of 1 and 2; d/db: rank 0's 2 * b = 4, halved; never used: 0
            assert_eq!(f("a"), vec![1.5; 3], "rank {rank} {mode}");
            assert_eq!(f("b"), vec![2.0; 3], "rank {rank} {mode}");
            assert_eq!(f("never"), vec![0.0; 3], "rank {rank} {mode}");
        }
    }
}

/// A rank whose peers never show up fails the rendezvous after the timeout instead of waiting
/// forever: rank 0 (serving the store, waiting for its worker) and rank 1 (no server to reach).
#[test]
fn missing_peer_fails_rendezvous_within_the_timeout() {
    const TIMEOUT: u64 = 2;
    let cfg = DistConfig {
        timeout_secs: TIMEOUT,
        ..Default::default()
    };
    for rank in [0, 1] {
        let env = DistEnv {
            rank,
            world_size: 2,
            local_rank: rank,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(launch::free_port().unwrap()),
        };
        let t0 = Instant::now();
        let e = ProcessGroup::new(&env, &cfg).unwrap_err().to_string();
        let took = t0.elapsed();
        eprintln!("rank {rank} alone: failed after {took:?}: {e}");
        assert!(
            e.contains(&format!("rank {rank} of 2 at 127.0.0.1:")),
            "{e}"
        );
        assert!(
            took >= Duration::from_millis(TIMEOUT * 1000 / 2),
            "{took:?}"
        );
        assert!(took < Duration::from_secs(TIMEOUT + 20), "{took:?}");
    }
}
