//! One error type for the whole crate.
//!
//! Every variant carries what a user needs to fix the problem: the file, the line, the config key,
//! the tensor names, the expected and found versions. Nothing reachable from user input, a data
//! file, a checkpoint or a plugin panics; it returns one of these.

use std::path::PathBuf;

/// Crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in VoltTrain.
///
/// `#[non_exhaustive]`: new variants may come in minor releases, so a `match` needs a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory (`<stdout>` for the standard output).
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A configuration value is missing, unknown or invalid. `key` is the dotted path
    /// (`training.lr`, `lora.target_modules[2]`).
    #[error("config {}: `{key}`: {msg}", file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<in memory>".into()))]
    Config {
        /// The YAML file the value came from; `None` for a config built in memory.
        file: Option<PathBuf>,
        /// The dotted key (`.` for the whole document).
        key: String,
        /// What is wrong and what is accepted.
        msg: String,
    },

    /// A data file has a bad record. `line` is 1-based (a row number for Parquet).
    #[error("{}:{line}: {msg}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line (JSONL) or row (Parquet) of the bad record.
        line: usize,
        /// What is wrong with the record.
        msg: String,
    },

    /// A model directory or checkpoint is unusable (architecture, tensor names, shapes, dtypes).
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The model directory, checkpoint directory or file.
        path: PathBuf,
        /// What does not fit (the tensor names, shapes, versions).
        msg: String,
    },

    /// Tokenizer or chat-template problem.
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file or the model directory holding it.
        path: PathBuf,
        /// What is wrong (a missing special token, a template that does not render).
        msg: String,
    },

    /// A plugin could not be loaded or registered, or its versions do not match the host.
    #[error("plugin {}: {msg}", path.display())]
    Plugin {
        /// The plugin library (or the name of a statically registered plugin).
        path: PathBuf,
        /// Why it could not be used (a missing symbol, an ABI or version mismatch).
        msg: String,
    },

    /// Two registered components share a name.
    #[error("duplicate {kind} `{name}`: registered by {first} and by {second}")]
    DuplicateComponent {
        /// The registry (`optimizer`, `scheduler`, `callback`, ...).
        kind: &'static str,
        /// The name registered twice.
        name: String,
        /// Who registered it first (`built-in` or a plugin's path).
        first: String,
        /// Who tried to register it again.
        second: String,
    },

    /// A component name was not found in a registry.
    #[error("unknown {kind} `{name}`; known: {known}")]
    UnknownComponent {
        /// The registry searched (`optimizer`, `scheduler`, `callback`, ...).
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },

    /// An argument to an API call is invalid (a value or a combination of values) and no more
    /// specific variant fits.
    #[error("{0}")]
    InvalidArgument(String),

    /// A tensor's shape or dtype does not fit the operation `op` (model inputs, attention masks,
    /// KV caches, quantized weights, optimizer gradients).
    #[error("{op}: {msg}")]
    Shape {
        /// The operation (`forward`, `kv cache`, `selective scan`).
        op: String,
        /// The expected and the found shape or dtype.
        msg: String,
    },

    /// A saved state (optimizer, scheduler, callback, loss scaler, adapter) does not fit what
    /// loads it; `owner` names the component (`adamw`, `callback loss_spike`).
    #[error("{owner} state: {msg}")]
    State {
        /// The component whose state it is (`adamw`, ``callback `loss_spike` ``).
        owner: String,
        /// What does not fit (a missing key, a shape, an unknown version).
        msg: String,
    },

    /// The trainable parameters cannot be put into optimizer groups as asked (a parameter in no
    /// group or in two, a bad `lr_mult`, a non-float parameter).
    #[error("parameter groups: {0}")]
    ParamGroups(String),

    /// The model, device or build does not support what was asked (`what` names the feature:
    /// `kv cache`, `packed rows`, `sliding windows`).
    #[error("{what}: not supported: {msg}")]
    Unsupported {
        /// The feature asked for.
        what: String,
        /// Why it is not supported here, and what to do instead.
        msg: String,
    },

    /// An experiment tracker (`wandb`, `mlflow`) failed; under `on_error: fail` it stops the run.
    #[error("{tracker}: {msg}")]
    Tracker {
        /// The tracker (`wandb`, `mlflow`).
        tracker: String,
        /// What failed (the request and the answer, the sidecar's state).
        msg: String,
    },

    /// The operating system refused a resource VoltTrain needs that is not a file: a thread,
    /// the stop-signal handlers. `what` says what was being set up.
    #[error("{what}: {source}")]
    Os {
        /// What was being set up (`the signal thread`, `the stop-signal handlers`).
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A broken invariant inside VoltTrain (a worker thread panicked, an internal table is
    /// missing an entry): a bug to report, not a problem with the input.
    #[error("internal error (please report it): {0}")]
    Internal(String),

    /// Training produced a non-finite value.
    #[error("non-finite {what} at step {step}")]
    NonFinite {
        /// The optimizer step (1-based) that produced it.
        step: u64,
        /// What was non-finite, with its value (`loss (NaN)`, `gradient norm (inf)`).
        what: String,
    },

    /// Training was interrupted (Ctrl-C) after a resume checkpoint was written.
    #[error("interrupted at step {step}; resume checkpoint written to {}", dir.display())]
    Interrupted {
        /// The last optimizer step taken.
        step: u64,
        /// The resume checkpoint's directory (`<output_dir>/last`).
        dir: PathBuf,
    },

    /// Distributed (c10d) failure, with the C++ message.
    #[error("distributed: {0}")]
    Dist(String),

    /// A native kernel of VoltTrain's C++ kernel library failed or cannot run here: the fused
    /// CPU ops ([`crate::fused`]), autocast and loss scaling ([`crate::amp`]), the quantized
    /// linear, the selective scan. `op` names the operation (`fused rms_norm`,
    /// `loss scaler unscale`, ...), `msg` is libtorch's or the shim's message (a wrong shape or
    /// dtype, fused kernels switched off, a CPU without AVX2).
    #[error("{op}: {msg}")]
    Kernel {
        /// The operation (`fused rms_norm`, `loss scaler unscale`).
        op: String,
        /// libtorch's or the shim's message.
        msg: String,
    },

    /// A libtorch call failed; `context` says which operation.
    #[error("{context}: {source}")]
    Torch {
        /// The operation that called libtorch (`q_proj forward`).
        context: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },

    /// A JSON document could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// Another live run holds the output directory's lock (`path` is the lock file).
    #[error("{}: the output directory is in use by another run ({holder}); wait for it to end or stop it, or choose another `training.output_dir` (lock file {})", dir.display(), path.display())]
    Locked {
        /// The lock file (`<output_dir>/.volttrain.lock`).
        path: PathBuf,
        /// The run holding the lock (its pid, host and start time).
        holder: String,
        /// The output directory.
        dir: PathBuf,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for an [`Error::Io`] with the path that failed.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for an [`Error::Config`] without a file.
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            file: None,
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::Checkpoint`].
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Adds an operation name to a libtorch error: `t.f_matmul(&w).ctx("q_proj forward")?`.
pub trait TchResultExt<T> {
    /// Wraps a [`tch::TchError`] into [`Error::Torch`] with `context`.
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> TchResultExt<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Torch {
            context: context.into(),
            source,
        })
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A crash leaves either the old file or the new one, never a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Puts the complete directory `staged` in place as `dst` (`<dir>/<name>`), keeping the
/// previous one as `<dir>/.<name>.old` until the new one is in place. Every step is a rename, so
/// a crash or a kill at any point leaves `dst` and `.<name>.old` each either complete or absent
/// (at least one of them complete once a first swap is done); a directory being deleted is
/// first renamed to `.<name>.trash`, which nothing reads and the next swap clears.
pub fn swap_dir_atomic(staged: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let (dir, name) = match (dst.parent(), dst.file_name()) {
        (Some(d), Some(n)) => (d, n.to_string_lossy()),
        _ => {
            return Err(Error::Internal(format!(
                "swap_dir_atomic: {} has no parent directory",
                dst.display()
            )));
        }
    };
    let old = dir.join(format!(".{name}.old"));
    let trash = dir.join(format!(".{name}.trash"));
    let discard = |p: &std::path::Path| -> Result<()> {
        if trash.exists() {
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
        }
        if p.exists() {
            std::fs::rename(p, &trash).map_err(|e| Error::io(p, e))?;
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
        }
        Ok(())
    };
    discard(&old)?;
    if dst.exists() {
        std::fs::rename(dst, &old).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::rename(staged, dst).map_err(|e| Error::io(dst, e))?;
    discard(&old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_error_names_file_and_key() {
        let e = Error::Config {
            file: Some("config/sft.yaml".into()),
            key: "training.lr".into(),
            msg: "must be > 0, got -1".into(),
        };
        assert_eq!(
            e.to_string(),
            "config config/sft.yaml: `training.lr`: must be > 0, got -1"
        );
    }

    #[test]
    fn swap_dir_atomic_replaces_and_clears_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("last");
        let stage = |v: &str| {
            let s = tempfile::tempdir_in(d.path()).unwrap().keep();
            std::fs::write(s.join("f"), v).unwrap();
            s
        };
        swap_dir_atomic(&stage("1"), &dst).unwrap();
        // a crash mid-deletion earlier left a half-deleted trash, and a previous copy
        std::fs::create_dir_all(d.path().join(".last.trash/x")).unwrap();
        std::fs::create_dir_all(d.path().join(".last.old")).unwrap();
        swap_dir_atomic(&stage("2"), &dst).unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("f")).unwrap(), "2");
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["last"]);
    }

    #[test]
    fn write_atomic_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        // no temporary files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
