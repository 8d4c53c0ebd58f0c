//! A TensorBoard event-file writer: scalars that `tensorboard` (and `tensorboard.backend
//! .event_processing.event_accumulator`) read back.
//!
//! Format: TFRecord framing (`u64` length, masked CRC-32C of the length, the bytes, masked
//! CRC-32C of the bytes) around `tensorflow.Event` protobuf messages; the first record carries
//! `file_version = "brain.Event:2"`, the others a `Summary` of `simple_value`s. The few protobuf
//! fields needed are encoded here directly (field numbers from tensorflow/core/util/event.proto
//! and summary.proto).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // wall_time: field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // step: field 2, varint
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes scalars to `events.out.tfevents.*` in a directory.
pub struct TensorBoardWriter {
    path: PathBuf,
    file: File,
}

impl TensorBoardWriter {
    /// Creates a new event file in `dir`. Its name is unique within the process (a sequence
    /// number after the pid) and the file is created exclusively: two writers started in the
    /// same second (the TensorBoard callback and `sample_generations`) never share, and so
    /// never tear, one file.
    pub fn create(dir: &Path) -> Result<Self> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let (path, file) = loop {
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(
                "events.out.tfevents.{}.{}.{}.{seq}.volttrain",
                now() as u64,
                host,
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        };
        let mut w = TensorBoardWriter { path, file };
        let first = event(now(), 0, |e| bytes_field(3, b"brain.Event:2", e));
        w.record(&first)?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        crate::callback::metrics::append_whole(&mut self.file, &buf)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes scalar values (tag, value) at `step`.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut val = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut val); // Value.tag
            val.push(0x15); // Value.simple_value: field 2, 32-bit
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(1, &val, &mut summary); // Summary.value
        }
        let ev = event(now(), step, |e| bytes_field(5, &summary, e)); // Event.summary
        self.record(&ev)
    }
}

impl TensorBoardWriter {
    /// Writes a text summary (TensorBoard's text plugin: a string tensor with `plugin_name:
    /// "text"` metadata, as `torch.utils.tensorboard.SummaryWriter.add_text` writes it) at
    /// `step`. The text is rendered as Markdown.
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        bytes_field(1, b"text", &mut plugin); // PluginData.plugin_name
        let mut meta = Vec::new();
        bytes_field(1, &plugin, &mut meta); // SummaryMetadata.plugin_data
        let mut shape = Vec::new();
        let mut dim = Vec::new();
        dim.push(0x08); // Dim.size: field 1, varint
        varint(1, &mut dim);
        bytes_field(2, &dim, &mut shape); // TensorShapeProto.dim
        let mut tensor = Vec::new();
        tensor.push(0x08); // TensorProto.dtype: field 1, varint
        varint(7, &mut tensor); // DT_STRING
        bytes_field(2, &shape, &mut tensor); // TensorProto.tensor_shape
        bytes_field(8, text.as_bytes(), &mut tensor); // TensorProto.string_val
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val); // Value.tag
        bytes_field(9, &meta, &mut val); // Value.metadata
        bytes_field(8, &tensor, &mut val); // Value.tensor
        let mut summary = Vec::new();
        bytes_field(1, &val, &mut summary); // Summary.value
        let ev = event(now(), step, |e| bytes_field(5, &summary, e)); // Event.summary
        self.record(&ev)
    }
}

/// Callback writing train loss, lr per group, grad norm, tokens/s and eval loss.
pub struct TensorBoard {
    dir: PathBuf,
    writer: Option<TensorBoardWriter>,
}

impl TensorBoard {
    /// Event files go to `dir` (created on the first write, on the main process only).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TensorBoard {
            dir: dir.into(),
            writer: None,
        }
    }

    fn writer(&mut self) -> Result<&mut TensorBoardWriter> {
        if self.writer.is_none() {
            self.writer = Some(TensorBoardWriter::create(&self.dir)?);
        }
        self.writer
            .as_mut()
            .ok_or_else(|| Error::Internal("tensorboard writer missing".into()))
    }
}

impl Callback for TensorBoard {
    fn name(&self) -> &str {
        "tensorboard"
    }
    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        if !ctl.is_main {
            return Ok(());
        }
        let lr_tags: Vec<String> = m.lr.keys().map(|g| format!("lr/{g}")).collect();
        let mut vals: Vec<(&str, f64)> = vec![
            ("train/loss", m.loss),
            ("train/grad_norm", m.grad_norm),
            ("train/tokens_per_sec", m.tokens_per_sec),
        ];
        for (tag, v) in lr_tags.iter().zip(m.lr.values()) {
            vals.push((tag.as_str(), *v));
        }
        // Objective metrics under `train/` as transformers' TensorBoard callback writes TRL's
        // (`train/rewards/chosen`, ...).
        let extra_tags: Vec<String> = m.extra.keys().map(|k| format!("train/{k}")).collect();
        for (tag, v) in extra_tags.iter().zip(m.extra.values()) {
            vals.push((tag.as_str(), *v));
        }
        self.writer()?.scalars(m.step as i64, &vals)
    }
    fn on_eval_end(&mut self, ctl: &mut Control<'_>, m: &EvalMetrics) -> Result<()> {
        if !ctl.is_main {
            return Ok(());
        }
        let extra_tags: Vec<String> = m.extra.keys().map(|k| format!("eval/{k}")).collect();
        let mut vals: Vec<(&str, f64)> = vec![("eval/loss", m.eval_loss)];
        for (tag, v) in extra_tags.iter().zip(m.extra.values()) {
            vals.push((tag.as_str(), *v));
        }
        self.writer()?.scalars(m.step as i64, &vals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_vector() {
        // CRC-32C("123456789") = 0xE3069283 (RFC 3720, appendix B.4 check value)
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn two_writers_in_one_dir_get_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = TensorBoardWriter::create(dir.path()).unwrap();
        let mut b = TensorBoardWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        a.scalars(1, &[("x", 1.0)]).unwrap();
        b.text(1, "t", "hello").unwrap();
        a.scalars(2, &[("x", 2.0)]).unwrap();
        // each file is its own sequence of whole records: header + events
        for (w, n) in [(&a, 3), (&b, 2)] {
            let bytes = std::fs::read(w.path()).unwrap();
            let (mut i, mut records) = (0usize, 0);
            while i < bytes.len() {
                let len = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap()) as usize;
                assert_eq!(
                    u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap()),
                    masked_crc(&bytes[i + 12..i + 12 + len])
                );
                i += 16 + len;
                records += 1;
            }
            assert_eq!((i, records), (bytes.len(), n));
        }
    }

    #[test]
    fn varint_encoding() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, vec![0xAC, 0x02]); // protobuf encoding docs' example
    }
}
