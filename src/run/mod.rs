//! Keeping a run's output directory safe from the world around it: stop signals (preemption),
//! one writer per output directory, no silent overwrite of checkpoints, and resume only under a
//! config that trains the same way.
//!
//! [`crate::sft::run_sft`] applies all of it; a host application that drives the
//! [`crate::trainer::Trainer`] itself can use the same pieces.

mod lock;
mod resume;
mod signals;

use std::path::{Path, PathBuf};

pub use lock::{LOCK_FILE, LockHolder, OutputLock, host_name};
pub use resume::{
    CHECKPOINT_CONFIG, Difference, HARMLESS_KEYS, LENGTH_KEYS, check_resume_config, diff_configs,
    flatten, length_free_schedule,
};
pub use signals::{STOP_SIGNALS, SignalAction, SignalCounter, StopSignals, signal_name};

use crate::error::{Error, Result};

/// Checkpoints in `dir` that a new run would train over: `last/` (or `.last.old/`, its copy
/// during a swap), `final/` (the end-of-run weights, or `.final.old/`) and `epoch-N/`
/// directories.
pub fn existing_checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for name in ["last", ".last.old", "final", ".final.old"] {
        let d = dir.join(name);
        if d.is_dir() {
            found.push(d);
        }
    }
    for (_, d) in crate::callback::epoch_dirs(dir)? {
        found.push(d);
    }
    Ok(found)
}

/// The Hugging Face Trainer's rule for a new run (no `--resume`): an output directory that holds
/// checkpoints is refused unless `overwrite` (`training.overwrite_output_dir: true`). When
/// overwriting, the old resume checkpoint is removed, so a later `--resume` cannot pick up the
/// old run's position; `epoch-N/` directories are replaced as the new run reaches them.
pub fn check_fresh_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let found = existing_checkpoints(dir)?;
    if found.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let names: Vec<String> = found
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        return Err(Error::config(
            "training.overwrite_output_dir",
            format!(
                "{} already holds checkpoints ({}); continue that run with --resume, choose \
                 another training.output_dir, or set training.overwrite_output_dir: true to \
                 train over them",
                dir.display(),
                names.join(", ")
            ),
        ));
    }
    for name in ["last", ".last.old"] {
        let d = dir.join(name);
        if d.is_dir() {
            tracing::warn!(
                "training.overwrite_output_dir: removing the old resume checkpoint {}",
                d.display()
            );
            std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
    }
    Ok(())
}

/// The checkpoint `--resume` reads: `last/`, or `.last.old/` when a crash came mid-swap.
pub fn resume_checkpoint_dir(output_dir: &Path) -> PathBuf {
    let last = crate::trainer::last_dir(output_dir);
    let old = output_dir.join(".last.old");
    if !last.join("trainer_state.json").exists() && old.join("trainer_state.json").exists() {
        old
    } else {
        last
    }
}

/// Everything that guards an output directory before a run does any work: on the main process
/// (`is_main`, the one that writes) the [`OutputLock`], the removal of temporaries left by a
/// killed run and, for a new run, [`check_fresh_output_dir`]; on every process, for a resumed
/// run, [`check_resume_config`] against the resolved config `resolved_yaml`. Keep the returned
/// lock alive for the whole run.
pub fn prepare_output_dir(
    output_dir: &Path,
    overwrite: bool,
    resume: bool,
    resolved_yaml: &str,
    is_main: bool,
) -> Result<Option<OutputLock>> {
    let lock = if is_main {
        let lock = OutputLock::acquire(output_dir)?;
        remove_stale_temporaries(output_dir)?;
        if !resume {
            check_fresh_output_dir(output_dir, overwrite)?;
        }
        Some(lock)
    } else {
        None
    };
    if resume {
        check_resume_config(&resume_checkpoint_dir(output_dir), resolved_yaml)?;
    }
    Ok(lock)
}

/// Removes the temporary directories (`.last.tmp-*`, `.final.tmp-*`, `.epoch-N.tmp-*`) a killed
/// run left in `dir`. Call only while holding the directory's [`OutputLock`]: then no live writer
/// owns them.
pub fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = name.starts_with(".last.tmp-")
            || name.starts_with(".final.tmp-")
            || (name.starts_with(".epoch-") && name.contains(".tmp-"));
        if stale && entry.path().is_dir() {
            tracing::info!("removing {} (left by an interrupted save)", name);
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_run_over_checkpoints_is_refused_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        check_fresh_output_dir(dir.path(), false).unwrap();
        std::fs::create_dir_all(dir.path().join("epoch-1")).unwrap();
        std::fs::create_dir_all(dir.path().join("last")).unwrap();
        let e = check_fresh_output_dir(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training.overwrite_output_dir") && e.contains("last, epoch-1"),
            "{e}"
        );
        check_fresh_output_dir(dir.path(), true).unwrap();
        assert!(!dir.path().join("last").exists());
        assert!(dir.path().join("epoch-1").exists());
    }

    #[test]
    fn stale_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        for d in [".last.tmp-abc", ".epoch-2.tmp-xyz", "last", "epoch-2"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        remove_stale_temporaries(dir.path()).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["epoch-2", "last"]);
    }
}
