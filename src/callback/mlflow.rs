//! MLflow over its REST API (`/api/2.0/mlflow/...`), with no Python in the loop: an experiment
//! looked up or created by name, one run with the flattened resolved config as params, every
//! logged train step and eval as metrics with their steps, tags, the run summary as
//! `volttrain.summary.*` tags, and optionally the final adapter as artifacts (through the
//! server's artifact proxy, `mlflow-artifacts:` URIs).
//!
//! All HTTP happens on a worker thread behind a bounded queue ([`super::tracker`]): a slow,
//! unreachable or hung server costs dropped (and counted) points, never a stalled step. Every
//! request has a timeout (`timeout_secs`).
//!
//! Authentication as the MLflow client does it: `MLFLOW_TRACKING_TOKEN` (bearer), or
//! `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` (basic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::tracker::{
    OnError, Point, Sink, SummaryTally, TrackerOptions, TrackerReport, Worker, flatten_params,
    now_ms, push_eval, push_step, run_config,
};
use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

/// MLflow's limits (mlflow/utils/validation.py): params and tags per `log-batch` request,
/// metrics per request, param value length.
const MAX_PARAMS_PER_BATCH: usize = 100;
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAM_VALUE: usize = 6000;

fn default_queue() -> usize {
    TrackerOptions::default().queue_size
}
fn default_finish_timeout() -> f64 {
    TrackerOptions::default().finish_timeout_secs
}
fn default_flush() -> f64 {
    TrackerOptions::default().flush_secs
}
fn default_timeout() -> f64 {
    30.0
}

/// `callbacks: [{name: mlflow, ...}]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowConfig {
    /// `http(s)://host:port` of an MLflow tracking server; default `MLFLOW_TRACKING_URI`.
    pub tracking_uri: Option<String>,
    /// Experiment name, created when missing; default `MLFLOW_EXPERIMENT_NAME`, else MLflow's
    /// `Default` experiment.
    pub experiment: Option<String>,
    /// The run's name in the MLflow UI; unset: MLflow generates one.
    pub run_name: Option<String>,
    /// Extra run tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Upload the final adapter (what the run saves: adapter, tokenizer, config) as artifacts
    /// under `adapter/` at the end of the run.
    #[serde(default)]
    pub log_adapter: bool,
    /// Seconds each HTTP request may take (default 30).
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// `warn` (default): drop and count what cannot be delivered; `fail`: stop the run.
    #[serde(default)]
    pub on_error: OnError,
    /// Points held while the server is busy; more are dropped and counted (default 1024).
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// Seconds the end of the run waits for queued points and the run's close (default 60).
    #[serde(default = "default_finish_timeout")]
    pub finish_timeout_secs: f64,
    /// Seconds points are gathered before one batched delivery (default 1).
    #[serde(default = "default_flush")]
    pub flush_secs: f64,
}

impl Default for MlflowConfig {
    fn default() -> Self {
        MlflowConfig {
            tracking_uri: None,
            experiment: None,
            run_name: None,
            tags: BTreeMap::new(),
            log_adapter: false,
            timeout_secs: default_timeout(),
            on_error: OnError::Warn,
            queue_size: default_queue(),
            finish_timeout_secs: default_finish_timeout(),
            flush_secs: default_flush(),
        }
    }
}

impl MlflowConfig {
    fn tracker(&self) -> TrackerOptions {
        TrackerOptions {
            on_error: self.on_error,
            queue_size: self.queue_size,
            finish_timeout_secs: self.finish_timeout_secs,
            flush_secs: self.flush_secs,
        }
    }

    /// The server's base URL (config, else `MLFLOW_TRACKING_URI`), checked.
    pub fn base_url(&self) -> Result<String> {
        let key = "callbacks.mlflow.tracking_uri";
        let uri = match &self.tracking_uri {
            Some(u) => u.clone(),
            None => std::env::var("MLFLOW_TRACKING_URI").map_err(|_| {
                Error::config(
                    key,
                    "no tracking server: set `tracking_uri: http://host:port` (or \
                     MLFLOW_TRACKING_URI)",
                )
            })?,
        };
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(Error::config(
                key,
                format!(
                    "`{uri}` is not an http(s) URL; VoltTrain talks to an MLflow tracking server \
                     over REST. Start one (e.g. `mlflow server --backend-store-uri \
                     sqlite:///mlflow.db`) and set its address, e.g. http://127.0.0.1:5000"
                ),
            ));
        }
        Ok(uri.trim_end_matches('/').to_string())
    }

    /// Checks the values (the section name is `callbacks.mlflow` in messages).
    pub fn validate(&self) -> Result<()> {
        self.tracker().validate("callbacks.mlflow")?;
        self.base_url()?;
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(Error::config(
                "callbacks.mlflow.timeout_secs",
                "must be a number of seconds > 0",
            ));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct KeyValue<'a> {
    key: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct MetricJson<'a> {
    key: &'a str,
    value: f64,
    timestamp: u64,
    step: u64,
}

/// The HTTP side, on the worker thread.
struct Rest {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
    experiment: Option<String>,
    run_name: Option<String>,
    tags: BTreeMap<String, String>,
    run: Option<(String, String)>, // (run_id, artifact_uri)
    training_failed: Arc<AtomicBool>,
}

fn auth_header() -> Option<String> {
    if let Ok(t) = std::env::var("MLFLOW_TRACKING_TOKEN") {
        return Some(format!("Bearer {t}"));
    }
    match (
        std::env::var("MLFLOW_TRACKING_USERNAME"),
        std::env::var("MLFLOW_TRACKING_PASSWORD"),
    ) {
        (Ok(u), Ok(p)) => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )),
        _ => None,
    }
}

impl Rest {
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        query: &[(&str, &str)],
    ) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let fail = |e: ureq::Error| mlflow_error(format!("{method} {url}: {e}"));
        let mut resp = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                for (k, v) in query {
                    r = r.query(*k, *v);
                }
                if let Some(a) = &self.auth {
                    r = r.header("Authorization", a);
                }
                r.call().map_err(fail)?
            }
            _ => {
                let mut r = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(a) = &self.auth {
                    r = r.header("Authorization", a);
                }
                let ct = if method == "PUT" {
                    "application/octet-stream"
                } else {
                    "application/json"
                };
                r.header("Content-Type", ct)
                    .send(&body.unwrap_or_default()[..])
                    .map_err(fail)?
            }
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        Ok((status, text))
    }

    fn call(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let bytes = serde_json::to_vec(&body).map_err(|e| mlflow_error(e.to_string()))?;
        let (status, text) = self.request("POST", path, Some(bytes), &[])?;
        if status != 200 {
            return Err(mlflow_error(format!(
                "POST {}{path} answered {status}: {}",
                self.base,
                text.trim()
            )));
        }
        serde_json::from_str(&text)
            .map_err(|e| mlflow_error(format!("POST {path}: unreadable answer ({e}): {text}")))
    }

    fn experiment_id(&self) -> Result<String> {
        let Some(name) = self.experiment.as_deref() else {
            return Ok("0".into()); // MLflow's `Default` experiment
        };
        let (status, text) = self.request(
            "GET",
            "/api/2.0/mlflow/experiments/get-by-name",
            None,
            &[("experiment_name", name)],
        )?;
        if status == 200 {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| mlflow_error(e.to_string()))?;
            if let Some(id) = v["experiment"]["experiment_id"].as_str() {
                return Ok(id.to_string());
            }
        } else if status != 404 {
            return Err(mlflow_error(format!(
                "looking up experiment `{name}` answered {status}: {}",
                text.trim()
            )));
        }
        let v = self.call(
            "/api/2.0/mlflow/experiments/create",
            serde_json::json!({ "name": name }),
        )?;
        v["experiment_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| mlflow_error(format!("experiments/create answered {v}")))
    }

    fn run_id(&mut self) -> Result<String> {
        if let Some((id, _)) = &self.run {
            return Ok(id.clone());
        }
        let exp = self.experiment_id()?;
        let mut tags: Vec<KeyValue<'_>> = self
            .tags
            .iter()
            .map(|(k, v)| KeyValue { key: k, value: v })
            .collect();
        tags.push(KeyValue {
            key: "mlflow.source.name",
            value: "volttrain",
        });
        tags.push(KeyValue {
            key: "volttrain.version",
            value: env!("CARGO_PKG_VERSION"),
        });
        let mut body = serde_json::json!({
            "experiment_id": exp,
            "start_time": now_ms(),
            "tags": tags,
        });
        if let Some(n) = &self.run_name {
            body["run_name"] = n.as_str().into();
        }
        let v = self.call("/api/2.0/mlflow/runs/create", body)?;
        let info = &v["run"]["info"];
        let id = info["run_id"]
            .as_str()
            .ok_or_else(|| mlflow_error(format!("runs/create answered {v}")))?
            .to_string();
        let uri = info["artifact_uri"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        tracing::info!("mlflow: run {id} in experiment {exp} at {}", self.base);
        self.run = Some((id.clone(), uri));
        Ok(id)
    }

    fn log_batch(&mut self, body: serde_json::Value) -> Result<()> {
        let mut body = body;
        body["run_id"] = self.run_id()?.into();
        self.call("/api/2.0/mlflow/runs/log-batch", body)
            .map(|_| ())
    }

    fn upload_dir(&mut self, dir: &Path) -> Result<()> {
        self.run_id()?;
        let uri = self.run.as_ref().map(|r| r.1.clone()).unwrap_or_default();
        // `mlflow-artifacts:/<exp>/<run>/artifacts` or `mlflow-artifacts://host/<...>`
        let Some(rest) = uri.strip_prefix("mlflow-artifacts:") else {
            return Err(mlflow_error(format!(
                "the run's artifact location `{uri}` is not served by the tracking \
                 server (mlflow-artifacts:); start `mlflow server` with artifact serving (the \
                 default) to use `log_adapter`"
            )));
        };
        let rest = match rest.strip_prefix("//") {
            Some(r) => r.split_once('/').map_or("", |(_, p)| p),
            None => rest.trim_start_matches('/'),
        };
        let mut files = Vec::new();
        collect_files(dir, dir, &mut files)?;
        for (rel, path) in files {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let p = format!("/api/2.0/mlflow-artifacts/artifacts/{rest}/adapter/{rel}");
            let (status, text) = self.request("PUT", &p, Some(bytes), &[])?;
            if status != 200 {
                return Err(mlflow_error(format!(
                    "uploading {} answered {status}: {}",
                    path.display(),
                    text.trim()
                )));
            }
        }
        Ok(())
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(root) {
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, p.clone()));
        }
    }
    Ok(())
}

impl Sink for Rest {
    fn send(&mut self, point: &Point) -> Result<()> {
        match point {
            Point::Config(cfg) => {
                let params = flatten_params(cfg);
                let mut too_long = Vec::new();
                let params: Vec<(String, String)> = params
                    .into_iter()
                    .map(|(k, mut v)| {
                        if v.len() > MAX_PARAM_VALUE {
                            too_long.push(k.clone());
                            let mut cut = MAX_PARAM_VALUE - 3;
                            while !v.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            v.truncate(cut);
                            v.push_str("...");
                        }
                        (k, v)
                    })
                    .collect();
                if !too_long.is_empty() {
                    tracing::warn!(
                        "mlflow: params {too_long:?} are longer than MLflow's {MAX_PARAM_VALUE} \
                         characters and were cut (config.resolved.yaml has them whole)"
                    );
                }
                self.run_id()?;
                for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
                    let kv: Vec<KeyValue<'_>> = chunk
                        .iter()
                        .map(|(k, v)| KeyValue { key: k, value: v })
                        .collect();
                    self.log_batch(serde_json::json!({ "params": kv }))?;
                }
                Ok(())
            }
            Point::Metrics {
                step,
                values,
                time_ms,
            } => {
                let all: Vec<MetricJson<'_>> = values
                    .iter()
                    .map(|(k, v)| MetricJson {
                        key: k,
                        value: *v,
                        timestamp: *time_ms,
                        step: *step,
                    })
                    .collect();
                for chunk in all.chunks(MAX_METRICS_PER_BATCH) {
                    self.log_batch(serde_json::json!({ "metrics": chunk }))?;
                }
                Ok(())
            }
            Point::Summary(s) => {
                let tags: Vec<(String, String)> = s
                    .iter()
                    .map(|(k, v)| (format!("volttrain.summary.{k}"), v.to_string()))
                    .collect();
                for chunk in tags.chunks(MAX_PARAMS_PER_BATCH) {
                    let kv: Vec<KeyValue<'_>> = chunk
                        .iter()
                        .map(|(k, v)| KeyValue { key: k, value: v })
                        .collect();
                    self.log_batch(serde_json::json!({ "tags": kv }))?;
                }
                Ok(())
            }
            Point::Artifact(dir) => self.upload_dir(dir),
        }
    }

    /// Consecutive metric points go in one `log-batch` request (up to MLflow's 1,000 metrics):
    /// a second of training is one request, not one per logged step.
    fn send_batch(&mut self, points: &[Point]) -> std::result::Result<(), (usize, Error)> {
        let mut i = 0;
        while i < points.len() {
            let mut metrics: Vec<MetricJson<'_>> = Vec::new();
            let mut j = i;
            while let Some(Point::Metrics {
                step,
                values,
                time_ms,
            }) = points.get(j)
            {
                if metrics.len() + values.len() > MAX_METRICS_PER_BATCH {
                    break;
                }
                metrics.extend(values.iter().map(|(k, v)| MetricJson {
                    key: k,
                    value: *v,
                    timestamp: *time_ms,
                    step: *step,
                }));
                j += 1;
            }
            if j == i {
                // not a metric point, or one with more metrics than a request holds
                self.send(&points[i]).map_err(|e| (i, e))?;
                i += 1;
                continue;
            }
            let body = serde_json::json!({ "metrics": metrics });
            self.log_batch(body).map_err(|e| (i, e))?;
            i = j;
        }
        Ok(())
    }

    fn finish(&mut self, failed: bool) -> Result<Option<u64>> {
        if failed {
            return Ok(None);
        }
        let id = self.run_id()?;
        let status = if self.training_failed.load(Ordering::Relaxed) {
            "FAILED"
        } else {
            "FINISHED"
        };
        self.call(
            "/api/2.0/mlflow/runs/update",
            serde_json::json!({ "run_id": id, "status": status, "end_time": now_ms() }),
        )?;
        Ok(None)
    }
}

/// The MLflow callback. Only the main process (rank 0) logs.
pub struct Mlflow {
    cfg: MlflowConfig,
    config: Option<serde_json::Value>,
    worker: Option<Worker>,
    tally: SummaryTally,
    training_failed: Arc<AtomicBool>,
    adapter_dir: Option<tempfile::TempDir>,
}

impl Mlflow {
    /// Checks `cfg` (URI, timeouts, queue size); nothing is contacted before the run starts.
    pub fn new(cfg: MlflowConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Mlflow {
            cfg,
            config: None,
            worker: None,
            tally: SummaryTally::default(),
            training_failed: Arc::new(AtomicBool::new(false)),
            adapter_dir: None,
        })
    }

    /// Logs `config` (instead of the run's `config.resolved.yaml`) as the run's params.
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = Some(config);
        self
    }

    fn start(&mut self) -> Result<()> {
        let timeout = Duration::from_secs_f64(self.cfg.timeout_secs);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let rest = Rest {
            base: self.cfg.base_url()?,
            agent,
            auth: auth_header(),
            experiment: self
                .cfg
                .experiment
                .clone()
                .or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok()),
            run_name: self.cfg.run_name.clone(),
            tags: self.cfg.tags.clone(),
            run: None,
            training_failed: self.training_failed.clone(),
        };
        self.worker = Some(Worker::spawn(
            "mlflow",
            self.cfg.tracker(),
            Box::new(rest),
            None,
        )?);
        Ok(())
    }

    fn finish(&mut self, timeout: Option<Duration>) -> Result<()> {
        let r = match self.worker.as_mut() {
            Some(w) => w.finish(timeout).map(|_| ()),
            None => Ok(()),
        };
        self.adapter_dir = None;
        r
    }

    /// Counts of delivered and dropped points (after the run).
    pub fn report(&self) -> Option<&TrackerReport> {
        self.worker.as_ref().and_then(Worker::report)
    }
}

impl Callback for Mlflow {
    fn name(&self) -> &str {
        "mlflow"
    }
    fn on_fit_start(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        if !ctl.is_main || self.worker.is_some() {
            return Ok(());
        }
        self.start()?;
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
    fn on_fit_end(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        let Some(w) = self.worker.as_mut() else {
            return Ok(());
        };
        let dropped = w.dropped_so_far();
        w.push(Point::Summary(self.tally.values(dropped)))?;
        if self.cfg.log_adapter {
            let tmp = tempfile::Builder::new()
                .prefix("volttrain-mlflow-adapter-")
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            ctl.saver.save_to(ctl.model, tmp.path())?;
            w.push(Point::Artifact(tmp.path().to_path_buf()))?;
            self.adapter_dir = Some(tmp);
        }
        self.finish(None)
    }
    fn on_error(&mut self, _: &Error) {
        self.training_failed.store(true, Ordering::Relaxed);
        let _ = self.finish(Some(Duration::from_secs(10)));
    }
    fn summary(&self) -> Option<serde_json::Value> {
        self.report().and_then(|r| serde_json::to_value(r).ok())
    }
}

/// An [`Error::Tracker`] of the mlflow tracker.
fn mlflow_error(msg: impl Into<String>) -> Error {
    Error::Tracker {
        tracker: "mlflow".into(),
        msg: msg.into(),
    }
}
