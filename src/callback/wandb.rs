//! Weights & Biases, through the user's own `wandb` Python package run as a sidecar process.
//!
//! Why a sidecar: W&B has no Rust SDK, and what `wandb` writes (the `.wandb` transaction log of
//! protobuf records, the run files, the sync protocol with the server) is internal to it and
//! changes between releases. Driving the installed package keeps every W&B feature the user
//! configured (login, `WANDB_*` variables, offline mode and `wandb sync`, self-hosted servers)
//! working as in a Python script. The sidecar is a small script shipped inside VoltTrain
//! (`wandb_sidecar.py`, written to a temporary file at run time) that reads JSON lines on its
//! stdin: the resolved config once, one line per logged step or eval, the run summary, finish.
//!
//! The pipe is written by a worker thread behind a bounded queue ([`super::tracker`]): a slow,
//! dead or hung sidecar costs dropped (and counted) points, never a stalled step.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::tracker::{
    OnError, Point, Sink, SummaryTally, TrackerOptions, TrackerReport, Worker, push_eval,
    push_step, run_config,
};
use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

const SIDECAR: &str = include_str!("wandb_sidecar.py");
const PYTHON_KEY: &str = "callbacks.wandb.python";

/// `wandb.init(mode=...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WandbMode {
    /// Log to the W&B server.
    Online,
    /// Write the run locally under `dir` (`wandb sync` uploads it later).
    Offline,
    /// Log nothing (W&B calls become no-ops).
    Disabled,
}

fn default_python() -> String {
    "python3".into()
}
fn default_queue() -> usize {
    TrackerOptions::default().queue_size
}
fn default_finish_timeout() -> f64 {
    TrackerOptions::default().finish_timeout_secs
}
fn default_flush() -> f64 {
    TrackerOptions::default().flush_secs
}
fn default_start_timeout() -> f64 {
    60.0
}
fn default_nice() -> i32 {
    19
}

/// `callbacks: [{name: wandb, ...}]`. Unset keys are left to `wandb` (and its `WANDB_*`
/// environment variables).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WandbConfig {
    /// W&B project; unset: left to `wandb` (`WANDB_PROJECT`).
    pub project: Option<String>,
    /// W&B entity (user or team); unset: left to `wandb` (`WANDB_ENTITY`).
    pub entity: Option<String>,
    /// The run's display name (`wandb.init(name=...)`).
    pub run_name: Option<String>,
    /// `online`, `offline` or `disabled`; default: `WANDB_MODE`, else online.
    pub mode: Option<WandbMode>,
    /// Tags of the run.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Group of the run (runs of one experiment).
    pub group: Option<String>,
    /// Notes (a longer description) of the run.
    pub notes: Option<String>,
    /// Where `wandb/` is written; default `WANDB_DIR` when set, else the run's output
    /// directory.
    pub dir: Option<PathBuf>,
    /// The Python interpreter that has `wandb` installed (default `python3`).
    #[serde(default = "default_python")]
    pub python: String,
    /// Seconds the sidecar may go without progress while it imports `wandb` at the start
    /// (default 60). On Linux the clock restarts whenever the sidecar is seen running or
    /// runnable or has had CPU time, so a sidecar slowed by training on a busy machine is waited
    /// for (up to ten times this) and a hung one is not.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: f64,
    /// CPU niceness (0-19, Linux) of the sidecar and of the W&B service it starts, from its
    /// first instruction: 19 (default) runs W&B's start-up and logging on cores training
    /// leaves idle, so they never slow the steps; 0 runs them at training's priority.
    #[serde(default = "default_nice")]
    pub nice: i32,
    /// `warn` (default): drop and count what cannot be delivered; `fail`: stop the run.
    #[serde(default)]
    pub on_error: OnError,
    /// Points held while the sidecar is busy; more are dropped and counted (default 1024).
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// Seconds the end of the run waits for queued points and `run.finish()` (default 60).
    #[serde(default = "default_finish_timeout")]
    pub finish_timeout_secs: f64,
    /// Seconds points are gathered before one batched delivery (default 1).
    #[serde(default = "default_flush")]
    pub flush_secs: f64,
}

impl Default for WandbConfig {
    fn default() -> Self {
        WandbConfig {
            project: None,
            entity: None,
            run_name: None,
            mode: None,
            tags: Vec::new(),
            group: None,
            notes: None,
            dir: None,
            python: default_python(),
            start_timeout_secs: default_start_timeout(),
            nice: default_nice(),
            on_error: OnError::Warn,
            queue_size: default_queue(),
            finish_timeout_secs: default_finish_timeout(),
            flush_secs: default_flush(),
        }
    }
}

impl WandbConfig {
    fn tracker(&self) -> TrackerOptions {
        TrackerOptions {
            on_error: self.on_error,
            queue_size: self.queue_size,
            finish_timeout_secs: self.finish_timeout_secs,
            flush_secs: self.flush_secs,
        }
    }

    /// Checks the values (the section name is `callbacks.wandb` in messages).
    pub fn validate(&self) -> Result<()> {
        self.tracker().validate("callbacks.wandb")?;
        if !(self.start_timeout_secs.is_finite() && self.start_timeout_secs > 0.0) {
            return Err(Error::config(
                "callbacks.wandb.start_timeout_secs",
                "must be a number of seconds > 0",
            ));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(Error::config(
                "callbacks.wandb.nice",
                format!(
                    "{} is not a niceness VoltTrain can set; use 0 (training's priority) to 19 \
                     (lowest, the default)",
                    self.nice
                ),
            ));
        }
        if self.python.trim().is_empty() {
            return Err(Error::config(
                "callbacks.wandb.python",
                "empty; name a Python interpreter that has `wandb` installed",
            ));
        }
        Ok(())
    }
}

/// The reference system's W&B keys under `training:` (`use_wandb`, `wandb_project`,
/// `wandb_entity`, `wandb_run_name`, `wandb_mode`, `wandb_tags`) as a `wandb` callback section.
/// `None` when `use_wandb` is false; an error when W&B keys are set without it (they would be
/// silently ignored).
pub fn shorthand_section(t: &crate::config::TrainingSection) -> Result<Option<serde_yaml::Value>> {
    if !t.use_wandb {
        let set = [
            ("wandb_project", t.wandb_project.is_some()),
            ("wandb_entity", t.wandb_entity.is_some()),
            ("wandb_run_name", t.wandb_run_name.is_some()),
            ("wandb_mode", t.wandb_mode.is_some()),
            ("wandb_tags", !t.wandb_tags.is_empty()),
        ];
        if let Some((k, _)) = set.iter().find(|(_, s)| *s) {
            return Err(Error::config(
                format!("training.{k}"),
                "W&B settings without `training.use_wandb: true` would be ignored; set \
                 `use_wandb: true` to log to W&B, or remove them",
            ));
        }
        return Ok(None);
    }
    let mut m = serde_yaml::Mapping::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            m.insert(k.into(), v.as_str().into());
        }
    };
    put("project", &t.wandb_project);
    put("entity", &t.wandb_entity);
    put("run_name", &t.wandb_run_name);
    put("mode", &t.wandb_mode);
    if !t.wandb_tags.is_empty() {
        m.insert(
            "tags".into(),
            serde_yaml::Value::Sequence(t.wandb_tags.iter().map(|s| s.as_str().into()).collect()),
        );
    }
    Ok(Some(serde_yaml::Value::Mapping(m)))
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Op<'a> {
    Init {
        settings: serde_json::Value,
    },
    Log {
        step: u64,
        data: &'a BTreeMap<String, f64>,
    },
    Summary {
        data: &'a BTreeMap<String, serde_json::Value>,
    },
    Finish {
        exit_code: i32,
    },
}

#[derive(Deserialize)]
struct Event {
    event: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    logged: Option<u64>,
}

/// The sidecar process, shared by the worker thread (which starts it) and the callback (which
/// reaps or kills it at the end).
type SharedChild = Arc<Mutex<Option<Child>>>;

/// Ends the sidecar, if it was started and is still there.
fn kill_sidecar(child: &SharedChild) {
    if let Ok(mut c) = child.lock()
        && let Some(c) = c.as_mut()
    {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts the sidecar and writes the ops to its stdin (on the worker thread).
struct Pipe {
    stdin: Option<ChildStdin>,
    events: Option<Receiver<String>>,
    settings: serde_json::Value,
    python: String,
    script: PathBuf,
    nice: i32,
    start_timeout: Duration,
    child: SharedChild,
}

impl Pipe {
    /// Starts the sidecar (on the worker thread, whose niceness it inherits: `nice`, set by the
    /// worker). Returns its process id and its stdout lines.
    fn spawn(&mut self) -> Result<(u32, Receiver<String>)> {
        let mut child = Command::new(&self.python)
            .arg(&self.script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                Error::config(
                    PYTHON_KEY,
                    format!(
                        "cannot start `{}` for the W&B sidecar: {e}; set `python:` to an \
                         interpreter that has `wandb` installed",
                        self.python
                    ),
                )
            })?;
        self.stdin = child.stdin.take();
        let (tx, events) = channel::<String>();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    match line {
                        Ok(l) => {
                            if tx.send(l).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        }
        let pid = child.id();
        tracing::info!(
            "wandb: sidecar `{}` started (pid {pid}, nice {})",
            self.python,
            self.nice
        );
        if let Ok(mut c) = self.child.lock() {
            *c = Some(child);
        }
        Ok((pid, events))
    }

    /// The JSON line of `op`, newline included.
    fn line(op: &Op<'_>) -> Result<String> {
        let mut line = serde_json::to_string(op).map_err(|e| wandb_error(e.to_string()))?;
        line.push('\n');
        Ok(line)
    }

    /// The op a point becomes (an artifact becomes none: the sidecar does not upload).
    fn op<'a>(&self, point: &'a Point) -> Option<Op<'a>> {
        match point {
            Point::Config(cfg) => {
                let mut settings = self.settings.clone();
                if let Some(o) = settings.as_object_mut() {
                    o.insert("config".into(), cfg.clone());
                }
                Some(Op::Init { settings })
            }
            Point::Metrics { step, values, .. } => Some(Op::Log {
                step: *step,
                data: values,
            }),
            Point::Summary(s) => Some(Op::Summary { data: s }),
            Point::Artifact(_) => None,
        }
    }

    /// Writes `text` (whole lines) to the sidecar's stdin in one write.
    fn write_text(&mut self, text: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| wandb_error("the sidecar's stdin is closed"))?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| wandb_error(format!("the sidecar stopped reading: {e}")))
    }

    fn write(&mut self, op: &Op<'_>) -> Result<()> {
        let line = Self::line(op)?;
        self.write_text(&line)
    }
}

impl Sink for Pipe {
    /// Starts the sidecar and waits for its first word: `ready`, or `missing` (a config error:
    /// the run stops, naming the package and the install command).
    fn start(&mut self) -> Result<()> {
        let (pid, events) = self.spawn()?;
        let begin = Instant::now();
        // A slow start on a busy machine (the sidecar runs at low priority) is runnable or
        // keeps getting CPU time; a hung one sleeps. Wait while there is progress, up to ten
        // times the timeout.
        let cap = self.start_timeout * 10;
        let mut progress = (begin, process_progress(pid).map(|p| p.1));
        loop {
            let now = Instant::now();
            if let Some((working, t)) = process_progress(pid)
                && (working || Some(t) != progress.1)
            {
                progress = (now, Some(t));
            }
            let stalled = now.duration_since(progress.0) >= self.start_timeout;
            if stalled || now.duration_since(begin) >= cap {
                return Err(wandb_error(format!(
                    "the W&B sidecar (`{}`) did not import `wandb` within {:.0} s{} \
                     (start_timeout_secs)",
                    self.python,
                    now.duration_since(begin).as_secs_f64(),
                    if stalled {
                        format!(
                            ", the last {:.0} s without progress",
                            self.start_timeout.as_secs_f64()
                        )
                    } else {
                        String::new()
                    }
                )));
            }
            let line = match events.recv_timeout(Duration::from_millis(500)) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(wandb_error(format!(
                        "the W&B sidecar (`{}`) exited at start; see its messages above",
                        self.python
                    )));
                }
            };
            // anything else is a stray line printed on import
            let Ok(ev) = serde_json::from_str::<Event>(&line) else {
                continue;
            };
            match ev.event.as_str() {
                "ready" => {
                    tracing::info!(
                        "wandb: sidecar ready (wandb {})",
                        ev.version.as_deref().unwrap_or("?")
                    );
                    self.events = Some(events);
                    return Ok(());
                }
                "missing" => {
                    return Err(Error::config(
                        PYTHON_KEY,
                        format!(
                            "W&B logging needs the Python package `wandb`, which `{}` cannot \
                             import ({}). Install it with `pip install wandb` (into that \
                             interpreter), or set `python:` to an interpreter that has it",
                            self.python,
                            ev.detail.unwrap_or_default()
                        ),
                    ));
                }
                _ => continue,
            }
        }
    }

    fn send(&mut self, point: &Point) -> Result<()> {
        match self.op(point) {
            Some(op) => self.write(&op),
            None => Ok(()),
        }
    }

    /// The batch's lines in one pipe write.
    fn send_batch(&mut self, points: &[Point]) -> std::result::Result<(), (usize, Error)> {
        let mut text = String::new();
        for p in points {
            if let Some(op) = self.op(p) {
                text.push_str(&Self::line(&op).map_err(|e| (0, e))?);
            }
        }
        self.write_text(&text).map_err(|e| (0, e))
    }

    fn finish(&mut self, failed: bool) -> Result<Option<u64>> {
        self.write(&Op::Finish {
            exit_code: i32::from(failed),
        })?;
        drop(self.stdin.take());
        // The sidecar answers after `run.finish()`; the worker's deadline bounds the wait.
        for line in self.events.iter().flat_map(|rx| rx.iter()) {
            if let Ok(ev) = serde_json::from_str::<Event>(&line)
                && ev.event == "finished"
            {
                return Ok(ev.logged);
            }
        }
        Err(wandb_error(
            "the sidecar exited before confirming `run.finish()` (see its messages above)",
        ))
    }

    fn nice(&self) -> i32 {
        self.nice
    }

    fn sends_are_final(&self) -> bool {
        false
    }
}

/// The W&B callback. Only the main process (rank 0) starts a sidecar and logs.
pub struct Wandb {
    cfg: WandbConfig,
    config: Option<serde_json::Value>,
    script: Option<tempfile::TempPath>,
    child: Option<SharedChild>,
    worker: Option<Worker>,
    tally: SummaryTally,
}

impl Wandb {
    /// Checks `cfg`; the sidecar starts with the tracker's first delivery (main process only).
    pub fn new(cfg: WandbConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Wandb {
            cfg,
            config: None,
            script: None,
            child: None,
            worker: None,
            tally: SummaryTally::default(),
        })
    }

    /// Logs `config` (instead of the run's `config.resolved.yaml`) as the run config.
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = Some(config);
        self
    }

    fn settings(&self, output_dir: &Path) -> serde_json::Value {
        let dir = self.cfg.dir.clone().or_else(|| {
            std::env::var_os("WANDB_DIR")
                .is_none()
                .then(|| output_dir.to_path_buf())
        });
        serde_json::json!({
            "project": self.cfg.project,
            "entity": self.cfg.entity,
            "name": self.cfg.run_name,
            "mode": self.cfg.mode,
            "tags": (!self.cfg.tags.is_empty()).then_some(&self.cfg.tags),
            "group": self.cfg.group,
            "notes": self.cfg.notes,
            "dir": dir,
        })
    }

    /// Writes the sidecar script and starts the worker, which starts the sidecar at its first
    /// delivery and waits for it to import `wandb` (`start_timeout_secs`); training never waits
    /// for Python.
    fn start(&mut self, output_dir: &Path) -> Result<()> {
        let script = tempfile::Builder::new()
            .prefix("volttrain-wandb-")
            .suffix(".py")
            .tempfile()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        std::fs::write(script.path(), SIDECAR).map_err(|e| Error::io(script.path(), e))?;
        let script = script.into_temp_path();
        let dir = self.cfg.dir.as_deref().unwrap_or(output_dir);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let child: SharedChild = Arc::new(Mutex::new(None));
        self.child = Some(child.clone());
        let pipe = Pipe {
            stdin: None,
            events: None,
            settings: self.settings(output_dir),
            python: self.cfg.python.clone(),
            script: script.to_path_buf(),
            nice: self.cfg.nice,
            start_timeout: Duration::from_secs_f64(self.cfg.start_timeout_secs),
            child: child.clone(),
        };
        self.script = Some(script);
        let kill: Box<dyn FnOnce() + Send> = Box::new(move || kill_sidecar(&child));
        self.worker = Some(Worker::spawn(
            "wandb",
            self.cfg.tracker(),
            Box::new(pipe),
            Some(kill),
        )?);
        Ok(())
    }

    fn kill_child(&mut self) {
        if let Some(c) = self.child.take() {
            kill_sidecar(&c);
        }
    }

    /// Lets the sidecar exit on its own for a moment after `finish`, then ends it.
    fn reap(&mut self) {
        if let Some(c) = self.child.take()
            && let Ok(mut c) = c.lock()
            && let Some(c) = c.as_mut()
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => break,
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn finish(&mut self, timeout: Option<Duration>) -> Result<()> {
        let r = match self.worker.as_mut() {
            Some(w) => w.finish(timeout).map(|_| ()),
            None => Ok(()),
        };
        self.reap();
        r
    }

    /// Counts of delivered and dropped points (after the run).
    pub fn report(&self) -> Option<&TrackerReport> {
        self.worker.as_ref().and_then(Worker::report)
    }
}

impl Callback for Wandb {
    fn name(&self) -> &str {
        "wandb"
    }
    fn on_fit_start(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        if !ctl.is_main || self.worker.is_some() {
            return Ok(());
        }
        self.start(ctl.output_dir)?;
        let config = run_config(self.config.as_ref(), ctl.output_dir)?;
        if let Some(w) = self.worker.as_mut() {
            w.push(Point::Config(config))?;
        }
        Ok(())
    }
    fn on_step_end(&mut self, _: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        push_step(&mut self.worker, &mut self.tally, m)
    }
    fn on_eval_end(&mut self, _: &mut Control<'_>, m: &EvalMetrics) -> Result<()> {
        push_eval(&mut self.worker, &mut self.tally, m)
    }
    fn on_fit_end(&mut self, _: &mut Control<'_>) -> Result<()> {
        if let Some(w) = self.worker.as_mut() {
            let dropped = w.dropped_so_far();
            w.push(Point::Summary(self.tally.values(dropped)))?;
        }
        self.finish(None)
    }
    fn on_error(&mut self, _: &Error) {
        let _ = self.finish(Some(Duration::from_secs(10)));
    }
    fn summary(&self) -> Option<serde_json::Value> {
        self.report().and_then(|r| serde_json::to_value(r).ok())
    }
}

impl Drop for Wandb {
    fn drop(&mut self) {
        if self.worker.as_ref().is_some_and(|w| w.report().is_none()) {
            let _ = self.finish(Some(Duration::from_secs(5)));
        }
        self.kill_child();
    }
}

/// What `/proc/<pid>/stat` says of process `pid`: whether it is working (running, runnable or in
/// uninterruptible I/O: state `R` or `D`) and its CPU time so far (user + system, clock ticks);
/// `None` where that cannot be read (not Linux, or the process is gone).
fn process_progress(pid: u32) -> Option<(bool, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the parenthesized command name: state is field 3, utime 14, stime 15
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let working = matches!(f.next()?, "R" | "D");
    let mut f = f.skip(10);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((working, utime + stime))
}

/// An [`Error::Tracker`] of the wandb tracker.
fn wandb_error(msg: impl Into<String>) -> Error {
    Error::Tracker {
        tracker: "wandb".into(),
        msg: msg.into(),
    }
}
