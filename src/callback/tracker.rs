//! What the experiment trackers ([`super::Wandb`], [`super::Mlflow`]) share: a worker thread
//! behind a bounded queue, so that a slow, dead or hung tracker never stalls or kills training,
//! and the conversion of VoltTrain's metrics and config into tracker keys.
//!
//! The training thread only ever calls `try_send` on the queue. When the queue is full (the
//! tracker is slower than training, or hangs) or the worker has failed (the sidecar died, the
//! server is gone), the point is dropped and counted, and a warning is logged once. At the end
//! of the run the worker gets [`TrackerOptions::finish_timeout_secs`] to deliver what is
//! queued and close the run; after that it is abandoned (its sidecar killed) and whatever it did
//! not confirm counts as dropped. The counts go into the run summary
//! (`FitSummary::callbacks.<name>`). With `on_error: fail` any of these turns into an error
//! that stops the run instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::callback::{EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

/// What a tracker does when it cannot deliver: `warn` (default: log a warning, drop and count
/// the points, train on) or `fail` (stop the run with an error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Log a warning, drop and count the points, train on.
    #[default]
    Warn,
    /// Stop the run with an error.
    Fail,
}

fn default_queue() -> usize {
    1024
}
fn default_finish_timeout() -> f64 {
    60.0
}
fn default_flush() -> f64 {
    1.0
}

/// Most points in one delivery (MLflow takes 1,000 metrics per `log-batch`; a point holds ~8).
const MAX_BATCH: usize = 100;

/// Options every tracker callback has (flattened into its YAML section).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct TrackerOptions {
    /// `warn` (default) or `fail`.
    #[serde(default)]
    pub on_error: OnError,
    /// Points held while the tracker is busy; more are dropped and counted (default 1024).
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// Seconds the end of the run waits for the tracker to deliver what is queued and close the
    /// run (default 60); then it is abandoned and the undelivered points count as dropped.
    #[serde(default = "default_finish_timeout")]
    pub finish_timeout_secs: f64,
    /// Seconds the worker gathers points before delivering them in one batch (default 1; the
    /// end of the run delivers at once). 0 delivers every point as it comes.
    #[serde(default = "default_flush")]
    pub flush_secs: f64,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            on_error: OnError::Warn,
            queue_size: default_queue(),
            finish_timeout_secs: default_finish_timeout(),
            flush_secs: default_flush(),
        }
    }
}

impl TrackerOptions {
    pub(crate) fn validate(&self, section: &str) -> Result<()> {
        if self.queue_size == 0 {
            return Err(Error::config(
                format!("{section}.queue_size"),
                "must be at least 1",
            ));
        }
        if !(self.finish_timeout_secs.is_finite() && self.finish_timeout_secs >= 0.0) {
            return Err(Error::config(
                format!("{section}.finish_timeout_secs"),
                "must be a number of seconds >= 0",
            ));
        }
        if !(self.flush_secs.is_finite() && (0.0..=3600.0).contains(&self.flush_secs)) {
            return Err(Error::config(
                format!("{section}.flush_secs"),
                "must be a number of seconds between 0 and 3600",
            ));
        }
        Ok(())
    }
}

/// One thing to deliver. Each counts as one point.
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    /// The resolved run config (nested, as in `config.resolved.yaml`).
    Config(serde_json::Value),
    /// Metrics at an optimizer step (keys as [`step_values`] / [`eval_values`] make them).
    Metrics {
        /// The optimizer step the values belong to.
        step: u64,
        /// Metric values by key (`train/loss`, `eval/eval_loss`, ...).
        values: BTreeMap<String, f64>,
        /// When it was measured, in milliseconds since the Unix epoch.
        time_ms: u64,
    },
    /// The run summary (final values).
    Summary(BTreeMap<String, serde_json::Value>),
    /// A directory to upload (the final adapter).
    Artifact(PathBuf),
}

impl Point {
    /// Metrics at `step`, stamped now.
    pub fn metrics(step: u64, values: BTreeMap<String, f64>) -> Point {
        Point::Metrics {
            step,
            values,
            time_ms: now_ms(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The delivering side of a tracker; it runs on the worker thread and may block.
pub trait Sink: Send + 'static {
    /// Runs on the worker thread before the first delivery (connect, start a sidecar): at the
    /// first flush (`flush_secs` after the first point) or at the end of the run, whichever
    /// comes first, so a tracker's start-up never competes with the first steps. An
    /// [`Error::Config`] here is the user's to fix (a missing package): it stops the run
    /// whatever `on_error` says; any other error counts as the tracker failing.
    fn start(&mut self) -> Result<()> {
        Ok(())
    }
    /// CPU niceness of the worker thread, and of any process it starts (default 19, the
    /// lowest: the tracker uses cores training leaves idle).
    fn nice(&self) -> i32 {
        19
    }
    /// Delivers one point.
    fn send(&mut self, point: &Point) -> Result<()>;
    /// Delivers the points gathered over `flush_secs`, in order (default: one `send` each).
    /// On failure, says how many of the first points were delivered before it.
    fn send_batch(&mut self, points: &[Point]) -> std::result::Result<(), (usize, Error)> {
        for (i, p) in points.iter().enumerate() {
            self.send(p).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// Closes the run. Returns how many points the tracker confirms it stored, when it can tell
    /// (the W&B sidecar counts them); `None` takes every successful `send` as delivered.
    fn finish(&mut self, failed: bool) -> Result<Option<u64>>;
    /// Whether a successful `send` means stored (an HTTP answer) rather than only handed on
    /// (a pipe), which counts only once `finish` confirms it.
    fn sends_are_final(&self) -> bool {
        true
    }
}

enum Cmd {
    Point(Point),
    Finish,
}

#[derive(Default)]
struct Shared {
    /// A config error from `Sink::start`: (key, message).
    fatal: Mutex<Option<(String, String)>>,
    delivered: AtomicU64,
    confirmed: Mutex<Option<u64>>,
    failure: Mutex<Option<String>>,
}

/// A sink's error as the worker records it: a tracker's own message without the tracker's name
/// (the worker's warnings and errors put it in front), any other error whole.
fn reason(e: Error) -> String {
    match e {
        Error::Tracker { msg, .. } => msg,
        e => e.to_string(),
    }
}

impl Shared {
    fn fail(&self, msg: String) {
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(msg);
        }
    }
    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
    fn fatal(&self) -> Option<Error> {
        self.fatal
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .map(|(key, msg)| Error::config(key, msg))
    }
}

/// Counts of a tracker's points, for the run summary.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TrackerReport {
    /// Points the training loop handed to the tracker.
    pub points: u64,
    /// Points the tracker confirmed.
    pub delivered: u64,
    /// Points lost: queue full, tracker failed, hung, or not confirmed at the end.
    pub dropped: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The training side: a bounded queue to a worker thread that owns the [`Sink`].
pub struct Worker {
    name: String,
    opts: TrackerOptions,
    tx: Option<SyncSender<Cmd>>,
    done: Receiver<()>,
    shared: Arc<Shared>,
    kill: Option<Box<dyn FnOnce() + Send>>,
    sends_are_final: bool,
    points: u64,
    dropped_here: u64,
    warned_full: bool,
    warned_failed: bool,
    report: Option<TrackerReport>,
}

impl Worker {
    /// Starts the worker thread. `kill` is called when the worker is abandoned at the end (to
    /// end a hung sidecar, which unblocks the thread).
    pub fn spawn(
        name: &str,
        opts: TrackerOptions,
        mut sink: Box<dyn Sink>,
        kill: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<Worker> {
        let (tx, rx) = sync_channel::<Cmd>(opts.queue_size.max(1));
        let (done_tx, done) = sync_channel::<()>(1);
        let shared = Arc::new(Shared::default());
        let sends_are_final = sink.sends_are_final();
        let flush_secs = opts.flush_secs;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("volttrain-{name}"))
            .spawn(move || {
                // The worker only uses cores training leaves idle, connecting included.
                set_thread_nice(sink.nice());
                let mut started = false;
                let start = |started: &mut bool, sink: &mut Box<dyn Sink>| {
                    if std::mem::replace(started, true) {
                        return;
                    }
                    match sink.start() {
                        Ok(()) => {}
                        Err(Error::Config { key, msg, .. }) => {
                            sh.fail(msg.clone());
                            if let Ok(mut f) = sh.fatal.lock() {
                                *f = Some((key, msg));
                            }
                        }
                        Err(e) => sh.fail(reason(e)),
                    }
                };
                let flush_after = Duration::from_secs_f64(flush_secs);
                let mut batch: Vec<Point> = Vec::new();
                let mut since = Instant::now();
                let deliver =
                    |batch: &mut Vec<Point>, started: &mut bool, sink: &mut Box<dyn Sink>| {
                        if batch.is_empty() {
                            return;
                        }
                        start(started, sink);
                        if sh.failure().is_none() {
                            match sink.send_batch(batch) {
                                Ok(()) => {
                                    sh.delivered
                                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                                }
                                Err((n, e)) => {
                                    sh.delivered.fetch_add(n as u64, Ordering::Relaxed);
                                    sh.fail(reason(e));
                                }
                            }
                        }
                        batch.clear();
                    };
                loop {
                    let cmd = if batch.is_empty() {
                        match rx.recv() {
                            Ok(c) => c,
                            Err(_) => break,
                        }
                    } else {
                        let left = flush_after.saturating_sub(since.elapsed());
                        match rx.recv_timeout(left) {
                            Ok(c) => c,
                            Err(RecvTimeoutError::Timeout) => {
                                deliver(&mut batch, &mut started, &mut sink);
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => {
                                deliver(&mut batch, &mut started, &mut sink);
                                break;
                            }
                        }
                    };
                    match cmd {
                        Cmd::Point(p) => {
                            if batch.is_empty() {
                                since = Instant::now();
                            }
                            batch.push(p);
                            if batch.len() >= MAX_BATCH || flush_after.is_zero() {
                                deliver(&mut batch, &mut started, &mut sink);
                            }
                        }
                        Cmd::Finish => {
                            deliver(&mut batch, &mut started, &mut sink);
                            start(&mut started, &mut sink);
                            match sink.finish(sh.failure().is_some()) {
                                Ok(n) => {
                                    if let Ok(mut c) = sh.confirmed.lock() {
                                        *c = n;
                                    }
                                }
                                Err(e) => sh.fail(reason(e)),
                            }
                            break;
                        }
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::Tracker {
                tracker: name.to_string(),
                msg: format!("cannot start the worker thread: {e}"),
            })?;
        Ok(Worker {
            name: name.to_string(),
            opts,
            tx: Some(tx),
            done,
            shared,
            kill,
            sends_are_final,
            points: 0,
            dropped_here: 0,
            warned_full: false,
            warned_failed: false,
            report: None,
        })
    }

    /// The first failure of the tracker, as an error when `on_error: fail`.
    fn check(&mut self) -> Result<()> {
        if let Some(e) = self.shared.fatal() {
            return Err(e);
        }
        if let Some(msg) = self.shared.failure() {
            if self.opts.on_error == OnError::Fail {
                return Err(Error::Tracker {
                    tracker: self.name.clone(),
                    msg: format!(
                        "{msg} (on_error: fail stops the run; `on_error: warn` trains on)"
                    ),
                });
            }
            if !self.warned_failed {
                self.warned_failed = true;
                tracing::warn!(
                    "{}: {msg}; training goes on, its points are dropped (counted in the run summary)",
                    self.name
                );
            }
        }
        Ok(())
    }

    /// Queues a point without ever blocking.
    pub fn push(&mut self, point: Point) -> Result<()> {
        self.check()?;
        self.points += 1;
        let Some(tx) = self.tx.as_ref() else {
            self.dropped_here += 1;
            return Ok(());
        };
        match tx.try_send(Cmd::Point(point)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.dropped_here += 1;
                if self.opts.on_error == OnError::Fail {
                    return Err(Error::Tracker {
                        tracker: self.name.clone(),
                        msg: format!(
                            "queue of {} points full, the tracker is not keeping up or hangs \
                         (on_error: fail stops the run)",
                            self.opts.queue_size
                        ),
                    });
                }
                if !self.warned_full {
                    self.warned_full = true;
                    tracing::warn!(
                        "{}: queue of {} points full (the tracker is slow or hangs); dropping \
                         points, counted in the run summary",
                        self.name,
                        self.opts.queue_size
                    );
                }
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped_here += 1;
                Ok(())
            }
        }
    }

    /// Closes the run: waits up to `finish_timeout_secs` (or `timeout` when given), then
    /// abandons the worker. Returns the counts; with `on_error: fail`, an error if anything
    /// failed or was dropped.
    pub fn finish(&mut self, timeout: Option<Duration>) -> Result<TrackerReport> {
        if let Some(r) = &self.report {
            return Ok(r.clone());
        }
        let wait = timeout.unwrap_or(Duration::from_secs_f64(self.opts.finish_timeout_secs));
        let deadline = Instant::now() + wait;
        let mut finished = false;
        if let Some(tx) = self.tx.take() {
            let mut cmd = Cmd::Finish;
            loop {
                match tx.try_send(cmd) {
                    Ok(()) => break,
                    Err(TrySendError::Full(c)) if Instant::now() < deadline => {
                        cmd = c;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            loop {
                match self.done.try_recv() {
                    Ok(()) | Err(TryRecvError::Disconnected) => {
                        finished = true;
                        break;
                    }
                    Err(TryRecvError::Empty) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
        }
        if !finished {
            self.shared.fail(format!(
                "did not finish within {:.1} s (finish_timeout_secs); abandoned",
                wait.as_secs_f64()
            ));
            if let Some(k) = self.kill.take() {
                k();
            }
        }
        let delivered = self.shared.delivered.load(Ordering::Relaxed);
        let confirmed = self.shared.confirmed.lock().ok().and_then(|c| *c);
        let delivered = match (finished, confirmed) {
            (true, Some(n)) => n,
            _ if self.sends_are_final => delivered,
            // only handed on, and the run never confirmed it
            _ => 0,
        };
        let delivered = delivered.min(self.points);
        let report = TrackerReport {
            points: self.points,
            delivered,
            dropped: self.points - delivered,
            error: self.shared.failure(),
        };
        self.report = Some(report.clone());
        if let Some(e) = self.shared.fatal() {
            return Err(e);
        }
        if report.dropped > 0 || report.error.is_some() {
            let why = report.error.as_deref().unwrap_or("queue full");
            if self.opts.on_error == OnError::Fail {
                return Err(Error::Tracker {
                    tracker: self.name.clone(),
                    msg: format!(
                        "{} of {} points not delivered: {why} (on_error: fail stops the run)",
                        report.dropped, report.points
                    ),
                });
            }
            tracing::warn!(
                "{}: {} of {} points dropped ({why})",
                self.name,
                report.dropped,
                report.points
            );
        }
        Ok(report)
    }

    /// Points dropped so far on the training side (queue full, worker gone).
    pub fn dropped_so_far(&self) -> u64 {
        self.dropped_here
    }

    /// The report of a finished worker.
    pub fn report(&self) -> Option<&TrackerReport> {
        self.report.as_ref()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.report.is_none() {
            let _ = self.finish(Some(Duration::from_secs(5)));
        }
    }
}

/// Runs the calling thread at niceness `nice` (Linux: per thread, inherited by the processes
/// it starts): a tracker at 19 only uses cores training leaves idle, so it cannot slow the
/// steps down on a busy machine.
pub(crate) fn set_thread_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority(2) on this thread's own id; no memory is involved. Failure (e.g. a
    // sandbox forbidding it, or a niceness below the process's without the privilege) leaves
    // the priority as it was, which is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Flattens JSON objects into `prefix/key/subkey` entries (numbers only; other leaves, and
/// non-finite numbers, which JSON cannot hold, are left out).
fn flatten_numbers(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten_numbers(&format!("{prefix}/{k}"), v, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        _ => {}
    }
}

fn values_of<T: serde::Serialize>(kind: &str, m: &T) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Ok(serde_json::Value::Object(o)) = serde_json::to_value(m) {
        for (k, v) in o.iter().filter(|(k, _)| k.as_str() != "step") {
            flatten_numbers(&format!("{kind}/{k}"), v, &mut out);
        }
    }
    out.retain(|_, v| v.is_finite());
    out
}

/// A train step's metrics under the keys of its `metrics.jsonl` line, prefixed by its `kind`:
/// `train/loss`, `train/lr/<group>`, `train/grad_norm`, `train/tokens`, `train/tokens_per_sec`,
/// `train/epoch` (the step is the tracker's step axis). Non-finite values are left out.
pub fn step_values(m: &StepMetrics) -> BTreeMap<String, f64> {
    values_of("train", m)
}

/// An eval's metrics: `eval/eval_loss`, `eval/tokens`, `eval/epoch`.
pub fn eval_values(m: &EvalMetrics) -> BTreeMap<String, f64> {
    values_of("eval", m)
}

/// The run's resolved config (`<output_dir>/config.resolved.yaml`, written by `volttrain sft`
/// before training) as JSON, when the file is there.
pub fn resolved_config(output_dir: &std::path::Path) -> Result<Option<serde_json::Value>> {
    let path = output_dir.join("config.resolved.yaml");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_yaml::from_str(&text).map_err(|e| Error::Config {
        file: Some(path.clone()),
        key: ".".into(),
        msg: format!("not valid YAML: {e}"),
    })?;
    Ok(Some(v))
}

/// Flattens a config into `a.b.c` keys with string values (lists and other leaves as JSON),
/// as MLflow params are.
pub fn flatten_params(v: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            serde_json::Value::Null => {
                out.insert(prefix.to_string(), "null".into());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// The run config a tracker logs first: `config` when the caller gave one, else the run's
/// `config.resolved.yaml`, else an empty object.
pub fn run_config(
    config: Option<&serde_json::Value>,
    output_dir: &std::path::Path,
) -> Result<serde_json::Value> {
    match config {
        Some(c) => Ok(c.clone()),
        None => Ok(resolved_config(output_dir)?.unwrap_or(serde_json::json!({}))),
    }
}

/// Queues a train step's metrics (and counts them for the summary) when the tracker runs.
pub fn push_step(
    worker: &mut Option<Worker>,
    tally: &mut SummaryTally,
    m: &StepMetrics,
) -> Result<()> {
    if let Some(w) = worker.as_mut() {
        tally.step(m);
        w.push(Point::metrics(m.step, step_values(m)))?;
    }
    Ok(())
}

/// Queues an eval's metrics (and keeps its loss for the summary) when the tracker runs.
pub fn push_eval(
    worker: &mut Option<Worker>,
    tally: &mut SummaryTally,
    m: &EvalMetrics,
) -> Result<()> {
    if let Some(w) = worker.as_mut() {
        tally.eval(m);
        w.push(Point::metrics(m.step, eval_values(m)))?;
    }
    Ok(())
}

/// Run summary values a tracker saw: last losses, steps, tokens, mean tokens/s.
#[derive(Debug, Default, Clone)]
pub struct SummaryTally {
    first_step_at: Option<Instant>,
    steps: u64,
    last_step: u64,
    tokens: u64,
    tok_per_sec_sum: f64,
    final_train_loss: Option<f64>,
    final_eval_loss: Option<f64>,
}

impl SummaryTally {
    /// Counts one optimizer step's metrics.
    pub fn step(&mut self, m: &StepMetrics) {
        self.first_step_at.get_or_insert_with(Instant::now);
        self.steps += 1;
        self.last_step = m.step;
        self.tokens += m.tokens;
        self.tok_per_sec_sum += m.tokens_per_sec;
        self.final_train_loss = Some(m.loss);
    }
    /// Records an evaluation's loss as the final eval loss.
    pub fn eval(&mut self, m: &EvalMetrics) {
        self.final_eval_loss = Some(m.eval_loss);
    }
    /// `steps`, `label_tokens`, `mean_tokens_per_sec`, `final_train_loss`, `final_eval_loss`
    /// (when known) and `tracker_dropped` (points dropped so far).
    pub fn values(&self, dropped: u64) -> BTreeMap<String, serde_json::Value> {
        let mut s = BTreeMap::new();
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null)
        };
        s.insert("steps".into(), self.last_step.into());
        s.insert("label_tokens".into(), self.tokens.into());
        if self.steps > 0 {
            s.insert(
                "mean_tokens_per_sec".into(),
                num(self.tok_per_sec_sum / self.steps as f64),
            );
        }
        if let Some(l) = self.final_train_loss {
            s.insert("final_train_loss".into(), num(l));
        }
        if let Some(l) = self.final_eval_loss {
            s.insert("final_eval_loss".into(), num(l));
        }
        s.insert("tracker_dropped".into(), dropped.into());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Sender, channel};

    /// Blocks every `send` until the test says so; tells when it entered.
    struct Blocking {
        entered: Sender<()>,
        release: Arc<Mutex<Receiver<()>>>,
    }
    impl Sink for Blocking {
        fn send(&mut self, _: &Point) -> Result<()> {
            let _ = self.entered.send(());
            if let Ok(r) = self.release.lock() {
                let _ = r.recv();
            }
            Ok(())
        }
        fn finish(&mut self, _: bool) -> Result<Option<u64>> {
            Ok(None)
        }
        fn sends_are_final(&self) -> bool {
            false
        }
    }

    fn point(i: u64) -> Point {
        Point::metrics(i, BTreeMap::from([("train/loss".to_string(), i as f64)]))
    }

    #[test]
    fn a_hung_sink_drops_and_counts_without_blocking() {
        let (entered_tx, entered) = channel();
        let (_release_tx, release) = channel::<()>();
        let sink = Blocking {
            entered: entered_tx,
            release: Arc::new(Mutex::new(release)),
        };
        let opts = TrackerOptions {
            queue_size: 4,
            finish_timeout_secs: 0.2,
            ..TrackerOptions::default()
        };
        let mut w = Worker::spawn("test", opts, Box::new(sink), None).unwrap();
        w.push(point(0)).unwrap();
        entered.recv().unwrap(); // the worker holds point 0 and hangs in `send`
        let t = Instant::now();
        for i in 1..=10 {
            w.push(point(i)).unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "push never blocks"
        );
        let r = w.finish(None).unwrap();
        // 4 queued behind the hung one, 6 dropped at once; nothing confirmed by a run that
        // never closed: all 11 dropped
        assert_eq!(w.dropped_here, 6);
        assert_eq!(r.points, 11);
        assert_eq!(r.delivered, 0);
        assert_eq!(r.dropped, 11);
        assert!(r.error.unwrap().contains("did not finish"));
    }

    struct Failing(u64);
    impl Sink for Failing {
        fn send(&mut self, _: &Point) -> Result<()> {
            if self.0 == 0 {
                return Err(Error::invalid("sink is gone"));
            }
            self.0 -= 1;
            Ok(())
        }
        fn finish(&mut self, _: bool) -> Result<Option<u64>> {
            Ok(None)
        }
    }

    #[test]
    fn a_failed_sink_counts_drops_and_fail_mode_stops() {
        let mut w = Worker::spawn(
            "warn",
            TrackerOptions::default(),
            Box::new(Failing(2)),
            None,
        )
        .unwrap();
        for i in 0..5 {
            w.push(point(i)).unwrap();
        }
        let r = w.finish(None).unwrap();
        assert_eq!((r.points, r.delivered, r.dropped), (5, 2, 3));
        assert_eq!(r.error.as_deref(), Some("sink is gone"));

        let opts = TrackerOptions {
            on_error: OnError::Fail,
            ..TrackerOptions::default()
        };
        let mut w = Worker::spawn("fail", opts, Box::new(Failing(0)), None).unwrap();
        w.push(point(0)).unwrap();
        let t = Instant::now();
        let err = loop {
            // the worker records the failure asynchronously; the next push reports it
            match w.push(point(1)) {
                Err(e) => break e,
                Ok(()) => std::thread::sleep(Duration::from_millis(5)),
            }
            assert!(t.elapsed() < Duration::from_secs(5));
        };
        assert!(err.to_string().contains("fail: "), "{err}");
        assert!(err.to_string().contains("sink is gone"), "{err}");
    }

    /// Records the size of every delivery.
    struct Recording(Arc<Mutex<Vec<usize>>>);
    impl Sink for Recording {
        fn send(&mut self, _: &Point) -> Result<()> {
            self.0.lock().unwrap().push(1);
            Ok(())
        }
        fn send_batch(&mut self, points: &[Point]) -> std::result::Result<(), (usize, Error)> {
            self.0.lock().unwrap().push(points.len());
            Ok(())
        }
        fn finish(&mut self, _: bool) -> Result<Option<u64>> {
            Ok(None)
        }
    }

    #[test]
    fn points_within_flush_secs_go_in_one_delivery() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let opts = TrackerOptions {
            flush_secs: 30.0,
            ..TrackerOptions::default()
        };
        let mut w = Worker::spawn("batch", opts, Box::new(Recording(sizes.clone())), None).unwrap();
        for i in 0..250 {
            w.push(point(i)).unwrap();
        }
        // MAX_BATCH points go at once; the rest waits for flush_secs or the end of the run,
        // which delivers at once instead of waiting out the 30 s
        let t = Instant::now();
        let r = w.finish(None).unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(*sizes.lock().unwrap(), vec![100, 100, 50]);
        assert_eq!((r.points, r.delivered, r.dropped), (250, 250, 0));

        // flush_secs: 0 delivers each point as it comes
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let opts = TrackerOptions {
            flush_secs: 0.0,
            ..TrackerOptions::default()
        };
        let mut w = Worker::spawn("each", opts, Box::new(Recording(sizes.clone())), None).unwrap();
        for i in 0..3 {
            w.push(point(i)).unwrap();
        }
        w.finish(None).unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1, 1]);
    }

    #[test]
    fn a_partial_batch_counts_what_was_delivered() {
        // Failing(2) takes two points of a five-point batch (the default send_batch), then fails
        let opts = TrackerOptions {
            flush_secs: 30.0,
            ..TrackerOptions::default()
        };
        let mut w = Worker::spawn("partial", opts, Box::new(Failing(2)), None).unwrap();
        for i in 0..5 {
            w.push(point(i)).unwrap();
        }
        let r = w.finish(None).unwrap();
        assert_eq!((r.points, r.delivered, r.dropped), (5, 2, 3));
    }

    #[test]
    fn keys_follow_metrics_jsonl() {
        let m = StepMetrics {
            step: 3,
            epoch: 1,
            loss: 2.5,
            lr: BTreeMap::from([("muon".into(), 0.02), ("adamw_embed".into(), 0.04)]),
            grad_norm: f64::NAN,
            tokens: 100,
            tokens_per_sec: 1e3,
            extra: BTreeMap::from([("rewards/chosen".into(), 0.5)]),
        };
        let v = step_values(&m);
        let keys: Vec<&str> = v.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "train/epoch",
                "train/loss",
                "train/lr/adamw_embed",
                "train/lr/muon",
                "train/rewards/chosen",
                "train/tokens",
                "train/tokens_per_sec"
            ]
        );
        assert_eq!(v["train/lr/muon"], 0.02);
        // Objective metrics (preference tuning) sit beside the others, as in metrics.jsonl.
        assert_eq!(v["train/rewards/chosen"], 0.5);
        let e = eval_values(&EvalMetrics {
            step: 3,
            epoch: 1,
            eval_loss: 1.25,
            tokens: 7,
            extra: BTreeMap::from([("rewards/margins".into(), -0.25)]),
        });
        assert_eq!(e["eval/rewards/margins"], -0.25);
        assert_eq!(e["eval/eval_loss"], 1.25);
        assert_eq!(e["eval/tokens"], 7.0);
    }

    #[test]
    fn params_are_flattened_with_dots() {
        let v = serde_json::json!({"training": {"lr": 0.02, "gpu_devices": [0, 1], "x": null},
                                   "model": {"path": "m"}});
        let p = flatten_params(&v);
        assert_eq!(p["training.lr"], "0.02");
        assert_eq!(p["training.gpu_devices"], "[0,1]");
        assert_eq!(p["training.x"], "null");
        assert_eq!(p["model.path"], "m");
    }
}
