//! Resume checkpoints: `<output_dir>/last/` holds the trainable weights, the optimizer state,
//! the callbacks' state and the trainer state (step, data position). Written into a temporary
//! directory and renamed into place, so a crash never leaves a `last/` that looks complete but
//! is not. [`Trainer`]'s side (what it saves, how it restores) is at the end of this file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::builder::join_names;
use super::{LossScaler, Trainer};
use crate::error::{Error, Result, TchResultExt, write_atomic};
use crate::optim::StateDict;

/// File names inside a checkpoint directory.
const WEIGHTS: &str = "trainable.safetensors";
const OPT_TENSORS: &str = "optimizer.safetensors";
const OPT_SCALARS: &str = "optimizer.json";
const STATE: &str = "trainer_state.json";

/// The file in `last/` with the callbacks' state
/// ([`Callback::state_dict`](crate::callback::Callback::state_dict)): one JSON object, each
/// stateful callback's state under its key (its name; the second callback of the same name
/// `name#2`, and so on). Written only when some callback has state.
pub const CALLBACK_STATE: &str = "callbacks.json";

/// Where the trainer is, for exact resume.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: usize,
    /// Micro-batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Label tokens trained on so far.
    pub label_tokens: u64,
    /// Input tokens seen so far.
    pub input_tokens: u64,
    /// Steps skipped for non-finite values.
    pub skipped_steps: u64,
    /// Run seed (data order and dropout derive from it).
    pub seed: u64,
    /// Data-parallel world size the checkpoint was written with.
    pub world_size: usize,
    /// fp16's loss scaler (scale and clean-step count), when the run scales the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::amp::LossScalerState>,
}

/// The resume directory of an output directory.
pub fn last_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("last")
}

/// Writes a resume checkpoint atomically into `<output_dir>/last/`.
pub fn save(
    output_dir: &Path,
    state: &TrainState,
    trainable: &[(String, Tensor)],
    optim: &StateDict,
    callbacks: &BTreeMap<String, serde_json::Value>,
    extra: &[(String, Vec<u8>)],
) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".last.tmp-")
        .tempdir_in(output_dir)
        .map_err(|e| Error::io(output_dir, e))?;
    let w = tmp.path().join(WEIGHTS);
    let cpu: Vec<(String, Tensor)> = trainable
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.f_detach()
                    .ctx("detach")?
                    .f_to(tch::Device::Cpu)
                    .ctx("to cpu")?,
            ))
        })
        .collect::<Result<_>>()?;
    Tensor::write_safetensors(&cpu, &w).ctx(format!("write {}", w.display()))?;
    let o = tmp.path().join(OPT_TENSORS);
    let opt_t: Vec<(String, Tensor)> = optim
        .tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_to(tch::Device::Cpu).ctx("to cpu")?)))
        .collect::<Result<_>>()?;
    if !opt_t.is_empty() {
        Tensor::write_safetensors(&opt_t, &o).ctx(format!("write {}", o.display()))?;
    }
    let scalars = serde_json::to_vec_pretty(&optim.scalars).map_err(|e| Error::Json {
        path: tmp.path().join(OPT_SCALARS),
        source: e,
    })?;
    write_atomic(&tmp.path().join(OPT_SCALARS), &scalars)?;
    if !callbacks.is_empty() {
        let cp = tmp.path().join(CALLBACK_STATE);
        let json = serde_json::to_vec_pretty(callbacks).map_err(|e| Error::Json {
            path: cp.clone(),
            source: e,
        })?;
        write_atomic(&cp, &json)?;
    }
    for (name, bytes) in extra {
        write_atomic(&tmp.path().join(name), bytes)?;
    }
    // The state file is written last: a directory without it is never trusted.
    let st = serde_json::to_vec_pretty(state).map_err(|e| Error::Json {
        path: tmp.path().join(STATE),
        source: e,
    })?;
    write_atomic(&tmp.path().join(STATE), &st)?;

    let dst = last_dir(output_dir);
    let kept = tmp.keep();
    crate::error::swap_dir_atomic(&kept, &dst)?;
    Ok(dst)
}

/// What a checkpoint holds.
pub struct Loaded {
    /// Step, epoch and batch position (`trainer_state.json`).
    pub state: TrainState,
    /// The trainable parameters' values by name, on the CPU.
    pub trainable: Vec<(String, Tensor)>,
    /// The optimizer's state (keys `<param>.<what>`).
    pub optim: StateDict,
    /// The callbacks' state by key ([`CALLBACK_STATE`]); empty when the checkpoint has none.
    pub callbacks: BTreeMap<String, serde_json::Value>,
}

/// Reads `<output_dir>/last/` (or the previous one if a crash happened mid-swap).
pub fn load(output_dir: &Path) -> Result<Loaded> {
    let mut dir = last_dir(output_dir);
    if !dir.join(STATE).exists() {
        let old = output_dir.join(".last.old");
        if old.join(STATE).exists() {
            dir = old;
        } else {
            return Err(Error::checkpoint(
                &dir,
                "no resume checkpoint here (trainer_state.json missing); start without --resume",
            ));
        }
    }
    let sp = dir.join(STATE);
    let bytes = std::fs::read(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: sp,
        source: e,
    })?;
    let wp = dir.join(WEIGHTS);
    let trainable = Tensor::read_safetensors(&wp)
        .map_err(|e| Error::checkpoint(&wp, format!("cannot read trainable weights: {e}")))?;
    let op = dir.join(OPT_TENSORS);
    let tensors = if op.exists() {
        Tensor::read_safetensors(&op)
            .map_err(|e| Error::checkpoint(&op, format!("cannot read optimizer state: {e}")))?
            .into_iter()
            .collect()
    } else {
        Default::default()
    };
    let osp = dir.join(OPT_SCALARS);
    let ob = std::fs::read(&osp).map_err(|e| Error::io(&osp, e))?;
    let scalars = serde_json::from_slice(&ob).map_err(|e| Error::Json {
        path: osp,
        source: e,
    })?;
    let cp = dir.join(CALLBACK_STATE);
    let callbacks = if cp.exists() {
        let cb = std::fs::read(&cp).map_err(|e| Error::io(&cp, e))?;
        serde_json::from_slice(&cb).map_err(|e| Error::Json {
            path: cp,
            source: e,
        })?
    } else {
        BTreeMap::new()
    };
    Ok(Loaded {
        state,
        trainable,
        optim: StateDict { tensors, scalars },
        callbacks,
    })
}

/// The key of each callback's state in [`CALLBACK_STATE`]: its name, and `name#n` for the n-th
/// callback of the same name (n >= 2), so the order of differently named callbacks may change
/// between a run and its resume.
pub(super) fn callback_keys<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    names
        .into_iter()
        .map(|n| {
            let k = seen.entry(n).or_default();
            *k += 1;
            if *k == 1 {
                n.to_string()
            } else {
                format!("{n}#{k}")
            }
        })
        .collect()
}

impl Trainer {
    /// Restores the weights, the optimizer, the callbacks, the position and the loss scaler
    /// from `<output_dir>/last/`.
    pub(super) fn restore(&mut self) -> Result<()> {
        let loaded = load(&self.output_dir)?;
        let world = self.state.world_size;
        if loaded.state.world_size != world {
            return Err(Error::checkpoint(
                last_dir(&self.output_dir),
                format!(
                    "written with world size {} but this run has {world}; resume with the same number of processes",
                    loaded.state.world_size
                ),
            ));
        }
        let mut saved: BTreeMap<String, Tensor> = loaded.trainable.into_iter().collect();
        let _g = tch::no_grad_guard();
        for (name, mut p) in self.trainable() {
            let src = saved.remove(&name).ok_or_else(|| {
                Error::checkpoint(
                    last_dir(&self.output_dir),
                    format!("trainable parameter `{name}` is not in the checkpoint"),
                )
            })?;
            if src.size() != p.size() {
                return Err(Error::checkpoint(
                    last_dir(&self.output_dir),
                    format!(
                        "`{name}`: checkpoint shape {:?}, model {:?}",
                        src.size(),
                        p.size()
                    ),
                ));
            }
            p.f_copy_(&src).ctx(format!("restore {name}"))?;
        }
        if !saved.is_empty() {
            let names: Vec<String> = saved.into_keys().collect();
            return Err(Error::checkpoint(
                last_dir(&self.output_dir),
                format!(
                    "checkpoint has tensors the model does not train: {}",
                    join_names(&names)
                ),
            ));
        }
        self.optimizer.load_state_dict(&loaded.optim)?;
        self.restore_callbacks(loaded.callbacks)?;
        let seed = self.state.seed;
        self.state = loaded.state;
        self.state.seed = seed;
        self.restore_scaler()?;
        tracing::info!(
            step = self.state.step,
            epoch = self.state.epoch,
            "resumed from {}",
            last_dir(&self.output_dir).display()
        );
        Ok(())
    }

    /// Writes `<output_dir>/last/`: weights, optimizer, callbacks, position, loss scaler.
    pub(super) fn save_resume(&mut self) -> Result<PathBuf> {
        let sd = self.optimizer.state_dict()?;
        self.state.loss_scaler = self.scaler.as_ref().map(LossScaler::state).transpose()?;
        let callbacks = self.callback_states()?;
        save(
            &self.output_dir,
            &self.state,
            &self.trainable(),
            &sd,
            &callbacks,
            &self.checkpoint_files,
        )
    }

    /// Every stateful callback's state, by key (see [`callback_keys`]).
    fn callback_states(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let keys = callback_keys(self.callbacks.iter().map(|c| c.name()));
        let mut out = BTreeMap::new();
        for (cb, key) in self.callbacks.iter().zip(keys) {
            let state = cb.state_dict().inspect_err(|e| {
                tracing::error!(callback = %key, "callback state_dict failed: {e}");
            })?;
            if let Some(s) = state {
                out.insert(key, s);
            }
        }
        Ok(out)
    }

    /// Gives each callback its state from the checkpoint. A state without a callback of its key
    /// in this run is an error; a stateful callback without a saved state starts afresh (a
    /// checkpoint written before it was added), with a warning.
    fn restore_callbacks(&mut self, mut saved: BTreeMap<String, serde_json::Value>) -> Result<()> {
        let dir = last_dir(&self.output_dir);
        let keys = callback_keys(self.callbacks.iter().map(|c| c.name()));
        let unknown: Vec<&String> = saved.keys().filter(|k| !keys.contains(k)).collect();
        if !unknown.is_empty() {
            return Err(Error::checkpoint(
                &dir,
                format!(
                    "{CALLBACK_STATE} holds the state of callback(s) {} that this run does not \
                     have (callbacks are matched by name); add them back, or remove their \
                     entries to drop their state",
                    join_names(&unknown)
                ),
            ));
        }
        for (cb, key) in self.callbacks.iter_mut().zip(keys) {
            match saved.remove(&key) {
                Some(state) => cb.load_state_dict(state).map_err(|e| {
                    Error::checkpoint(&dir, format!("callback `{key}`: load_state_dict: {e}"))
                })?,
                None => {
                    if cb.state_dict().is_ok_and(|s| s.is_some()) {
                        tracing::warn!(
                            "callback `{key}` has no state in {}; it starts afresh",
                            dir.join(CALLBACK_STATE).display()
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let st = TrainState {
            step: 7,
            epoch: 1,
            batch_in_epoch: 3,
            seed: 42,
            world_size: 1,
            ..Default::default()
        };
        let w = vec![("a.weight".to_string(), Tensor::from_slice(&[1f32, 2., 3.]))];
        let mut sd = StateDict::default();
        sd.tensors
            .insert("a.weight.exp_avg".into(), Tensor::from_slice(&[0.5f32]));
        sd.scalars.insert("a.weight.step".into(), 7.0);
        save(dir.path(), &st, &w, &sd, &BTreeMap::new(), &[]).unwrap();
        // a second save replaces the first completely
        let st2 = TrainState {
            step: 8,
            ..st.clone()
        };
        let mut cbs = BTreeMap::new();
        cbs.insert(
            "loss_spike".to_string(),
            serde_json::json!({"recent": [1.5, 2.0]}),
        );
        save(dir.path(), &st2, &w, &sd, &cbs, &[]).unwrap();
        let l = load(dir.path()).unwrap();
        assert_eq!(l.state, st2);
        assert_eq!(l.trainable.len(), 1);
        let v: Vec<f32> = l.trainable[0].1.shallow_clone().try_into().unwrap();
        assert_eq!(v, vec![1., 2., 3.]);
        assert_eq!(l.optim.scalars["a.weight.step"], 7.0);
        assert_eq!(l.callbacks, cbs);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["last".to_string()]);
    }

    #[test]
    fn missing_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("trainer_state.json missing"), "{e}");
    }
}
