//! The `mlflow` callback against a real `mlflow server` (SQLite backend, started here on
//! 127.0.0.1 from the MLflow venv that `tools/provision.sh --reference` makes): the bundled tiny
//! job's params, metrics, tags and final adapter, read back with MLflow's own Python client
//! (`reference/mlflow_read.py`). A dead or hung server costs dropped points, never the run
//! (unless `on_error: fail`).

mod tracker_support;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracker_support::{expected, job, root, run, summary};

fn mlflow_python() -> String {
    std::env::var("VOLTTRAIN_MLFLOW_PYTHON").unwrap_or_else(|_| {
        panic!(
            "VOLTTRAIN_MLFLOW_PYTHON is not set: run the tests through `./dev test` (it runs \
             tools/provision.sh --reference, which makes the MLflow venv)"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `mlflow server` in its own process group; killed (the whole group) when dropped, also when
/// the test fails.
struct Server {
    child: Child,
    uri: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path) -> Server {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = dir.join("mlflow-server.log");
        let child = Command::new(mlflow_python())
            .args(["-m", "mlflow", "server", "--backend-store-uri"])
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("mlflow-server.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let s = Server {
            child,
            uri: format!("http://127.0.0.1:{port}"),
            log,
        };
        s.wait_healthy(dir);
        s
    }

    fn wait_healthy(&self, dir: &Path) {
        // a loaded 2-core machine takes up to a minute (database migrations, imports)
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(240) {
            if let Ok(mut c) = std::net::TcpStream::connect(self.uri.trim_start_matches("http://"))
            {
                use std::io::Write;
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = c.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.") && buf.contains(" 200 ") {
                    println!("mlflow server up in {:.1} s", t.elapsed().as_secs_f64());
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let err = std::fs::read_to_string(dir.join("mlflow-server.err")).unwrap_or_default();
        panic!("mlflow server did not come up in 240 s:\n{err}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test started; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        let _ = &self.log;
    }
}

#[test]
fn real_server_holds_params_metrics_tags_and_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: mlflow, tracking_uri: '{}', experiment: volttrain-test, run_name: tiny-sft, \
             tags: {{team: volt, purpose: test}}, log_adapter: true}}]",
            server.uri
        ),
        "",
    );
    let out = run(&cfg, &[]);
    let s = summary(&out);
    let o = dir.path().join("out");
    let (want, lines) = expected(&o);
    // the config, every metrics.jsonl line, the summary, the adapter
    let points = 1 + lines as u64 + 2;
    assert_eq!(s["callbacks"]["mlflow"]["points"], points, "{s}");
    assert_eq!(s["callbacks"]["mlflow"]["delivered"], points, "{s}");
    assert_eq!(s["callbacks"]["mlflow"]["dropped"], 0, "{s}");

    let py = Command::new(mlflow_python())
        .arg(root().join("reference/mlflow_read.py"))
        .arg(&server.uri)
        .args(["volttrain-test", "tiny-sft"])
        .arg(o.join("config.resolved.yaml"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&py.stdout).trim()).unwrap();
    assert_eq!(r["status"], "FINISHED");

    // params: the flattened resolved config, each one equal
    let params = r["params"].as_object().unwrap();
    let exp = r["expected_params"].as_object().unwrap();
    assert!(exp.len() > 20, "{exp:?}");
    assert_eq!(params, exp);
    assert_eq!(r["params"]["training.lr"], "0.02");
    assert_eq!(r["params"]["lora.rank"], "8");

    // metrics: every metrics.jsonl value at its step
    let mut checked = 0;
    for (step, row) in &want {
        for (k, v) in row {
            let hist = r["metrics"][k]
                .as_array()
                .unwrap_or_else(|| panic!("no {k}: {r}"));
            let at: Vec<f64> = hist
                .iter()
                .filter(|p| p[0].as_u64() == Some(*step))
                .map(|p| p[1].as_f64().unwrap())
                .collect();
            assert_eq!(at, vec![*v], "{k} at step {step}");
            checked += 1;
        }
    }
    assert!(checked >= 6 * 6 + 3 * 3, "{checked}");
    for (k, hist) in r["metrics"].as_object().unwrap() {
        let n = want.values().filter(|row| row.contains_key(k)).count();
        assert_eq!(hist.as_array().unwrap().len(), n, "{k}: no extra points");
    }

    // tags: the user's, VoltTrain's, the summary
    assert_eq!(r["tags"]["team"], "volt");
    assert_eq!(r["tags"]["purpose"], "test");
    assert_eq!(r["tags"]["mlflow.runName"], "tiny-sft");
    assert_eq!(r["tags"]["volttrain.summary.steps"], "6");
    assert_eq!(r["tags"]["volttrain.summary.tracker_dropped"], "0");
    let final_loss: f64 = r["tags"]["volttrain.summary.final_train_loss"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(final_loss, want[&6]["train/loss"]);

    // the final adapter, byte for byte what the run saved last
    let arts: Vec<&str> = r["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(arts.contains(&f), "{arts:?}");
    }
    let run_id = r["run_id"].as_str().unwrap();
    let stored = std::fs::read(
        dir.path()
            .join("artifacts")
            .join("1")
            .join(run_id)
            .join("artifacts/adapter/adapter_model.safetensors"),
    )
    .unwrap();
    let saved = std::fs::read(o.join("epoch-2/adapter_model.safetensors")).unwrap();
    assert_eq!(stored, saved);
    drop(server);
}

#[test]
fn a_dead_server_costs_points_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there any more
    let cb = |extra: &str| {
        format!("[{{name: mlflow, tracking_uri: 'http://127.0.0.1:{port}', experiment: x{extra}}}]")
    };
    let out = run(&job(dir.path(), &cb(""), ""), &[]);
    let s = summary(&out);
    let m = &s["callbacks"]["mlflow"];
    assert_eq!(s["steps"], 6, "training finished");
    assert_eq!(m["points"], 11, "{s}");
    assert_eq!(m["delivered"], 0, "{s}");
    assert_eq!(m["dropped"], 11, "{s}");
    assert!(m["error"].as_str().unwrap().contains("127.0.0.1"), "{s}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WARN") && err.contains("mlflow"), "{err}");

    // A second run into the same output directory: over the first one's checkpoints.
    let again = "  overwrite_output_dir: true";
    let out = run(&job(dir.path(), &cb(", on_error: fail"), again), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mlflow") && err.contains("on_error: fail"),
        "{err}"
    );
}

#[test]
fn a_hung_server_is_abandoned_after_the_finish_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // accepts connections and never answers
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: mlflow, tracking_uri: 'http://127.0.0.1:{port}', timeout_secs: 3600, \
             finish_timeout_secs: 1}}]"
        ),
        "",
    );
    let t = Instant::now();
    let s = summary(&run(&cfg, &[]));
    let m = &s["callbacks"]["mlflow"];
    assert_eq!(s["steps"], 6);
    assert_eq!(m["points"], 11, "{s}");
    assert_eq!(m["dropped"], 11, "{s}");
    assert!(
        m["error"].as_str().unwrap().contains("did not finish"),
        "{s}"
    );
    println!("run with a hung server: {:.1} s", t.elapsed().as_secs_f64());
    // the request that never gets an answer (3600 s timeout) did not hold the run
    assert!(t.elapsed().as_secs() < 1800, "{:?}", t.elapsed());
}
