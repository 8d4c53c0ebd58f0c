//! Collator: examples to padded (or packed) tensors.

use tch::{Device, Kind, Tensor};

use super::IGNORE_INDEX;
use super::dataset::Example;
use crate::error::{Error, Result, TchResultExt};

/// Which side padding goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    /// Padding after the tokens (training).
    #[default]
    Right,
    /// Padding before the tokens (batched generation).
    Left,
}

/// A batch for a causal LM.
///
/// * `input_ids` `[B, T]` i64.
/// * `attention_mask` `[B, T]` i64 (1 = token, 0 = padding), or, for packed rows, `[B, 1, T, T]`
///   bool where `true` means "query may attend to key": causal and block-diagonal per example
///   (padding queries attend only to themselves so no softmax row is empty).
/// * `position_ids` `[B, T]` i64: restart at 0 for each packed example; for left padding they
///   count from the first real token; `None` for right padding (positions are `0..T`).
/// * `labels` `[B, T]` i64, [`IGNORE_INDEX`] where no loss applies (padding, prompts, the first
///   token of each packed example). Not shifted: the trainer shifts, as transformers does.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[B, T]` i64.
    pub input_ids: Tensor,
    /// `[B, T]` i64 (1 = token), or `[B, 1, T, T]` bool for packed rows.
    pub attention_mask: Tensor,
    /// `[B, T]` i64 for packed rows and left padding; `None` when positions are `0..T`.
    pub position_ids: Option<Tensor>,
    /// `[B, T]` i64, [`IGNORE_INDEX`] where no loss applies; not shifted.
    pub labels: Tensor,
    /// Non-padding tokens in the batch.
    pub num_tokens: usize,
    /// Tokens that carry a label (before the trainer's shift).
    pub num_label_tokens: usize,
}

impl Batch {
    /// Moves every tensor to `device`.
    pub fn to_device(&self, device: Device) -> Result<Batch> {
        Ok(Batch {
            input_ids: self
                .input_ids
                .f_to(device)
                .ctx("batch input_ids to device")?,
            attention_mask: self
                .attention_mask
                .f_to(device)
                .ctx("batch attention_mask to device")?,
            position_ids: match &self.position_ids {
                Some(p) => Some(p.f_to(device).ctx("batch position_ids to device")?),
                None => None,
            },
            labels: self.labels.f_to(device).ctx("batch labels to device")?,
            num_tokens: self.num_tokens,
            num_label_tokens: self.num_label_tokens,
        })
    }

    /// Whether the attention mask is the 4-D packed form.
    pub fn is_packed(&self) -> bool {
        self.attention_mask.dim() == 4
    }
}

/// Pads (or packs) examples into a [`Batch`].
#[derive(Debug, Clone)]
pub struct Collator {
    /// Token id that fills padding positions of `input_ids`.
    pub pad_id: i64,
    /// Which side padding goes (right for training).
    pub padding_side: PaddingSide,
}

fn tensor2(v: &[i64], b: usize, t: usize, what: &str) -> Result<Tensor> {
    Tensor::f_from_slice(v)
        .and_then(|x| x.f_view([b as i64, t as i64]))
        .ctx(format!("collate {what} [{b}, {t}]"))
}

impl Collator {
    /// A collator padding with `pad_id` on `padding_side`.
    pub fn new(pad_id: i64, padding_side: PaddingSide) -> Self {
        Collator {
            pad_id,
            padding_side,
        }
    }

    /// Pads `examples` to the longest one (dynamic padding).
    pub fn collate(&self, examples: &[&Example]) -> Result<Batch> {
        if examples.is_empty() {
            return Err(Error::invalid("collate: empty batch"));
        }
        let b = examples.len();
        let t = examples.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; b * t];
        let mut mask = vec![0i64; b * t];
        let mut labels = vec![IGNORE_INDEX; b * t];
        let mut pos = vec![0i64; b * t];
        let (mut n_tok, mut n_lab) = (0, 0);
        for (r, e) in examples.iter().enumerate() {
            let n = e.len();
            let off = match self.padding_side {
                PaddingSide::Right => 0,
                PaddingSide::Left => t - n,
            };
            let row = r * t + off;
            ids[row..row + n].copy_from_slice(&e.input_ids);
            labels[row..row + n].copy_from_slice(&e.labels);
            for j in 0..n {
                mask[row + j] = 1;
                pos[row + j] = j as i64;
            }
            n_tok += n;
            n_lab += e.num_label_tokens();
        }
        let position_ids = match self.padding_side {
            PaddingSide::Right => None,
            PaddingSide::Left => Some(tensor2(&pos, b, t, "position_ids")?),
        };
        Ok(Batch {
            input_ids: tensor2(&ids, b, t, "input_ids")?,
            attention_mask: tensor2(&mask, b, t, "attention_mask")?,
            position_ids,
            labels: tensor2(&labels, b, t, "labels")?,
            num_tokens: n_tok,
            num_label_tokens: n_lab,
        })
    }

    /// Packs each row's examples back to back (padding at the right end of the row). The first
    /// token of every example gets no label, so the shifted loss never predicts across an
    /// example boundary (as transformers' `DataCollatorWithFlattening`).
    pub fn collate_packed(&self, rows: &[Vec<&Example>]) -> Result<Batch> {
        if rows.is_empty() {
            return Err(Error::invalid("collate_packed: empty batch"));
        }
        let b = rows.len();
        let t = rows
            .iter()
            .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = vec![self.pad_id; b * t];
        let mut labels = vec![IGNORE_INDEX; b * t];
        let mut pos = vec![0i64; b * t];
        let mut seg = vec![-1i64; b * t];
        let (mut n_tok, mut n_lab) = (0, 0);
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * t;
            for (s, e) in row.iter().enumerate() {
                let n = e.len();
                ids[at..at + n].copy_from_slice(&e.input_ids);
                labels[at..at + n].copy_from_slice(&e.labels);
                if n > 0 {
                    labels[at] = IGNORE_INDEX;
                }
                for j in 0..n {
                    pos[at + j] = j as i64;
                    seg[at + j] = s as i64;
                }
                n_tok += n;
                at += n;
            }
            n_lab += labels[r * t..(r + 1) * t]
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .count();
        }
        let mut mask = vec![false; b * t * t];
        for r in 0..b {
            for q in 0..t {
                let sq = seg[r * t + q];
                let base = (r * t + q) * t;
                if sq < 0 {
                    mask[base + q] = true;
                    continue;
                }
                for k in 0..=q {
                    mask[base + k] = seg[r * t + k] == sq;
                }
            }
        }
        let mask_t = Tensor::f_from_slice(&mask)
            .and_then(|x| x.f_view([b as i64, 1, t as i64, t as i64]))
            .ctx(format!("collate packed attention_mask [{b}, 1, {t}, {t}]"))?;
        Ok(Batch {
            input_ids: tensor2(&ids, b, t, "input_ids")?,
            attention_mask: mask_t.f_to_kind(Kind::Bool).ctx("packed mask to bool")?,
            position_ids: Some(tensor2(&pos, b, t, "position_ids")?),
            labels: tensor2(&labels, b, t, "labels")?,
            num_tokens: n_tok,
            num_label_tokens: n_lab,
        })
    }
}
