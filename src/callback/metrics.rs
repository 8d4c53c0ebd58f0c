//! Metrics to `<output_dir>/metrics.jsonl`, one JSON object a line.

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::PathBuf;

use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

/// Appends every step's and every eval's metrics to a JSON-lines file (flushed per line, so a
/// crash loses at most the line being written). Lines carry `"kind": "train"` or `"eval"`.
pub struct MetricsJsonl {
    path: PathBuf,
    file: Option<File>,
}

impl MetricsJsonl {
    /// Writes to `path` (appending, so a resumed run continues the same file).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MetricsJsonl {
            path: path.into(),
            file: None,
        }
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(f);
        }
        let mut line = value.to_string();
        line.push('\n');
        if let Some(f) = self.file.as_mut() {
            append_whole(f, line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Appends `bytes` to `f`, or on failure (disk full, file size limit) cuts the file back to its
/// length before, so a failed write never leaves half a line (or half a record) behind.
pub(crate) fn append_whole(f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let before = f.metadata()?.len();
    match f.write_all(bytes).and_then(|_| f.flush()) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The write's error is the one to report; a failed cut leaves the torn tail. The
            // seek matters for files not opened in append mode (the next write goes there).
            let _ = f.set_len(before);
            let _ = f.seek(std::io::SeekFrom::Start(before));
            Err(e)
        }
    }
}

fn tagged<T: serde::Serialize>(kind: &str, m: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(m).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), kind.into());
    }
    v
}

impl Callback for MetricsJsonl {
    fn name(&self) -> &str {
        "metrics_jsonl"
    }
    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        if ctl.is_main {
            self.write(tagged("train", m))?;
        }
        Ok(())
    }
    fn on_eval_end(&mut self, ctl: &mut Control<'_>, m: &EvalMetrics) -> Result<()> {
        if ctl.is_main {
            self.write(tagged("eval", m))?;
        }
        Ok(())
    }
}
