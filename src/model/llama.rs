//! The Llama decoder (`LlamaForCausalLM`, SmolLM, Llama 3): grouped-query attention with RoPE,
//! RMSNorm, SwiGLU MLP, optional tied embeddings. Every other supported family reuses it with
//! its own configuration rules ([`super::mistral`], [`super::qwen2`], [`super::qwen3`],
//! [`super::gemma`], [`super::phi3`], [`super::smollm3`]); the [`DecoderConfig`] switches say
//! what differs (q/k norms, Gemma's norms, GeGLU and soft-capping, Phi-3's fused projections and
//! partial rotary, layers without RoPE, per-layer RoPE bases).
//!
//! Numerics follow transformers 5.23 `models/llama/modeling_llama.py` and the families' own
//! modeling files; attention runs through libtorch's `scaled_dot_product_attention`, or, with
//! Gemma 2's score soft-capping, through the eager product transformers uses.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::config::{Activation, DecoderConfig, LayerRope, base_config};
use super::kv_cache::{KvCache, LayerKv};
use super::{CausalLm, ForwardInput, LayerCtx};
use crate::error::{Error, Result, TchResultExt};
use crate::nn::{
    Linear, LinearWeight, apply_rope, rms_norm, rms_norm_plus_one, rope_tables_scaled,
};

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
    let h = cfg.hidden_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for (m, o, n, bias) in layer_linear_shapes(cfg) {
            out.push((format!("{p}.{m}.weight"), vec![o, n]));
            if bias {
                out.push((format!("{p}.{m}.bias"), vec![o]));
            }
        }
        for (n, size) in layer_norm_shapes(cfg) {
            out.push((format!("{p}.{n}.weight"), vec![size]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// The linear module names of a model of `cfg` (`lm_head` unless tied).
pub(crate) fn linear_modules(cfg: &DecoderConfig) -> Vec<String> {
    let names = layer_linears(cfg);
    let mut out: Vec<String> = (0..cfg.num_layers)
        .flat_map(|l| names.iter().map(move |m| format!("model.layers.{l}.{m}")))
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

/// Phi-3's projections: queries, keys and values in one product, gate and up in another.
const FUSED_LINEARS: [&str; 4] = [
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
];

/// The linear modules of one layer, relative to it, in the order [`DecoderLayer::linears`]
/// holds them.
pub(crate) fn layer_linears(cfg: &DecoderConfig) -> &'static [&'static str] {
    if cfg.fused_projections {
        &FUSED_LINEARS
    } else {
        &LAYER_LINEARS
    }
}

/// `(module, out, in, bias)` of each linear of one layer.
fn layer_linear_shapes(cfg: &DecoderConfig) -> Vec<(&'static str, i64, i64, bool)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    layer_linears(cfg)
        .iter()
        .map(|&m| {
            let (o, n) = match m {
                "self_attn.q_proj" => (q, h),
                "self_attn.k_proj" | "self_attn.v_proj" => (kv, h),
                "self_attn.qkv_proj" => (q + 2 * kv, h),
                "self_attn.o_proj" => (h, q),
                "mlp.gate_proj" | "mlp.up_proj" => (i, h),
                "mlp.gate_up_proj" => (2 * i, h),
                _ => (h, i), // down_proj
            };
            (m, o, n, linear_bias(cfg, m))
        })
        .collect()
}

fn linear_bias(cfg: &DecoderConfig, m: &str) -> bool {
    match m {
        "self_attn.o_proj" => cfg.o_bias,
        m if m.starts_with("self_attn") => cfg.qkv_bias,
        _ => cfg.mlp_bias,
    }
}

/// `(name, size)` of each norm weight of one layer, relative to it.
fn layer_norm_shapes(cfg: &DecoderConfig) -> Vec<(&'static str, i64)> {
    let h = cfg.hidden_size;
    let mut out = vec![("input_layernorm", h), ("post_attention_layernorm", h)];
    if cfg.sandwich_norms {
        out.push(("pre_feedforward_layernorm", h));
        out.push(("post_feedforward_layernorm", h));
    }
    if cfg.qk_norm {
        out.push(("self_attn.q_norm", cfg.head_dim));
        out.push(("self_attn.k_norm", cfg.head_dim));
    }
    out
}

#[derive(Debug)]
struct DecoderLayer {
    /// q, k, v, o, gate, up, down in [`LAYER_LINEARS`] order, or qkv, o, gate_up, down in
    /// [`FUSED_LINEARS`] order.
    linears: Vec<Linear>,
    /// The norm weights in [`layer_norm_shapes`] order: input, post-attention, then
    /// pre/post-feedforward (Gemma), then q/k norms.
    norms: Vec<Tensor>,
    sliding_window: Option<i64>,
    rope: LayerRope,
}

/// What a layer's norms are at their positions in [`DecoderLayer::norms`].
#[derive(Debug)]
struct NormIndex {
    pre_ff: Option<usize>,
    post_ff: Option<usize>,
    q: Option<usize>,
    k: Option<usize>,
}

impl NormIndex {
    fn of(cfg: &DecoderConfig) -> Self {
        let mut next = 2;
        let mut take = |on: bool| {
            on.then(|| {
                next += 1;
                next - 1
            })
        };
        let pre_ff = take(cfg.sandwich_norms);
        let post_ff = take(cfg.sandwich_norms);
        let q = take(cfg.qk_norm);
        let k = take(cfg.qk_norm);
        NormIndex {
            pre_ff,
            post_ff,
            q,
            k,
        }
    }
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
    /// The global RoPE's inverse frequencies and cos/sin scaling as built (length-dependent
    /// types recompute them per batch).
    inv_freq: (Tensor, f64),
    /// Gemma 3's sliding-layer RoPE.
    inv_freq_local: Option<(Tensor, f64)>,
    norm_index: NormIndex,
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
            let mut linears = Vec::new();
            for &m in layer_linears(&cfg) {
                linears.push(src.linear(&format!("{p}.{m}"), linear_bias(&cfg, m))?);
            }
            let mut norms = Vec::new();
            for (n, _) in layer_norm_shapes(&cfg) {
                norms.push(src.tensor(&format!("{p}.{n}.weight"))?);
            }
            layers.push(DecoderLayer {
                linears,
                norms,
                sliding_window: cfg.sliding_windows.get(l).copied().flatten(),
                rope: cfg.layer_rope.get(l).copied().unwrap_or(LayerRope::Global),
            });
        }
        let norm = src.tensor("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.linear("lm_head", false)?)
        };
        let on_device = |(t, a): (Tensor, f64)| -> Result<(Tensor, f64)> {
            Ok((t.f_to_device(device).ctx("rope inv_freq to device")?, a))
        };
        let inv_freq = on_device(cfg.rope.inv_freq_at(None)?)?;
        let inv_freq_local = match &cfg.rope_local {
            Some(r) => Some(on_device(r.inv_freq_at(None)?)?),
            None => None,
        };
        let norm_index = NormIndex::of(&cfg);
        let model = DecoderLm {
            cfg,
            hf_config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
            norm_index,
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

    /// The family's RMSNorm (Gemma scales by `1 + w`).
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.cfg.norm_plus_one {
            rms_norm_plus_one(x, w, self.cfg.rms_norm_eps)
        } else {
            rms_norm(x, w, self.cfg.rms_norm_eps)
        }
    }

    fn attention(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        ctx: &LayerCtx,
        train: bool,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, t) = match x.size().as_slice() {
            [b, t, _] => (*b, *t),
            s => {
                return Err(Error::Shape {
                    op: "attention".into(),
                    msg: format!("hidden must be [batch, seq, hidden], got {s:?}"),
                });
            }
        };
        let hd = self.cfg.head_dim;
        let (nq, nkv) = (self.cfg.num_heads, self.cfg.num_kv_heads);
        let split = |y: Tensor, n: i64| -> Result<Tensor> {
            y.f_view([b, t, n, hd]).ctx("attention split heads")
        };
        let heads =
            |y: Tensor| -> Result<Tensor> { y.f_transpose(1, 2).ctx("attention transpose") };
        let tables = match l.rope {
            LayerRope::Global => Some((&ctx.cos, &ctx.sin)),
            LayerRope::Local => match &ctx.local {
                Some((c, s)) => Some((c, s)),
                None => {
                    return Err(Error::Internal(
                        "a layer with the local RoPE, but no local tables were prepared".into(),
                    ));
                }
            },
            LayerRope::None => None,
        };
        // [b, t, n, hd] -> (normed, rotated) [b, n, t, hd]; fp32 on the CPU rotates in the
        // projection's own layout in one fused pass
        let rotated = |y: Tensor, n: i64, norm: Option<usize>| -> Result<Tensor> {
            let mut y = split(y, n)?;
            if let Some(i) = norm {
                y = self.norm(&y, &l.norms[i])?;
            }
            let Some((cos, sin)) = tables else {
                return heads(y);
            };
            let full = cos.size().last() == Some(&hd);
            if full && crate::fused::applies(&y) && crate::fused::applies(cos) {
                heads(crate::fused::rope(&y, cos, sin)?)
            } else {
                apply_rope(&heads(y)?, cos, sin)
            }
        };
        let (q, k, v) = if self.cfg.fused_projections {
            let qkv = l.linears[0].forward(x, train)?;
            let q = qkv.f_narrow(-1, 0, nq * hd).ctx("qkv split")?;
            let k = qkv.f_narrow(-1, nq * hd, nkv * hd).ctx("qkv split")?;
            let v = qkv
                .f_narrow(-1, (nq + nkv) * hd, nkv * hd)
                .ctx("qkv split")?;
            // views of the fused output are not contiguous: make them so for the head view
            let c = |y: Tensor| y.f_contiguous().ctx("qkv contiguous");
            (c(q)?, c(k)?, c(v)?)
        } else {
            (
                l.linears[0].forward(x, train)?,
                l.linears[1].forward(x, train)?,
                l.linears[2].forward(x, train)?,
            )
        };
        let q = rotated(q, nq, self.norm_index.q)?;
        let k = rotated(k, nkv, self.norm_index.k)?;
        let v = heads(split(v, nkv)?)?;
        // incremental decoding: attend over the cached positions and the new ones
        let (k, v, past) = match kv {
            Some(c) => {
                let past = c.len();
                let (k, v) = c.append(&k, &v)?;
                (k, v, past)
            }
            None => (k, v, 0),
        };
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
        let y = match self.cfg.attn_softcap {
            Some(cap) => self.eager_softcapped(&q, &k, &v, mask, cap, dropout, train)?,
            None => {
                let default_scale = (hd as f64).powf(-0.5);
                let scale = (self.cfg.attn_scale != default_scale).then_some(self.cfg.attn_scale);
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    mask,
                    dropout,
                    // libtorch's causal flag aligns to the top left: only exact without a cache
                    mask.is_none() && past == 0,
                    scale,
                    nq != nkv,
                )
                .ctx("scaled_dot_product_attention")?
            }
        };
        let y = y
            .f_transpose(1, 2)
            .ctx("attention merge heads")?
            .f_reshape([b, t, nq * hd])
            .ctx("attention merge heads")?;
        l.linears[if self.cfg.fused_projections { 1 } else { 3 }].forward(&y, train)
    }

    /// Gemma 2's eager attention: `softmax(tanh(q k^T * scale / cap) * cap + mask) v`, the
    /// softmax in fp32 (transformers' `eager_attention_forward` with `softcap`).
    #[allow(clippy::too_many_arguments)]
    fn eager_softcapped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        cap: f64,
        dropout: f64,
        train: bool,
    ) -> Result<Tensor> {
        let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            if rep == 1 {
                Ok(x.shallow_clone())
            } else {
                x.f_repeat_interleave_self_int(rep, Some(1), None)
                    .ctx("repeat_kv")
            }
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = q
            .f_matmul(&k.f_transpose(2, 3).ctx("k^T")?)
            .ctx("q k^T")?
            .f_mul_scalar(self.cfg.attn_scale)
            .ctx("attention scale")?
            .f_div_scalar(cap)
            .ctx("softcap")?
            .f_tanh()
            .ctx("softcap tanh")?
            .f_mul_scalar(cap)
            .ctx("softcap")?;
        let t = q.size()[2];
        let keep = match mask {
            Some(m) => m.shallow_clone(),
            None => Tensor::f_ones([t, t], (Kind::Bool, q.device()))
                .ctx("causal mask")?
                .f_tril(0)
                .ctx("causal mask")?,
        };
        let scores = scores
            .f_masked_fill(&keep.f_logical_not().ctx("mask not")?, f64::NEG_INFINITY)
            .ctx("attention mask")?;
        let mut probs = scores
            .f_softmax(-1, Kind::Float)
            .ctx("attention softmax")?
            .f_to_kind(q.kind())
            .ctx("attention softmax kind")?;
        if train && dropout > 0.0 {
            probs = probs.f_dropout(dropout, true).ctx("attention dropout")?;
        }
        probs.f_matmul(&v).ctx("attention values")
    }

    fn mlp(&self, l: &DecoderLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        let (gate, up, down) = if self.cfg.fused_projections {
            let gu = l.linears[2].forward(x, train)?;
            let i = self.cfg.intermediate_size;
            let c = |y: Tensor| y.f_contiguous().ctx("gate_up contiguous");
            (
                c(gu.f_narrow(-1, 0, i).ctx("gate_up split")?)?,
                c(gu.f_narrow(-1, i, i).ctx("gate_up split")?)?,
                &l.linears[3],
            )
        } else {
            (
                l.linears[4].forward(x, train)?,
                l.linears[5].forward(x, train)?,
                &l.linears[6],
            )
        };
        let act = match self.cfg.hidden_act {
            Activation::Silu if crate::fused::applies(&gate) && crate::fused::applies(&up) => {
                crate::fused::swiglu(&gate, &up)?
            }
            Activation::Silu => gate
                .f_silu()
                .ctx("mlp silu")?
                .f_mul(&up)
                .ctx("mlp gate*up")?,
            Activation::GeluTanh | Activation::Gelu => {
                let approx = if self.cfg.hidden_act == Activation::GeluTanh {
                    "tanh"
                } else {
                    "none"
                };
                gate.f_gelu(approx)
                    .ctx("mlp gelu")?
                    .f_mul(&up)
                    .ctx("mlp gate*up")?
            }
        };
        down.forward(&act, train)
    }

    /// Logits `[batch, vocab]` of the last of `input_ids` (`[batch, new]`, no padding), which
    /// continue the positions already in `cache`; their keys and values are appended to it.
    /// Prefill with the whole prompt on an empty cache, then one token at a time.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = match input_ids.size().as_slice() {
            [b, t] if *t > 0 => (*b, *t),
            s => {
                return Err(Error::Shape {
                    op: "forward_cached".into(),
                    msg: format!("input_ids must be [batch, new] with new > 0, got {s:?}"),
                });
            }
        };
        if cache.num_layers() != self.layers.len() {
            return Err(Error::Shape {
                op: "forward_cached".into(),
                msg: format!(
                    "the cache has {} layers, the model {}",
                    cache.num_layers(),
                    self.layers.len()
                ),
            });
        }
        let past = cache.len();
        let pos = Tensor::f_arange_start(past, past + t, (Kind::Int64, self.device))
            .ctx("cached positions")?
            .f_view([1, t])
            .ctx("cached positions")?;
        let ids = input_ids
            .f_to_device(self.device)
            .ctx("input_ids to device")?;
        let mut ctx = self.prepare(&ForwardInput {
            input_ids: &ids,
            attention_mask: None,
            position_ids: Some(&pos),
        })?;
        ctx.mask = cached_mask(past, t, self.device, None)?;
        let window = self.layers.iter().find_map(|l| l.sliding_window);
        ctx.sliding_mask = match window {
            Some(w) => cached_mask(past, t, self.device, Some(w))?,
            None => None,
        };
        let mut h = self.embed(&ids)?;
        for i in 0..self.layers.len() {
            h = self.layer_cached(i, &h, &ctx, false, Some(cache.layer_mut(i)?))?;
        }
        let last = h.f_narrow(1, t - 1, 1).ctx("last position")?;
        self.head(&last)?.f_view([b, -1]).ctx("last logits")
    }

    /// Decoder layer `i`, appending its keys and values to `kv` and attending over every
    /// cached position when given.
    fn layer_cached(
        &self,
        i: usize,
        hidden: &Tensor,
        ctx: &LayerCtx,
        train: bool,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "layer {i} out of range (the model has {})",
                self.layers.len()
            ))
        })?;
        let resid_drop = |y: Tensor| -> Result<Tensor> {
            if train && self.cfg.resid_dropout > 0.0 {
                y.f_dropout(self.cfg.resid_dropout, true)
                    .ctx("residual dropout")
            } else {
                Ok(y)
            }
        };
        let ni = &self.norm_index;
        let mut a = self.attention(l, &self.norm(hidden, &l.norms[0])?, ctx, train, kv)?;
        if self.cfg.sandwich_norms {
            a = self.norm(&a, &l.norms[1])?;
        }
        let h = hidden.f_add(&resid_drop(a)?).ctx("attention residual")?;
        let m = match (ni.pre_ff, ni.post_ff) {
            (Some(pre), Some(post)) => {
                let m = self.mlp(l, &self.norm(&h, &l.norms[pre])?, train)?;
                self.norm(&m, &l.norms[post])?
            }
            _ => self.mlp(l, &self.norm(&h, &l.norms[1])?, train)?,
        };
        h.f_add(&resid_drop(m)?).ctx("mlp residual")
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
        let norm_names = layer_norm_shapes(&self.cfg);
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin_mod) in layer_linears(&self.cfg).iter().zip(&l.linears) {
                lin(&mut out, format!("model.layers.{i}.{m}"), lin_mod)?;
            }
            for ((n, _), w) in norm_names.iter().zip(&l.norms) {
                out.push((format!("model.layers.{i}.{n}.weight"), w.shallow_clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            lin(&mut out, "lm_head".to_string(), h)?;
        }
        Ok(out)
    }
}

/// The `[1, 1, new, past + new]` boolean mask (true = may attend) of `new` queries that follow
/// `past` cached positions: causal, and within `window` positions when given. `None` when the
/// plain attention is exact (no window and either no past or a single query).
fn cached_mask(past: i64, t: i64, device: Device, window: Option<i64>) -> Result<Option<Tensor>> {
    let total = past + t;
    if window.is_none_or(|w| total <= w) && (past == 0 || t == 1) {
        return Ok(None);
    }
    let q = Tensor::f_arange_start(past, total, (Kind::Int64, device))
        .ctx("mask arange")?
        .f_view([t, 1])
        .ctx("mask q idx")?;
    let k = Tensor::f_arange(total, (Kind::Int64, device))
        .ctx("mask arange")?
        .f_view([1, total])
        .ctx("mask k idx")?;
    let mut m = k.f_le_tensor(&q).ctx("causal mask")?;
    if let Some(w) = window {
        let near = q
            .f_sub(&k)
            .ctx("sliding distance")?
            .f_lt(w)
            .ctx("sliding window")?;
        m = m.f_logical_and(&near).ctx("sliding mask")?;
    }
    Ok(Some(m.f_view([1, 1, t, total]).ctx("mask view")?))
}

/// `[batch, 1, seq, seq]` boolean mask (true = may attend) from the forward input, or `None`
/// when plain causal attention is exact. `window` adds a sliding-window limit on index distance.
pub(crate) fn build_mask(
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
                return Err(Error::Shape {
                    op: "forward".into(),
                    msg: format!(
                        "attention_mask must be [batch, seq] = [{b}, {t}], got {:?}",
                        m.size()
                    ),
                });
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
                return Err(Error::Shape {
                    op: "forward".into(),
                    msg: format!(
                        "a 4-D attention_mask must be [batch, 1, seq, seq] = [{b}, 1, {t}, {t}], got {:?}",
                        m.size()
                    ),
                });
            }
            if m.is_floating_point() {
                return Err(Error::Shape { op: "forward".into(), msg: "a 4-D attention_mask must be boolean (true = may attend), not an additive float mask".into() });
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
            return Err(Error::Shape {
                op: "forward".into(),
                msg: format!(
                    "attention_mask must be 2-D [batch, seq] or 4-D [batch, 1, seq, seq], got {:?}",
                    m.size()
                ),
            });
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
        // `nn.Embedding(padding_idx=pad_token_id)`: the pad row gets no gradient
        let pad = self.cfg.pad_token_id.unwrap_or(-1);
        let e =
            Tensor::f_embedding(&self.embed, input_ids, pad, false, false).ctx("embed_tokens")?;
        match self.cfg.embed_scale {
            // Gemma: `embed * tensor(sqrt(hidden)).to(dtype)`
            Some(s) => e
                .f_mul(
                    &Tensor::from(s as f32)
                        .f_to_kind(self.kind)
                        .ctx("embed scale")?
                        .f_to_device(self.device)
                        .ctx("embed scale")?,
                )
                .ctx("embed scale"),
            None => Ok(e),
        }
    }

    fn prepare(&self, input: &ForwardInput<'_>) -> Result<LayerCtx> {
        let (b, t) = match input.input_ids.size().as_slice() {
            [b, t] => (*b, *t),
            s => {
                return Err(Error::Shape {
                    op: "forward".into(),
                    msg: format!("input_ids must be [batch, seq], got {s:?}"),
                });
            }
        };
        let position_ids = match (input.position_ids, input.attention_mask) {
            (Some(p), _) => {
                if p.size() != [b, t] && p.size() != [1, t] {
                    return Err(Error::Shape {
                        op: "forward".into(),
                        msg: format!(
                            "position_ids must be [batch, seq] = [{b}, {t}], got {:?}",
                            p.size()
                        ),
                    });
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
        // length-dependent RoPE types (dynamic, longrope) look at `max(position_ids) + 1`
        let seq_len = || -> Result<i64> {
            Ok(position_ids
                .f_max()
                .ctx("position_ids max")?
                .f_int64_value(&[])
                .ctx("position_ids max")?
                + 1)
        };
        let tables =
            |rope: &crate::nn::RopeConfig, built: &(Tensor, f64)| -> Result<(Tensor, Tensor)> {
                if rope.depends_on_length() {
                    let (inv, a) = rope.inv_freq_at(Some(seq_len()?))?;
                    let inv = inv
                        .f_to_device(self.device)
                        .ctx("rope inv_freq to device")?;
                    rope_tables_scaled(&inv, &position_ids, self.kind, a)
                } else {
                    rope_tables_scaled(&built.0, &position_ids, self.kind, built.1)
                }
            };
        let (cos, sin) = tables(&self.cfg.rope, &self.inv_freq)?;
        let local = match (&self.cfg.rope_local, &self.inv_freq_local) {
            (Some(r), Some(built)) => Some(tables(r, built)?),
            _ => None,
        };
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
            return Err(Error::Unsupported {
                what: "sliding windows".into(),
                msg: "layers with different sliding windows".into(),
            });
        }
        Ok(LayerCtx {
            cos,
            sin,
            mask,
            sliding_mask,
            local,
            padding: None,
        })
    }

    fn layer(&self, i: usize, hidden: &Tensor, ctx: &LayerCtx, train: bool) -> Result<Tensor> {
        self.layer_cached(i, hidden, ctx, train, None)
    }

    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        DecoderLm::forward_cached(self, input_ids, cache)
    }

    fn head_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm(hidden, &self.norm)
    }

    fn head_softcap(&self) -> Option<f64> {
        self.cfg.final_softcap
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
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h, false)?,
            None => h
                .f_linear::<&Tensor>(&self.embed, None)
                .ctx("tied lm_head")?,
        };
        match self.cfg.final_softcap {
            Some(cap) => logits
                .f_div_scalar(cap)
                .ctx("final softcap")?
                .f_tanh()
                .ctx("final softcap")?
                .f_mul_scalar(cap)
                .ctx("final softcap"),
            None => Ok(logits),
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.shallow_clone(),
        )];
        let norm_names = layer_norm_shapes(&self.cfg);
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in layer_linears(&self.cfg).iter().zip(&l.linears) {
                for (n, t) in lin.named_parameters() {
                    out.push((format!("model.layers.{i}.{m}.{n}"), t));
                }
            }
            for ((n, _), w) in norm_names.iter().zip(&l.norms) {
                out.push((format!("model.layers.{i}.{n}.weight"), w.shallow_clone()));
            }
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
        let names = layer_linears(&self.cfg);
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (m, lin) in names.iter().zip(l.linears.iter_mut()) {
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
        let names = layer_linears(&self.cfg);
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in names.iter().zip(l.linears.iter()) {
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
