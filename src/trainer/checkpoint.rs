//! Resume checkpoints: `<output_dir>/last/` holds the trainable weights, the optimizer state and
//! the trainer state (step, data position). Written into a temporary directory and renamed into
//! place, so a crash never leaves a `last/` that looks complete but is not.

use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result, TchResultExt, write_atomic};
use crate::optim::StateDict;

/// File names inside a checkpoint directory.
const WEIGHTS: &str = "trainable.safetensors";
const OPT_TENSORS: &str = "optimizer.safetensors";
const OPT_SCALARS: &str = "optimizer.json";
const STATE: &str = "trainer_state.json";

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
    let old = output_dir.join(".last.old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if dst.exists() {
        std::fs::rename(&dst, &old).map_err(|e| Error::io(&dst, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &dst).map_err(|e| Error::io(&dst, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(dst)
}

/// What a checkpoint holds.
pub struct Loaded {
    pub state: TrainState,
    pub trainable: Vec<(String, Tensor)>,
    pub optim: StateDict,
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
    Ok(Loaded {
        state,
        trainable,
        optim: StateDict { tensors, scalars },
    })
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
        save(dir.path(), &st, &w, &sd, &[]).unwrap();
        // a second save replaces the first completely
        let st2 = TrainState {
            step: 8,
            ..st.clone()
        };
        save(dir.path(), &st2, &w, &sd, &[]).unwrap();
        let l = load(dir.path()).unwrap();
        assert_eq!(l.state, st2);
        assert_eq!(l.trainable.len(), 1);
        let v: Vec<f32> = l.trainable[0].1.shallow_clone().try_into().unwrap();
        assert_eq!(v, vec![1., 2., 3.]);
        assert_eq!(l.optim.scalars["a.weight.step"], 7.0);
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
