//! Loss, forward and backward of one micro-batch, with and without gradient checkpointing.
//!
//! The loss is the cross-entropy summed over the label tokens (labels shifted by one, -100
//! ignored), exactly transformers' `ForCausalLMLoss` with `reduction="sum"`; the trainer divides by
//! the number of label tokens of the whole optimizer step (all micro-batches, all ranks), so
//! gradient accumulation gives the same update as one large batch.
//!
//! Logits are computed only at positions that carry a label: for SFT data, where prompts are
//! masked, that skips a large part of the LM head's work without changing any number.

use tch::{Device, Kind, Tensor};

use crate::amp::Autocast;
use crate::data::{Batch, IGNORE_INDEX};
use crate::error::{Result, TchResultExt};
use crate::model::{CausalLm, ForwardInput};

pub use crate::amp::Precision;

/// A batch moved to the device, with the positions that carry a label.
pub(crate) struct Prepared {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub position_ids: Option<Tensor>,
    /// Flat indices into `[batch * (seq - 1)]` of the positions whose next token is a label.
    pub label_pos: Tensor,
    /// The target token at each of those positions.
    pub targets: Tensor,
    pub n_labels: i64,
    pub n_inputs: i64,
}

/// Moves `batch` to `device` and finds the label positions (shifted by one).
pub(crate) fn prepare(batch: &Batch, device: Device) -> Result<Prepared> {
    let ids = batch.input_ids.f_to(device).ctx("input_ids to device")?;
    let mask = batch
        .attention_mask
        .f_to(device)
        .ctx("attention_mask to device")?;
    let labels = batch.labels.f_to(device).ctx("labels to device")?;
    let size = ids.size();
    if size.len() != 2 || labels.size() != size {
        return Err(crate::Error::Shape {
            op: "train step".into(),
            msg: format!(
                "batch input_ids {:?} and labels {:?} must both be [batch, seq]",
                size,
                labels.size()
            ),
        });
    }
    let (b, t) = (size[0], size[1]);
    let shifted = labels
        .f_narrow(1, 1, t - 1)
        .ctx("shift labels")?
        .reshape([b * (t - 1)]);
    let keep = shifted.f_ne(IGNORE_INDEX).ctx("label mask")?;
    let label_pos = keep.f_nonzero().ctx("label positions")?.reshape([-1]);
    let targets = shifted.f_index_select(0, &label_pos).ctx("targets")?;
    let n_labels = label_pos.size()[0];
    let n_inputs = if mask.dim() == 2 {
        mask.f_sum(Kind::Int64)
            .ctx("count tokens")?
            .int64_value(&[])
    } else {
        b * t
    };
    Ok(Prepared {
        input_ids: ids,
        attention_mask: mask,
        position_ids: batch
            .position_ids
            .as_ref()
            .map(|p| p.f_to(device))
            .transpose()
            .ctx("position_ids to device")?,
        label_pos,
        targets,
        n_labels,
        n_inputs,
    })
}

/// Summed cross-entropy of the label positions from the last hidden states `[b, t, h]`: the
/// loss times `scale` (the tensor to call backward on) and the unscaled sum.
///
/// On the CPU in fp32 with a plain dense LM head, the head product and the cross-entropy run as
/// one fused op ([`crate::fused::linear_cross_entropy`], or
/// [`crate::fused::linear_cross_entropy_softcapped`] when the model soft-caps its logits, as
/// Gemma 2 does): the logits are formed a chunk of rows at a time (32 to 256 MiB), soft-capped,
/// overwritten by their gradient and freed, never all `[labels, vocab]` of them with their
/// log-softmax. Otherwise the composite ops run.
pub(crate) fn head_loss(
    model: &dyn CausalLm,
    hidden: &Tensor,
    p: &Prepared,
    scale: f64,
) -> Result<(Tensor, f64)> {
    let size = hidden.size();
    let (b, t, h) = (size[0], size[1], size[2]);
    let flat = hidden
        .f_narrow(1, 0, t - 1)
        .ctx("shift hidden")?
        .f_reshape([b * (t - 1), h])
        .ctx("flatten hidden")?;
    let sel = flat
        .f_index_select(0, &p.label_pos)
        .ctx("select label positions")?;
    if let Some(w) = model.head_weight()
        && crate::fused::applies(&sel)
        && crate::fused::applies(&w)
    {
        let normed = model.head_norm(&sel)?;
        return match model.head_softcap() {
            Some(cap) => crate::fused::linear_cross_entropy_softcapped(
                &normed,
                &w,
                &p.targets,
                IGNORE_INDEX,
                scale,
                cap,
            ),
            None => {
                crate::fused::linear_cross_entropy(&normed, &w, &p.targets, IGNORE_INDEX, scale)
            }
        };
    }
    let logits = model
        .head(&sel)?
        .f_to_kind(Kind::Float)
        .ctx("logits to fp32")?;
    let loss = logits
        .f_cross_entropy_loss::<&Tensor>(&p.targets, None, tch::Reduction::Sum, IGNORE_INDEX, 0.0)
        .ctx("cross entropy")?;
    let value = loss.f_double_value(&[]).ctx("loss value")?;
    Ok((loss * scale, value))
}

fn input<'a>(p: &'a Prepared) -> ForwardInput<'a> {
    ForwardInput {
        input_ids: &p.input_ids,
        attention_mask: Some(&p.attention_mask),
        position_ids: p.position_ids.as_ref(),
    }
}

/// Dropout inside the model draws from libtorch's global generator. Seeding it per
/// (run seed, step, micro-batch, layer) makes every step reproducible (exact resume without
/// saving generator state) and makes a recomputed layer draw the same masks as its first pass.
pub(crate) fn seed_for(seed: u64, step: u64, micro: usize, layer: usize) {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [step, micro as u64, layer as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    tch::manual_seed((x >> 1) as i64);
}

/// Forward, loss (summed over label tokens) times `scale`, and backward. Returns the unscaled
/// summed loss. With `checkpoint`, each decoder layer's activations are dropped after the
/// forward pass and recomputed during backward.
///
/// Forward passes (and recomputations) run inside `amp`'s autocast region, backward passes
/// outside it, as PyTorch's recipe (`with torch.autocast(...): loss = ...; loss.backward()`) and
/// `torch.utils.checkpoint` do.
pub(crate) fn forward_backward(
    model: &dyn CausalLm,
    p: &Prepared,
    scale: f64,
    checkpoint: bool,
    seed: (u64, u64, usize),
    amp: Autocast,
) -> Result<f64> {
    forward_backward_with(model, p, checkpoint, seed, amp, &mut |h| {
        head_loss(model, h, p, scale)
    })
}

/// What the last hidden states `[b, t, h]` become: the tensor to call backward on (the loss,
/// already scaled) and the value to report.
pub(crate) type HeadFn<'a> = dyn FnMut(&Tensor) -> Result<(Tensor, f64)> + 'a;

/// [`forward_backward`] with any loss on the last hidden states (`head`), e.g. a preference
/// objective's. Returns what `head` reports.
pub(crate) fn forward_backward_with(
    model: &dyn CausalLm,
    p: &Prepared,
    checkpoint: bool,
    seed: (u64, u64, usize),
    amp: Autocast,
    head: &mut HeadFn<'_>,
) -> Result<f64> {
    let (run_seed, step, micro) = seed;
    let ctx = model.prepare(&input(p))?;
    let n = model.num_layers();
    if !checkpoint {
        let (loss, value) = amp.run(|| {
            let mut h = model.embed(&p.input_ids)?;
            for i in 0..n {
                seed_for(run_seed, step, micro, i);
                h = model.layer(i, &h, &ctx, true)?;
            }
            head(&h)
        })?;
        loss.f_backward().ctx("backward")?;
        return Ok(value);
    }

    let emb = amp.run(|| model.embed(&p.input_ids))?;
    // Pass 1, no graph: keep only each layer's input.
    let mut inputs = Vec::with_capacity(n + 1);
    amp.run(|| {
        let _g = tch::no_grad_guard();
        let mut h = emb.f_detach().ctx("detach embeddings")?;
        for i in 0..n {
            seed_for(run_seed, step, micro, i);
            let next = model.layer(i, &h, &ctx, true)?;
            inputs.push(h);
            h = next;
        }
        inputs.push(h);
        Ok(())
    })?;
    // Head: gradient with respect to the last hidden state.
    let last = inputs[n].f_detach().ctx("detach")?.set_requires_grad(true);
    let (loss, value) = amp.run(|| head(&last))?;
    loss.f_backward().ctx("backward head")?;
    let mut grad = last.grad();
    // Layers in reverse: recompute with a graph, back-propagate the incoming gradient.
    for i in (0..n).rev() {
        let x = inputs[i].f_detach().ctx("detach")?.set_requires_grad(true);
        seed_for(run_seed, step, micro, i);
        let y = amp.run(|| model.layer(i, &x, &ctx, true))?;
        y.f_mul(&grad)
            .ctx("grad surrogate")?
            .f_sum(y.kind())
            .ctx("grad surrogate")?
            .f_backward()
            .ctx("backward layer")?;
        grad = x.grad();
        inputs.truncate(i + 1);
    }
    if emb.requires_grad() {
        emb.f_mul(&grad)
            .ctx("grad surrogate")?
            .f_sum(emb.kind())
            .ctx("grad surrogate")?
            .f_backward()
            .ctx("backward embeddings")?;
    }
    Ok(value)
}

/// Summed loss of a batch without gradients (evaluation).
pub(crate) fn eval_loss(model: &dyn CausalLm, p: &Prepared, amp: Autocast) -> Result<f64> {
    let _g = tch::no_grad_guard();
    amp.run(|| {
        let h = hidden_states(model, p, false)?;
        Ok(head_loss(model, &h, p, 1.0)?.1)
    })
}

/// The last hidden states `[b, t, h]` of a batch (with a graph unless under `no_grad`).
pub(crate) fn hidden_states(model: &dyn CausalLm, p: &Prepared, train: bool) -> Result<Tensor> {
    let ctx = model.prepare(&input(p))?;
    let mut h = model.embed(&p.input_ids)?;
    for i in 0..model.num_layers() {
        h = model.layer(i, &h, &ctx, train)?;
    }
    Ok(h)
}
