//! The `wandb` callback: the bundled tiny job logged to an offline W&B run through the real
//! `wandb` package (no network), read back from the run's `.wandb` file with wandb's own
//! protobuf records (`reference/wandb_read.py`) and compared with `metrics.jsonl` and
//! `config.resolved.yaml`; the `training.use_wandb` shorthand; the missing-package error; a
//! sidecar that dies or hangs costs dropped points, never the run (unless `on_error: fail`);
//! under data parallel only rank 0 logs.

mod tracker_support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tracker_support::{expected, job, ref_python, root, run, run_args, script, summary};

/// The offline run under `wandb_dir`, as `reference/wandb_read.py` reads it.
fn read_back(wandb_dir: &Path) -> serde_json::Value {
    let out = Command::new(ref_python())
        .arg(root().join("reference/wandb_read.py"))
        .arg(wandb_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

fn offline_env(wandb_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("WANDB_MODE", "offline".into()),
        ("WANDB_DIR", wandb_dir.display().to_string()),
        ("WANDB_SILENT", "true".into()),
        // no network, and nothing written outside the test's directory
        (
            "WANDB_CONFIG_DIR",
            wandb_dir.join("config").display().to_string(),
        ),
        (
            "WANDB_CACHE_DIR",
            wandb_dir.join("cache").display().to_string(),
        ),
        (
            "WANDB_DATA_DIR",
            wandb_dir.join("data").display().to_string(),
        ),
    ]
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

#[test]
fn offline_run_holds_every_metric_at_every_step_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let wandb_dir = dir.path().join("wandb-dir");
    std::fs::create_dir_all(&wandb_dir).unwrap();
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, project: volttrain-test, run_name: tiny-sft, mode: offline, \
             tags: [tiny, sft], python: '{}'}}]",
            ref_python()
        ),
        "",
    );
    let env = offline_env(&wandb_dir);
    let out = run(&cfg, &env_refs(&env));
    let s = summary(&out);
    let o = dir.path().join("out");
    let (want, lines) = expected(&o);
    // the config, every metrics.jsonl line, the summary
    let points = 1 + lines as u64 + 1;
    assert_eq!(s["callbacks"]["wandb"]["points"], points, "{s}");
    assert_eq!(s["callbacks"]["wandb"]["delivered"], points, "{s}");
    assert_eq!(s["callbacks"]["wandb"]["dropped"], 0, "{s}");

    let r = read_back(&wandb_dir);
    assert_eq!(r["run"]["project"], "volttrain-test");
    assert_eq!(r["run"]["name"], "tiny-sft");
    assert_eq!(r["run"]["tags"], serde_json::json!(["tiny", "sft"]));
    assert_eq!(r["exit_code"], 0);

    // every metric at every step, exactly (both sides are shortest round-trip decimals)
    assert_eq!(
        want.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5, 6]
    );
    let mut checked = 0;
    for (step, row) in &want {
        let got = &r["history"][step.to_string()];
        assert!(got.is_object(), "no W&B history row at step {step}: {r}");
        for (k, v) in row {
            assert_eq!(
                got[k].as_f64(),
                Some(*v),
                "step {step} key {k}: W&B {} vs metrics.jsonl {v}",
                got[k]
            );
            checked += 1;
        }
    }
    assert!(checked >= 6 * 6 + 3 * 3, "{checked} values compared");
    assert_eq!(
        r["history"].as_object().unwrap().len(),
        want.len(),
        "no extra steps"
    );

    // the resolved config, once, as written to config.resolved.yaml
    let resolved: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(o.join("config.resolved.yaml")).unwrap())
            .unwrap();
    assert_eq!(r["config"], resolved);

    // the run summary
    let last_train = want[&6]["train/loss"];
    let last_eval = want[&6]["eval/eval_loss"];
    assert_eq!(r["summary"]["final_train_loss"].as_f64(), Some(last_train));
    assert_eq!(r["summary"]["final_eval_loss"].as_f64(), Some(last_eval));
    assert_eq!(r["summary"]["steps"], 6);
    assert_eq!(r["summary"]["tracker_dropped"], 0);
    assert_eq!(s["final_train_loss"].as_f64(), Some(last_train));
}

#[test]
fn training_shorthand_uses_the_reference_keys() {
    let dir = tempfile::tempdir().unwrap();
    let wandb_dir = dir.path().join("wandb-dir");
    std::fs::create_dir_all(&wandb_dir).unwrap();
    // the shorthand has no `python:`; `python3` on PATH runs the reference stack's
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    script(&bin, "python3", &format!("exec '{}' \"$@\"", ref_python()));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cfg = job(
        dir.path(),
        "[]",
        "  use_wandb: true\n  wandb_project: ref-project\n  wandb_run_name: ref-run\n  \
         wandb_mode: offline\n  wandb_tags: [reference]\n  max_steps: 2",
    );
    let mut env = offline_env(&wandb_dir);
    env.push(("PATH", path));
    let s = summary(&run(&cfg, &env_refs(&env)));
    assert_eq!(s["callbacks"]["wandb"]["dropped"], 0, "{s}");
    let r = read_back(&wandb_dir);
    assert_eq!(r["run"]["project"], "ref-project");
    assert_eq!(r["run"]["name"], "ref-run");
    assert_eq!(r["run"]["tags"], serde_json::json!(["reference"]));
    assert_eq!(r["config"]["training"]["use_wandb"], true);
    assert!(r["history"]["2"]["train/loss"].is_f64(), "{r}");

    // W&B keys without `use_wandb` would do nothing: refused, naming the key
    // (a second run into the same output directory: over the first one's checkpoints)
    let cfg = job(
        dir.path(),
        "[]",
        "  wandb_project: ref-project\n  overwrite_output_dir: true",
    );
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("training.wandb_project") && err.contains("use_wandb"),
        "{err}"
    );
}

#[test]
fn missing_wandb_names_the_package_and_the_install_command() {
    let dir = tempfile::tempdir().unwrap();
    // the reference Python without its site-packages: `import wandb` fails
    let py = script(
        dir.path(),
        "python-without-wandb",
        &format!("exec '{}' -S \"$@\"", ref_python()),
    );
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, mode: offline, python: '{}'}}]",
            py.display()
        ),
        "  max_steps: 1",
    );
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`wandb`"), "{err}");
    assert!(err.contains("pip install wandb"), "{err}");
    assert!(err.contains("callbacks.wandb.python"), "{err}");

    // an interpreter that does not exist: named, with the key to set (a fresh directory: the
    // first run may have saved its step before the sidecar's answer came)
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(
        dir.path(),
        "[{name: wandb, python: /nonexistent/python3}]",
        "  max_steps: 1",
    );
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/python3"), "{err}");
}

const READY: &str = r#"echo '{"event": "ready", "version": "fake"}'"#;

#[test]
fn a_dead_sidecar_costs_points_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // says it is ready, then exits: every write after that fails
    let py = script(dir.path(), "dies", &format!("{READY}\nexit 0"));
    let cb = |extra: &str| {
        format!(
            "[{{name: wandb, mode: offline, python: '{}'{extra}}}]",
            py.display()
        )
    };
    let cfg = job(dir.path(), &cb(""), "");
    let out = run(&cfg, &[]);
    let s = summary(&out);
    let w = &s["callbacks"]["wandb"];
    assert_eq!(s["steps"], 6, "training finished");
    assert_eq!(w["points"], 11, "{s}");
    assert_eq!(w["delivered"], 0, "{s}");
    assert_eq!(w["dropped"], 11, "{s}");
    assert!(w["error"].as_str().unwrap().contains("sidecar"), "{s}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WARN") && err.contains("wandb"), "{err}");

    // on_error: fail stops the run with the reason
    // A second run into the same output directory: over the first one's checkpoints.
    let cfg = job(
        dir.path(),
        &cb(", on_error: fail"),
        "  overwrite_output_dir: true",
    );
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wandb") && err.contains("on_error: fail"),
        "{err}"
    );
}

#[test]
fn a_hung_sidecar_is_abandoned_after_the_finish_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // says it is ready, then never reads nor answers
    let py = script(dir.path(), "hangs", &format!("{READY}\nexec sleep 600"));
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, python: '{}', finish_timeout_secs: 1}}]",
            py.display()
        ),
        "",
    );
    let t = Instant::now();
    let out = run(&cfg, &[]);
    let s = summary(&out);
    let w = &s["callbacks"]["wandb"];
    assert_eq!(s["steps"], 6);
    assert_eq!(w["points"], 11, "{s}");
    assert_eq!(w["dropped"], 11, "nothing confirmed: {s}");
    assert!(
        w["error"].as_str().unwrap().contains("did not finish"),
        "{s}"
    );
    // the run is not held by the hung sidecar: the fit-end callbacks (the tracker closing its
    // run) take the 1 s finish_timeout and the kill, however long training took on this machine
    let closing = s["elapsed_secs"].as_f64().unwrap() - s["train_secs"].as_f64().unwrap();
    println!(
        "run with a hung sidecar: {:.1} s, closing the tracker {closing:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(closing < 30.0, "{s}");
}

#[test]
fn the_sidecar_runs_at_nice_19_and_a_slow_start_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let nice_file = dir.path().join("nice.txt");
    // records its niceness (field 19 of /proc/<pid>/stat), then keeps a core busy for 3 s (in
    // the same process) before it says it is ready (three times start_timeout_secs), then exits
    let py = script(
        dir.path(),
        "slow",
        &format!(
            r#"cut -d' ' -f19 /proc/$$/stat > '{}'
exec bash -c 'while [ $SECONDS -lt 3 ]; do :; done; echo "{{\"event\": \"ready\"}}"'"#,
            nice_file.display()
        ),
    );
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, python: '{}', start_timeout_secs: 1}}]",
            py.display()
        ),
        "",
    );
    let out = run(&cfg, &[]);
    let s = summary(&out);
    let nice = std::fs::read_to_string(&nice_file).unwrap();
    assert_eq!(nice.trim(), "19", "the sidecar's niceness");
    // the start was waited for (it made progress): the sidecar got to `ready`, and the points
    // were lost only because it then exited
    let err = s["callbacks"]["wandb"]["error"].as_str().unwrap();
    assert!(!err.contains("did not import"), "{s}");
    assert!(err.contains("stopped reading"), "{s}");
    assert_eq!(s["steps"], 6, "training finished");
}

#[test]
fn a_sidecar_hung_at_import_is_given_up_after_start_timeout_secs() {
    let dir = tempfile::tempdir().unwrap();
    let py = script(dir.path(), "hangs-at-import", "exec sleep 600");
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, python: '{}', start_timeout_secs: 1, finish_timeout_secs: 10}}]",
            py.display()
        ),
        "",
    );
    let out = run(&cfg, &[]);
    let s = summary(&out);
    let w = &s["callbacks"]["wandb"];
    assert_eq!(s["steps"], 6, "training finished");
    assert_eq!(w["points"], 11, "{s}");
    assert_eq!(w["dropped"], 11, "{s}");
    let err = w["error"].as_str().unwrap();
    assert!(
        err.contains("did not import `wandb`") && err.contains("without progress"),
        "{s}"
    );
}

#[test]
fn only_rank_0_logs_under_data_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let wandb_dir = dir.path().join("wandb-dir");
    std::fs::create_dir_all(&wandb_dir).unwrap();
    let cfg = job(
        dir.path(),
        &format!(
            "[{{name: wandb, project: dp, mode: offline, python: '{}'}}]",
            ref_python()
        ),
        "  max_steps: 2",
    );
    let env = offline_env(&wandb_dir);
    let out = run_args(&cfg, &["--nproc", "2"], &env_refs(&env));
    let s = summary(&out);
    assert_eq!(s["callbacks"]["wandb"]["dropped"], 0, "{s}");
    // `read_back` asserts there is exactly one run: rank 1 started no sidecar
    let r = read_back(&wandb_dir);
    let (want, _) = expected(&dir.path().join("out"));
    for (step, row) in &want {
        for (k, v) in row {
            assert_eq!(
                r["history"][step.to_string()][k].as_f64(),
                Some(*v),
                "{k}@{step}"
            );
        }
    }
}
