//! The epoch-end saver (the reference system's `EpochEndSaver`), and what a YAML job saves
//! ([`SftSaver`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::adapter::AdapterInjector;
use crate::callback::{Callback, Control, ModelSaver};
use crate::data::Tokenizer;
use crate::error::{Error, Result, write_atomic};
use crate::model::{CausalLm, save_model};

/// What a YAML job (`volttrain sft`, `volttrain dpo`) saves into each `epoch-N/` and `final/`:
/// the adapter through the run's injector ([`AdapterInjector::save`]: PEFT's files for LoRA, the
/// injector's own for a plugin adapter) or, without an adapter, the full weights
/// ([`save_model`]); the tokenizer files with the chat template; and the resolved config as
/// `volttrain_config.yaml`. Every file is written atomically.
pub struct SftSaver {
    /// The injector that made the run's adapter (after `lora.init_from`, the one that loaded
    /// it); `None` for full fine-tuning.
    pub adapter: Option<Box<dyn AdapterInjector>>,
    /// Saved with its chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// The resolved config, written as `volttrain_config.yaml`.
    pub config_yaml: String,
}

impl SftSaver {
    /// A saver of the adapter of `adapter` (full weights without one), `tokenizer` and
    /// `config_yaml`.
    pub fn new(
        adapter: Option<Box<dyn AdapterInjector>>,
        tokenizer: Arc<Tokenizer>,
        config_yaml: impl Into<String>,
    ) -> Self {
        SftSaver {
            adapter,
            tokenizer,
            config_yaml: config_yaml.into(),
        }
    }
}

impl ModelSaver for SftSaver {
    fn save_to(&self, model: &dyn CausalLm, dir: &Path) -> Result<()> {
        match &self.adapter {
            Some(adapter) => adapter.save(model, dir)?,
            None => save_model(model, dir)?,
        }
        self.tokenizer.save_to(dir)?;
        write_atomic(
            &dir.join("volttrain_config.yaml"),
            self.config_yaml.as_bytes(),
        )
    }
}

/// At each epoch end, writes what the trainer's [`crate::callback::ModelSaver`] saves (PEFT
/// adapter or full weights, tokenizer files, chat template) into `<output_dir>/epoch-<N>/`
/// (N counts from 1) and keeps only the last `keep_last` such directories.
///
/// The directory is written under a temporary name and renamed into place, so a crash mid-save
/// never leaves an `epoch-N` that looks complete.
#[derive(Debug, Clone)]
pub struct EpochSaver {
    /// How many `epoch-N` directories to keep (0 keeps all).
    pub keep_last: usize,
    /// Save every `every` epochs (1 = each epoch).
    pub every: usize,
}

impl Default for EpochSaver {
    fn default() -> Self {
        EpochSaver {
            keep_last: 2,
            every: 1,
        }
    }
}

/// `epoch-N` directories under `dir`, sorted by N.
pub fn epoch_dirs(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("epoch-"))
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl EpochSaver {
    /// Saves into `<output_dir>/epoch-<epoch>` atomically and prunes; returns the directory.
    pub fn save(&self, ctl: &Control<'_>, epoch: usize) -> Result<PathBuf> {
        let out = ctl.output_dir;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".epoch-{epoch}.tmp-"))
            .tempdir_in(out)
            .map_err(|e| Error::io(out, e))?;
        ctl.saver.save_to(ctl.model, tmp.path())?;
        let dst = out.join(format!("epoch-{epoch}"));
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
        }
        let kept = tmp.keep();
        std::fs::rename(&kept, &dst).map_err(|e| Error::io(&dst, e))?;
        if self.keep_last > 0 {
            let dirs = epoch_dirs(out)?;
            let n = dirs.len();
            for (_, d) in dirs.into_iter().take(n.saturating_sub(self.keep_last)) {
                std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            }
        }
        Ok(dst)
    }
}

impl Callback for EpochSaver {
    fn name(&self) -> &str {
        "epoch_saver"
    }

    fn on_epoch_end(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        let epoch = ctl.epoch + 1;
        if !ctl.is_main || self.every == 0 || !epoch.is_multiple_of(self.every) {
            return Ok(());
        }
        let dir = self.save(ctl, epoch)?;
        tracing::info!("saved {}", dir.display());
        Ok(())
    }
}
