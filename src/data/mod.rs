//! Data: tokenizer, chat templates, datasets, collator. (Placeholder until the data module lands.)

use tch::Tensor;

/// A padded batch. Labels are not shifted (the trainer shifts, as transformers does).
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub position_ids: Option<Tensor>,
    pub labels: Tensor,
    /// Non-padding tokens in the batch.
    pub num_tokens: usize,
    /// Tokens that carry a label (before the trainer's shift).
    pub num_label_tokens: usize,
}
