//! The Llama decoder (`LlamaForCausalLM`, SmolLM, Llama 3): grouped-query attention with RoPE,
//! RMSNorm, SwiGLU MLP, optional tied embeddings. Mistral and Qwen2 reuse it with their own
//! configuration rules ([`super::mistral`], [`super::qwen2`]).
//!
//! Numerics follow transformers 5.23 `models/llama/modeling_llama.py`; attention runs through
//! libtorch's `scaled_dot_product_attention`.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::config::{DecoderConfig, base_config};
use super::{CausalLm, ForwardInput, LayerCtx};
use crate::error::{Error, Result, TchResultExt};
use crate::nn::{Linear, LinearWeight, apply_rope, rms_norm, rope_tables};

/// The configuration rules of `LlamaForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    base_config(path, v, "LlamaForCausalLM")
}

/// Where the decoder gets its tensors from while it is built (the checkpoint loader).
pub(crate) trait WeightSource {
    /// A dense parameter by its full name, in the model's kind and device.
    fn tensor(&mut self, name: &str) -> Result<Tensor>;
    /// The linear module `module` (`model.layers.0.mlp.up_proj`), possibly quantized.
    fn linear(&mut self, module: &str, bias: bool) -> Result<Linear>;
}

/// Every tensor a checkpoint of `cfg` holds, with its shape, by Hugging Face name.
pub fn expected_tensors(cfg: &DecoderConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |m: &str, o: i64, n: i64, bias: bool| {
            out.push((format!("{p}.{m}.weight"), vec![o, n]));
            if bias {
                out.push((format!("{p}.{m}.bias"), vec![o]));
            }
        };
        lin("self_attn.q_proj", q, h, cfg.qkv_bias);
        lin("self_attn.k_proj", kv, h, cfg.qkv_bias);
        lin("self_attn.v_proj", kv, h, cfg.qkv_bias);
        lin("self_attn.o_proj", h, q, cfg.o_bias);
        lin("mlp.gate_proj", i, h, cfg.mlp_bias);
        lin("mlp.up_proj", i, h, cfg.mlp_bias);
        lin("mlp.down_proj", h, i, cfg.mlp_bias);
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// The linear module names of a model of `cfg` (`lm_head` unless tied).
pub(crate) fn linear_modules(cfg: &DecoderConfig) -> Vec<String> {
    let mut out: Vec<String> = (0..cfg.num_layers)
        .flat_map(|l| {
            LAYER_LINEARS
                .iter()
                .map(move |m| format!("model.layers.{l}.{m}"))
        })
        .collect();
    if !cfg.tie_word_embeddings {
        out.push("lm_head".to_string());
    }
    out
}

const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[derive(Debug)]
struct DecoderLayer {
    /// q, k, v, o, gate, up, down in [`LAYER_LINEARS`] order.
    linears: Vec<Linear>,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    sliding_window: Option<i64>,
}

/// A Llama-family decoder-only language model with Hugging Face parameter names.
#[derive(Debug)]
pub struct DecoderLm {
    cfg: DecoderConfig,
    hf_config: Value,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<Linear>,
    inv_freq: Tensor,
    device: Device,
    kind: Kind,
}

impl DecoderLm {
    /// Builds the model from a weight source; every dense parameter gets `requires_grad(true)`.
    pub(crate) fn build(
        cfg: DecoderConfig,
        hf_config: Value,
        src: &mut dyn WeightSource,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let embed = src.tensor("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let mut linears = Vec::with_capacity(LAYER_LINEARS.len());
            for m in LAYER_LINEARS {
                let bias = match m {
                    "self_attn.o_proj" => cfg.o_bias,
                    m if m.starts_with("self_attn") => cfg.qkv_bias,
                    _ => cfg.mlp_bias,
                };
                linears.push(src.linear(&format!("{p}.{m}"), bias)?);
            }
            layers.push(DecoderLayer {
                linears,
                input_layernorm: src.tensor(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: src
                    .tensor(&format!("{p}.post_attention_layernorm.weight"))?,
                sliding_window: cfg.sliding_windows.get(l).copied().flatten(),
            });
        }
        let norm = src.tensor("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.linear("lm_head", false)?)
        };
        let inv_freq = cfg.rope.inv_freq(device)?;
        let model = DecoderLm {
            cfg,
            hf_config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            device,
            kind,
        };
        for (_, p) in model.named_parameters() {
            let _ = p.set_requires_grad(true);
        }
        Ok(model)
    }

    /// The parsed configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn attention(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        ctx: &LayerCtx,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = match x.size().as_slice() {
            [b, t, _] => (*b, *t),
            s => {
                return Err(Error::invalid(format!(
                    "attention: hidden must be [batch, seq, hidden], got {s:?}"
                )));
            }
        };
        let hd = self.cfg.head_dim;
        let split = |y: Tensor, n: i64| -> Result<Tensor> {
            y.f_view([b, t, n, hd]).ctx("attention split heads")
        };
        let heads =
            |y: Tensor| -> Result<Tensor> { y.f_transpose(1, 2).ctx("attention transpose") };
        // [b, t, n, hd] -> rotated [b, n, t, hd]; fp32 on the CPU rotates in the projection's
        // own layout in one fused pass
        let rotated = |y: Tensor, n: i64| -> Result<Tensor> {
            let y = split(y, n)?;
            if crate::fused::applies(&y) && crate::fused::applies(&ctx.cos) {
                heads(crate::fused::rope(&y, &ctx.cos, &ctx.sin)?)
            } else {
                apply_rope(&heads(y)?, &ctx.cos, &ctx.sin)
            }
        };
        let q = rotated(l.linears[0].forward(x, train)?, self.cfg.num_heads)?;
        let k = rotated(l.linears[1].forward(x, train)?, self.cfg.num_kv_heads)?;
        let v = heads(split(
            l.linears[2].forward(x, train)?,
            self.cfg.num_kv_heads,
        )?)?;
        let mask = if l.sliding_window.is_some() {
            ctx.sliding_mask.as_ref()
        } else {
            ctx.mask.as_ref()
        };
        let dropout = if train {
            self.cfg.attention_dropout
        } else {
            0.0
        };
        let gqa = self.cfg.num_heads != self.cfg.num_kv_heads;
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            dropout,
            mask.is_none(),
            None,
            gqa,
        )
        .ctx("scaled_dot_product_attention")?;
        let y = y
            .f_transpose(1, 2)
            .ctx("attention merge heads")?
            .f_reshape([b, t, self.cfg.num_heads * hd])
            .ctx("attention merge heads")?;
        l.linears[3].forward(&y, train)
    }

    fn mlp(&self, l: &DecoderLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        let gate = l.linears[4].forward(x, train)?;
        let up = l.linears[5].forward(x, train)?;
        let act = if crate::fused::applies(&gate) && crate::fused::applies(&up) {
            crate::fused::swiglu(&gate, &up)?
        } else {
            gate.f_silu()
                .ctx("mlp silu")?
                .f_mul(&up)
                .ctx("mlp gate*up")?
        };
        l.linears[6].forward(&act, train)
    }

    /// The base model's tensors by Hugging Face name, as a dense checkpoint holds them:
    /// quantized weights dequantized to the model's kind, adapter parameters left out.
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.shallow_clone(),
        )];
        let lin = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| -> Result<()> {
            out.push((format!("{name}.weight"), l.dense_weight(self.kind)?));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
            Ok(())
        };
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin_mod) in LAYER_LINEARS.iter().zip(&l.linears) {
                lin(&mut out, format!("model.layers.{i}.{m}"), lin_mod)?;
            }
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.shallow_clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.shallow_clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            lin(&mut out, "lm_head".to_string(), h)?;
        }
        Ok(out)
    }
}

/// `[batch, 1, seq, seq]` boolean mask (true = may attend) from the forward input, or `None`
/// when plain causal attention is exact. `window` adds a sliding-window limit on index distance.
fn build_mask(
    input: &ForwardInput<'_>,
    b: i64,
    t: i64,
    device: Device,
    window: Option<i64>,
) -> Result<Option<Tensor>> {
    let idx = Tensor::f_arange(t, (Kind::Int64, device)).ctx("mask arange")?;
    let q = idx.f_view([t, 1]).ctx("mask q idx")?;
    let k = idx.f_view([1, t]).ctx("mask k idx")?;
    let causal = || -> Result<Tensor> {
        let mut m = k.f_le_tensor(&q).ctx("causal mask")?;
        if let Some(w) = window {
            let dist = q.f_sub(&k).ctx("sliding distance")?;
            m = m
                .f_logical_and(&dist.f_lt(w).ctx("sliding window")?)
                .ctx("sliding mask")?;
        }
        Ok(m)
    };
    let mask = match input.attention_mask {
        None => {
            if window.is_none() {
                return Ok(None);
            }
            causal()?.f_view([1, 1, t, t]).ctx("mask view")?
        }
        Some(m) if m.dim() == 2 => {
            if m.size() != [b, t] {
                return Err(Error::invalid(format!(
                    "attention_mask must be [batch, seq] = [{b}, {t}], got {:?}",
                    m.size()
                )));
            }
            let keep = m.f_ne(0).ctx("attention_mask to bool")?;
            let all = keep
                .f_all()
                .ctx("attention_mask all")?
                .f_int64_value(&[])
                .ctx("attention_mask all")?;
            if all == 1 && window.is_none() {
                return Ok(None);
            }
            let keys = keep.f_view([b, 1, 1, t]).ctx("padding mask view")?;
            causal()?
                .f_view([1, 1, t, t])
                .ctx("mask view")?
                .f_logical_and(&keys)
                .ctx("padding mask")?
        }
        Some(m) if m.dim() == 4 => {
            if m.size() != [b, 1, t, t] {
                return Err(Error::invalid(format!(
                    "a 4-D attention_mask must be [batch, 1, seq, seq] = [{b}, 1, {t}, {t}], got {:?}",
                    m.size()
                )));
            }
            if m.is_floating_point() {
                return Err(Error::invalid(
                    "a 4-D attention_mask must be boolean (true = may attend), not an additive float mask",
                ));
            }
            let keep = m
                .f_ne(0)
                .ctx("attention_mask to bool")?
                .f_to_device(device)
                .ctx("mask to device")?;
            match window {
                None => keep,
                Some(_) => keep
                    .f_logical_and(&causal()?.f_view([1, 1, t, t]).ctx("mask view")?)
                    .ctx("sliding mask")?,
            }
        }
        Some(m) => {
            return Err(Error::invalid(format!(
                "attention_mask must be 2-D [batch, seq] or 4-D [batch, 1, seq, seq], got {:?}",
                m.size()
            )));
        }
    };
    // Every query may attend to itself: rows that are all padding would otherwise give NaN
    // that spreads through the value products. Real tokens always attend to themselves already.
    let eye = Tensor::f_eye(t, (Kind::Bool, device))
        .ctx("mask eye")?
        .f_view([1, 1, t, t])
        .ctx("mask eye")?;
    Ok(Some(mask.f_logical_or(&eye).ctx("mask diagonal")?))
}

impl CausalLm for DecoderLm {
    fn architecture(&self) -> &str {
        &self.cfg.architecture
    }
    fn hf_config(&self) -> &Value {
        &self.hf_config
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }
    fn device(&self) -> Device {
        self.device
    }
    fn kind(&self) -> Kind {
        self.kind
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Tensor::f_embedding(&self.embed, input_ids, -1, false, false).ctx("embed_tokens")
    }

    fn prepare(&self, input: &ForwardInput<'_>) -> Result<LayerCtx> {
        let (b, t) = match input.input_ids.size().as_slice() {
            [b, t] => (*b, *t),
            s => {
                return Err(Error::invalid(format!(
                    "input_ids must be [batch, seq], got {s:?}"
                )));
            }
        };
        let position_ids = match (input.position_ids, input.attention_mask) {
            (Some(p), _) => {
                if p.size() != [b, t] && p.size() != [1, t] {
                    return Err(Error::invalid(format!(
                        "position_ids must be [batch, seq] = [{b}, {t}], got {:?}",
                        p.size()
                    )));
                }
                p.f_to_device(self.device).ctx("position_ids to device")?
            }
            (None, Some(m)) if m.dim() == 2 => m
                .f_to_kind(Kind::Int64)
                .ctx("attention_mask to int")?
                .f_cumsum(-1, Kind::Int64)
                .ctx("position_ids cumsum")?
                .f_sub_scalar(1)
                .ctx("position_ids")?
                .f_clamp_min(0)
                .ctx("position_ids clamp")?
                .f_to_device(self.device)
                .ctx("position_ids to device")?,
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "a 4-D attention_mask needs explicit position_ids (each packed sequence restarts at 0)",
                ));
            }
            (None, None) => Tensor::f_arange(t, (Kind::Int64, self.device))
                .ctx("position_ids arange")?
                .f_view([1, t])
                .ctx("position_ids view")?,
        };
        let (cos, sin) = rope_tables(&self.inv_freq, &position_ids, self.kind)?;
        let mask = build_mask(input, b, t, self.device, None)?;
        let window = self.layers.iter().find_map(|l| l.sliding_window);
        let sliding_mask = match window {
            Some(w) => build_mask(input, b, t, self.device, Some(w))?,
            None => None,
        };
        if self
            .layers
            .iter()
            .any(|l| l.sliding_window.is_some_and(|x| Some(x) != window))
        {
            return Err(Error::invalid(
                "layers with different sliding windows are not supported",
            ));
        }
        Ok(LayerCtx {
            cos,
            sin,
            mask,
            sliding_mask,
        })
    }

    fn layer(&self, i: usize, hidden: &Tensor, ctx: &LayerCtx, train: bool) -> Result<Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "layer {i} out of range (the model has {})",
                self.layers.len()
            ))
        })?;
        let eps = self.cfg.rms_norm_eps;
        let a = self.attention(l, &rms_norm(hidden, &l.input_layernorm, eps)?, ctx, train)?;
        let h = hidden.f_add(&a).ctx("attention residual")?;
        let m = self.mlp(l, &rms_norm(&h, &l.post_attention_layernorm, eps)?, train)?;
        h.f_add(&m).ctx("mlp residual")
    }

    fn head_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps)
    }

    fn head_weight(&self) -> Option<Tensor> {
        match &self.lm_head {
            None => Some(self.embed.shallow_clone()),
            Some(Linear {
                weight: LinearWeight::Dense(w),
                bias: None,
                adapter: None,
                ..
            }) => Some(w.shallow_clone()),
            Some(_) => None,
        }
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.head_norm(hidden)?;
        match &self.lm_head {
            Some(head) => head.forward(&h, false),
            None => h.f_linear::<&Tensor>(&self.embed, None).ctx("tied lm_head"),
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.shallow_clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in LAYER_LINEARS.iter().zip(&l.linears) {
                for (n, t) in lin.named_parameters() {
                    out.push((format!("model.layers.{i}.{m}.{n}"), t));
                }
            }
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.shallow_clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.shallow_clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            for (n, t) in h.named_parameters() {
                out.push((format!("lm_head.{n}"), t));
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (m, lin) in LAYER_LINEARS.iter().zip(l.linears.iter_mut()) {
                out.push((format!("model.layers.{i}.{m}"), lin));
            }
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in LAYER_LINEARS.iter().zip(l.linears.iter()) {
                out.push((format!("model.layers.{i}.{m}"), lin));
            }
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    fn lm_head_param(&self) -> &str {
        if self.lm_head.is_some() {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        }
    }

    fn embed_param(&self) -> &str {
        "model.embed_tokens.weight"
    }

    fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        DecoderLm::checkpoint_tensors(self)
    }
}
