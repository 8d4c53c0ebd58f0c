//! Causal language models loaded from Hugging Face checkpoints.
//!
//! [`CausalLm`] is what the trainer drives. Besides a plain [`CausalLm::forward`], it exposes the
//! model in three stages (embedding, one decoder layer at a time, head) so the trainer can
//! recompute each layer during backward (gradient checkpointing) and compute logits only where
//! they are needed.
//!
//! Architectures: `LlamaForCausalLM` (SmolLM, Llama 3), `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM` (text), `Phi3ForCausalLM` (Phi-3,
//! Phi-4) and `SmolLM3ForCausalLM`, all through [`DecoderLm`] with their configuration rules in
//! [`llama`], [`mistral`], [`qwen2`], [`qwen3`], [`gemma`], [`phi3`], [`smollm3`].
//! State-space models (`MambaForCausalLM`, `FalconMambaForCausalLM`, `JambaForCausalLM` with
//! dense MLPs) load as [`SsmLm`] ([`mamba`], the selective scan in [`ssm`]).
//! [`load_model`] reads a Hugging Face directory, [`save_model`] writes one.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::nn::Linear;

mod config;
mod dtype;
pub mod gemma;
mod kv_cache;
pub mod llama;
mod loader;
pub mod mamba;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod safetensors;
pub mod smollm3;
pub mod ssm;

pub use config::{Activation, DecoderConfig, LayerRope};
pub use dtype::ModelDtype;
pub use kv_cache::{KvCache, LayerKv};
pub use llama::DecoderLm;
pub use mamba::{SsmConfig, SsmLm};

pub use loader::{
    LoadOptions, QuantizeFilter, SUPPORTED_ARCHITECTURES, decoder_config, default_quantize_filter,
    load_decoder, load_model, load_ssm, read_config, save_model,
};

/// The inputs of a forward pass. Shapes are `[batch, seq]`.
pub struct ForwardInput<'a> {
    /// Token ids, `Kind::Int64`.
    pub input_ids: &'a Tensor,
    /// Either a 2-D `[batch, seq]` padding mask (1 for real tokens, 0 for padding, left or
    /// right), or a 4-D boolean `[batch, 1, seq, seq]` mask (true = may attend) for packed rows
    /// (block-diagonal causal), which needs explicit `position_ids`. `None` means all ones.
    pub attention_mask: Option<&'a Tensor>,
    /// Position ids. `None` derives them from a 2-D mask as `cumsum(mask) - 1`, clamped at 0
    /// (so left padding works), or `0..seq` without a mask.
    pub position_ids: Option<&'a Tensor>,
}

/// Per-batch values every decoder layer needs, computed once by [`CausalLm::prepare`].
pub struct LayerCtx {
    /// RoPE cosines, `[batch, seq, head_dim]`.
    pub cos: Tensor,
    /// RoPE sines, `[batch, seq, head_dim]`.
    pub sin: Tensor,
    /// Boolean attention mask `[batch, 1, seq, seq]` (true = may attend), or `None` for plain
    /// causal.
    pub mask: Option<Tensor>,
    /// The mask of sliding-window layers (Mistral, Qwen2), when the model has any.
    pub sliding_mask: Option<Tensor>,
    /// The `(cos, sin)` of layers with a second RoPE (Gemma 3's sliding layers), when the model
    /// has them.
    pub local: Option<(Tensor, Tensor)>,
    /// The 2-D `[batch, seq]` padding mask (1 = token, 0 = padding) in the model's kind, for
    /// state-space (Mamba) layers, which zero padding positions; `None` without padding (and for
    /// models without such layers).
    pub padding: Option<Tensor>,
}

/// A decoder-only language model.
pub trait CausalLm: Send {
    /// The Hugging Face architecture name (`LlamaForCausalLM`, ...).
    fn architecture(&self) -> &str;
    /// The `config.json` the model was loaded from, to be saved back with it.
    fn hf_config(&self) -> &serde_json::Value;
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;
    /// Vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> i64;
    /// Device the parameters live on.
    fn device(&self) -> Device;
    /// Kind of the (dense) parameters.
    fn kind(&self) -> Kind;

    /// Token embeddings `[batch, seq, hidden]`.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor>;
    /// RoPE tables and attention mask for a batch.
    fn prepare(&self, input: &ForwardInput<'_>) -> Result<LayerCtx>;
    /// Decoder layer `i` on `hidden` `[batch, seq, hidden]`.
    fn layer(&self, i: usize, hidden: &Tensor, ctx: &LayerCtx, train: bool) -> Result<Tensor>;
    /// Final norm and LM head: hidden states of any leading shape to logits.
    fn head(&self, hidden: &Tensor) -> Result<Tensor>;
    /// The final norm alone: `head(h)` is `head_norm(h)` times [`CausalLm::head_weight`]`^T`
    /// (soft-capped by [`CausalLm::head_softcap`] when that is `Some`) when `head_weight` is
    /// `Some`. Only called when [`CausalLm::head_weight`] is `Some`; the default says it is not
    /// implemented.
    fn head_norm(&self, _hidden: &Tensor) -> Result<Tensor> {
        Err(crate::Error::Unsupported {
            what: format!("{}: head_norm", self.architecture()),
            msg: "the model does not implement it (implement it along with head_weight)".into(),
        })
    }
    /// The LM head's `[vocab, hidden]` weight when the head is a plain dense product (no bias,
    /// adapter or quantization), so the trainer may fuse it with the loss; `None` otherwise.
    fn head_weight(&self) -> Option<Tensor> {
        None
    }
    /// The final logit soft-cap `cap` of a model whose logits are `cap * tanh(z / cap)` of the
    /// head product `z` (Gemma 2's `final_logit_softcapping`); the fused head + loss applies it
    /// in each chunk. `None` (the default): the logits are the product.
    fn head_softcap(&self) -> Option<f64> {
        None
    }

    /// Logits `[batch, seq, vocab]`.
    fn forward(&self, input: &ForwardInput<'_>, train: bool) -> Result<Tensor> {
        let ctx = self.prepare(input)?;
        let mut h = self.embed(input.input_ids)?;
        for i in 0..self.num_layers() {
            h = self.layer(i, &h, &ctx, train)?;
        }
        self.head(&h)
    }

    /// Incremental decoding: logits `[batch, vocab]` of the last of `input_ids` (`[batch, new]`,
    /// no padding), which continue the positions already in `cache`, whose keys and values are
    /// appended to it. The default says the model does not support it.
    fn forward_cached(&self, _input_ids: &Tensor, _cache: &mut KvCache) -> Result<Tensor> {
        Err(crate::Error::Unsupported {
            what: format!(
                "{}: incremental decoding with a KV cache",
                self.architecture()
            ),
            msg: "the model does not implement forward_cached".into(),
        })
    }

    /// Every parameter with its Hugging Face name (`model.layers.0.self_attn.q_proj.weight`),
    /// adapters included (`...q_proj.lora_A.weight`). A tied LM head appears once, under the
    /// embedding's name. Trainable means `requires_grad()`.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Every linear module by its Hugging Face module name (`model.layers.0.mlp.up_proj`,
    /// `lm_head` when not tied), for quantizers and adapter injectors.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// The same modules as [`CausalLm::linears_mut`], read-only (savers).
    fn linears(&self) -> Vec<(String, &Linear)>;
    /// Name of the parameter the LM head multiplies by (its own or the tied embedding).
    fn lm_head_param(&self) -> &str;
    /// Name of the token embedding parameter.
    fn embed_param(&self) -> &str;

    /// Sets `requires_grad(false)` on every current parameter (before adapters are injected).
    fn freeze_base(&mut self) {
        for (_, p) in self.named_parameters() {
            let _ = p.set_requires_grad(false);
        }
    }
    /// The base model's tensors as a dense Hugging Face checkpoint holds them: quantized
    /// weights dequantized to [`CausalLm::kind`], adapter parameters left out.
    fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>>;
}
