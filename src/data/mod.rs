//! Data: tokenizer, chat templates, datasets, collator. (Placeholder until the data module lands.)

use tch::Tensor;

/// A padded batch. Labels are not shifted (the trainer shifts, as transformers does).
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub position_ids: Option<Tensor>,
    pub labels: Tensor,
}
