//! State-space models: `MambaForCausalLM`, `FalconMambaForCausalLM` and `JambaForCausalLM`
//! (attention + Mamba hybrid, dense MLP layers only), with Hugging Face tensor names.
//!
//! Numerics follow transformers 5.23's PyTorch paths (`models/mamba/modeling_mamba.py`,
//! `models/falcon_mamba/modeling_falcon_mamba.py`, `models/jamba/modeling_jamba.py`): the mixer
//! zeroes padding positions of its input and of the convolution's output (the 2-D attention
//! mask, left or right padding), runs the causal depthwise convolution with silu, projects to
//! `dt`, `B`, `C` (Falcon-Mamba normalizes the three without weights, Jamba with weights), and
//! runs the selective scan of [`super::ssm`] (the fused CPU kernel or the chunked libtorch
//! path).
//!
//! Packing: a packed row's sequences would share the scan's state, so a 4-D (packed) attention
//! mask is refused with an error for every model with Mamba layers.
//!
//! The LoRA targets of `dt_proj` apply (`dt = dt_proj(x)`, adapter included). transformers'
//! PyTorch path reads `dt_proj.weight` directly, so an unmerged PEFT adapter on `dt_proj` has no
//! effect there; PEFT's merged model (`merge_and_unload`) computes what VoltTrain computes.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::config::Json;
use super::ssm::{ScanInput, causal_conv1d_silu, selective_scan};
use super::{CausalLm, ForwardInput, LayerCtx};
use crate::error::{Error, Result, TchResultExt};
use crate::nn::{Linear, LinearWeight, rms_norm};

/// The state-space architectures.
pub const SSM_ARCHITECTURES: [&str; 3] = [
    "MambaForCausalLM",
    "FalconMambaForCausalLM",
    "JambaForCausalLM",
];

/// Which family a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SsmFamily {
    /// Mamba: a state-space mixer in every layer, no separate MLP.
    Mamba,
    /// Mamba with weightless RMS norms on `dt`, `B` and `C` (`mixer_rms_eps`).
    FalconMamba,
    /// Attention and Mamba layers, each followed by an MLP; weighted norms on `dt`, `B`, `C`.
    Jamba,
}

/// What mixes tokens in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// A selective state-space (Mamba) mixer.
    Mamba,
    /// Self-attention (Jamba's attention layers).
    Attention,
}

/// The shape of a state-space model, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SsmConfig {
    /// `MambaForCausalLM`, `FalconMambaForCausalLM` or `JambaForCausalLM`.
    pub architecture: String,
    /// The family, from the architecture.
    pub family: SsmFamily,
    /// Tokens in the vocabulary.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Layers (Mamba and attention together).
    pub num_layers: usize,
    /// The mixer's inner width (`expand * hidden_size`).
    pub d_inner: i64,
    /// Size `N` of the state per channel (`state_size`, Jamba's `mamba_d_state`).
    pub state_size: i64,
    /// Width of the causal depthwise convolution (`conv_kernel`, Jamba's `mamba_d_conv`).
    pub conv_kernel: i64,
    /// Rank of the `dt` projection (`time_step_rank`, Jamba's `mamba_dt_rank`).
    pub dt_rank: i64,
    /// Biases on `in_proj` / `out_proj`.
    pub proj_bias: bool,
    /// Bias on the causal convolution.
    pub conv_bias: bool,
    /// Epsilon of the layer norms (`layer_norm_epsilon`, Jamba's `rms_norm_eps`).
    pub norm_eps: f64,
    /// Epsilon of the `dt`/`B`/`C` norms (Falcon-Mamba's `mixer_rms_eps`, Jamba's `rms_norm_eps`).
    pub mixer_eps: f64,
    /// The LM head shares the embedding's weight.
    pub tie_word_embeddings: bool,
    /// Jamba's embedding `padding_idx` (Mamba's embedding has none).
    pub pad_token_id: Option<i64>,
    /// Mamba: the residual stream in fp32 (`residual_in_fp32`).
    pub residual_in_fp32: bool,
    /// Per layer (Jamba: `attn_layer_period` / `attn_layer_offset`; Mamba: all Mamba).
    pub blocks: Vec<BlockKind>,
    /// Jamba's attention and MLP.
    pub num_heads: i64,
    /// Jamba's key/value heads.
    pub num_kv_heads: i64,
    /// Width of one of Jamba's attention heads.
    pub head_dim: i64,
    /// Width of Jamba's MLP (`intermediate_size`).
    pub mlp_size: i64,
    /// Dropout on Jamba's attention probabilities while training.
    pub attention_dropout: f64,
}

impl SsmConfig {
    fn prefix(&self) -> &'static str {
        match self.family {
            SsmFamily::Jamba => "model",
            _ => "backbone",
        }
    }
    fn embed_name(&self) -> String {
        match self.family {
            SsmFamily::Jamba => "model.embed_tokens.weight".into(),
            _ => "backbone.embeddings.weight".into(),
        }
    }
    fn final_norm_name(&self) -> String {
        match self.family {
            SsmFamily::Jamba => "model.final_layernorm.weight".into(),
            _ => "backbone.norm_f.weight".into(),
        }
    }
    /// The mixer's module path inside a layer.
    fn mixer(&self) -> &'static str {
        match self.family {
            SsmFamily::Jamba => "mamba",
            _ => "mixer",
        }
    }
    fn jamba(&self) -> bool {
        self.family == SsmFamily::Jamba
    }
}

/// Whether `arch` is one of [`SSM_ARCHITECTURES`].
pub fn is_ssm_architecture(arch: &str) -> bool {
    SSM_ARCHITECTURES.contains(&arch)
}

fn silu_act(j: &Json<'_>, key: &str) -> Result<()> {
    match j.opt_str(key)?.unwrap_or("silu") {
        "silu" | "swish" => Ok(()),
        other => Err(j.err_key(
            key,
            format!("`{other}` is not supported for Mamba mixers (only silu)"),
        )),
    }
}

/// Parses a state-space model's `config.json` (transformers 5.23 field names and defaults).
pub fn ssm_config(path: &Path, v: &Value, architecture: &str) -> Result<SsmConfig> {
    let j = Json { path, v };
    let hidden_size = j.positive("hidden_size")?;
    let num_layers = j.positive("num_hidden_layers")? as usize;
    let vocab_size = j.positive("vocab_size")?;
    let rank = |key: &str| -> Result<i64> {
        match j.v.get(key) {
            None | Some(Value::Null) => Ok((hidden_size + 15) / 16),
            Some(Value::String(s)) if s == "auto" => Ok((hidden_size + 15) / 16),
            Some(_) => j.positive(key),
        }
    };
    silu_act(&j, "hidden_act")?;
    if architecture == "JambaForCausalLM" {
        let num_experts = j.opt_i64("num_experts")?.unwrap_or(16);
        let e_period = j.opt_i64("expert_layer_period")?.unwrap_or(2).max(1);
        let e_offset = j.opt_i64("expert_layer_offset")?.unwrap_or(1);
        if num_experts > 1 && (0..num_layers as i64).any(|i| i % e_period == e_offset) {
            return Err(j.err_key(
                "num_experts",
                format!(
                    "{num_experts} experts (mixture-of-experts layers) are not supported; only Jamba \
                     models with dense MLP layers (`num_experts: 1`) load"
                ),
            ));
        }
        let a_period = j.opt_i64("attn_layer_period")?.unwrap_or(8);
        let a_offset = j.opt_i64("attn_layer_offset")?.unwrap_or(4);
        if a_period == 0 || a_offset >= a_period {
            return Err(j.err_key(
                "attn_layer_offset",
                format!("must be smaller than attn_layer_period ({a_period})"),
            ));
        }
        let num_heads = j.positive("num_attention_heads")?;
        let num_kv_heads = j.opt_i64("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(j.err_key(
                "num_key_value_heads",
                format!("{num_kv_heads} must be > 0 and divide num_attention_heads ({num_heads})"),
            ));
        }
        if hidden_size % num_heads != 0 {
            return Err(j.err_key(
                "num_attention_heads",
                format!("must divide hidden_size ({hidden_size})"),
            ));
        }
        let eps = j.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        let blocks = (0..num_layers as i64)
            .map(|i| {
                if i % a_period == a_offset {
                    BlockKind::Attention
                } else {
                    BlockKind::Mamba
                }
            })
            .collect();
        return Ok(SsmConfig {
            architecture: architecture.into(),
            family: SsmFamily::Jamba,
            vocab_size,
            hidden_size,
            num_layers,
            d_inner: j.opt_i64("mamba_expand")?.unwrap_or(2) * hidden_size,
            state_size: j.opt_i64("mamba_d_state")?.unwrap_or(16),
            conv_kernel: j.opt_i64("mamba_d_conv")?.unwrap_or(4),
            dt_rank: rank("mamba_dt_rank")?,
            proj_bias: j.opt_bool("mamba_proj_bias")?.unwrap_or(false),
            conv_bias: j.opt_bool("mamba_conv_bias")?.unwrap_or(true),
            norm_eps: eps,
            mixer_eps: eps,
            tie_word_embeddings: j.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            pad_token_id: j.opt_i64("pad_token_id")?,
            residual_in_fp32: false,
            blocks,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            mlp_size: j.positive("intermediate_size")?,
            attention_dropout: j.opt_f64("attention_dropout")?.unwrap_or(0.0),
        });
    }
    let family = if architecture == "FalconMambaForCausalLM" {
        SsmFamily::FalconMamba
    } else {
        SsmFamily::Mamba
    };
    let expand = j.opt_i64("expand")?.unwrap_or(2);
    let d_inner = match j.opt_i64("intermediate_size")? {
        Some(i) if i != expand * hidden_size => {
            return Err(j.err_key(
                "intermediate_size",
                format!(
                    "{i} differs from expand * hidden_size = {}",
                    expand * hidden_size
                ),
            ));
        }
        _ => expand * hidden_size,
    };
    let eps = j.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5);
    Ok(SsmConfig {
        architecture: architecture.into(),
        family,
        vocab_size,
        hidden_size,
        num_layers,
        d_inner,
        state_size: j.opt_i64("state_size")?.unwrap_or(16),
        conv_kernel: j.opt_i64("conv_kernel")?.unwrap_or(4),
        dt_rank: rank("time_step_rank")?,
        proj_bias: j.opt_bool("use_bias")?.unwrap_or(false),
        conv_bias: j.opt_bool("use_conv_bias")?.unwrap_or(true),
        norm_eps: eps,
        mixer_eps: j.opt_f64("mixer_rms_eps")?.unwrap_or(1e-6),
        tie_word_embeddings: j.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        pad_token_id: None,
        residual_in_fp32: j.opt_bool("residual_in_fp32")?.unwrap_or(true),
        blocks: vec![BlockKind::Mamba; num_layers],
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        mlp_size: 0,
        attention_dropout: 0.0,
    })
}

/// `(module relative to the layer, out, in, bias)` of each linear of layer `l`.
fn layer_linears(cfg: &SsmConfig, l: usize) -> Vec<(String, i64, i64, bool)> {
    let (h, d) = (cfg.hidden_size, cfg.d_inner);
    let mut out = Vec::new();
    match cfg.blocks[l] {
        BlockKind::Mamba => {
            let m = cfg.mixer();
            let (r, n) = (cfg.dt_rank, cfg.state_size);
            out.push((format!("{m}.in_proj"), 2 * d, h, cfg.proj_bias));
            out.push((format!("{m}.x_proj"), r + 2 * n, d, false));
            out.push((format!("{m}.dt_proj"), d, r, true));
            out.push((format!("{m}.out_proj"), h, d, cfg.proj_bias));
        }
        BlockKind::Attention => {
            let (q, kv) = (
                cfg.num_heads * cfg.head_dim,
                cfg.num_kv_heads * cfg.head_dim,
            );
            for (name, o, i) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                out.push((format!("self_attn.{name}"), o, i, false));
            }
        }
    }
    if cfg.jamba() {
        let i = cfg.mlp_size;
        for (name, o, n) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            out.push((format!("feed_forward.{name}"), o, n, false));
        }
    }
    out
}

/// `(name relative to the layer, shape)` of the dense tensors of layer `l` other than linears.
fn layer_dense(cfg: &SsmConfig, l: usize) -> Vec<(String, Vec<i64>)> {
    let (h, d, n) = (cfg.hidden_size, cfg.d_inner, cfg.state_size);
    let mut out = Vec::new();
    if cfg.jamba() {
        out.push(("input_layernorm.weight".into(), vec![h]));
        out.push(("pre_ff_layernorm.weight".into(), vec![h]));
    } else {
        out.push(("norm.weight".into(), vec![h]));
    }
    if cfg.blocks[l] == BlockKind::Mamba {
        let m = cfg.mixer();
        out.push((format!("{m}.conv1d.weight"), vec![d, 1, cfg.conv_kernel]));
        if cfg.conv_bias {
            out.push((format!("{m}.conv1d.bias"), vec![d]));
        }
        out.push((format!("{m}.A_log"), vec![d, n]));
        out.push((format!("{m}.D"), vec![d]));
        if cfg.jamba() {
            out.push((format!("{m}.dt_layernorm.weight"), vec![cfg.dt_rank]));
            out.push((format!("{m}.b_layernorm.weight"), vec![n]));
            out.push((format!("{m}.c_layernorm.weight"), vec![n]));
        }
    }
    out
}

/// Every tensor a checkpoint of `cfg` holds, with its shape, by Hugging Face name.
pub fn expected_tensors(cfg: &SsmConfig) -> Vec<(String, Vec<i64>)> {
    let p = cfg.prefix();
    let mut out = vec![(cfg.embed_name(), vec![cfg.vocab_size, cfg.hidden_size])];
    for l in 0..cfg.num_layers {
        for (m, o, i, bias) in layer_linears(cfg, l) {
            out.push((format!("{p}.layers.{l}.{m}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{p}.layers.{l}.{m}.bias"), vec![o]));
            }
        }
        for (name, shape) in layer_dense(cfg, l) {
            out.push((format!("{p}.layers.{l}.{name}"), shape));
        }
    }
    out.push((cfg.final_norm_name(), vec![cfg.hidden_size]));
    if !cfg.tie_word_embeddings {
        out.push((
            "lm_head.weight".to_string(),
            vec![cfg.vocab_size, cfg.hidden_size],
        ));
    }
    out
}

/// The linear module names of a model of `cfg` (`lm_head` unless tied).
pub fn linear_modules(cfg: &SsmConfig) -> Vec<String> {
    let p = cfg.prefix();
    let mut out: Vec<String> = (0..cfg.num_layers)
        .flat_map(|l| {
            layer_linears(cfg, l)
                .into_iter()
                .map(move |(m, ..)| format!("{p}.layers.{l}.{m}"))
        })
        .collect();
    if !cfg.tie_word_embeddings {
        out.push("lm_head".to_string());
    }
    out
}

#[derive(Debug)]
struct SsmLayer {
    kind: BlockKind,
    /// Mixer: in, x, dt, out; attention: q, k, v, o; then (Jamba) gate, up, down.
    linears: Vec<Linear>,
    /// Relative name to tensor, in [`layer_dense`] order.
    dense: Vec<(String, Tensor)>,
    /// Relative module names of `linears`.
    names: Vec<String>,
}

impl SsmLayer {
    fn get(&self, suffix: &str) -> Option<&Tensor> {
        self.dense
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, t)| t)
    }
    fn need(&self, suffix: &str) -> Result<&Tensor> {
        self.get(suffix)
            .ok_or_else(|| Error::Internal(format!("layer tensor `{suffix}` is missing")))
    }
}

/// A Mamba, Falcon-Mamba or Jamba model with Hugging Face parameter names.
#[derive(Debug)]
pub struct SsmLm {
    cfg: SsmConfig,
    hf_config: Value,
    embed: Tensor,
    layers: Vec<SsmLayer>,
    norm: Tensor,
    lm_head: Option<Linear>,
    device: Device,
    kind: Kind,
}

impl SsmLm {
    /// Builds the model from a weight source; every dense parameter gets `requires_grad(true)`.
    pub(crate) fn build(
        cfg: SsmConfig,
        hf_config: Value,
        src: &mut dyn super::llama::WeightSource,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let p = cfg.prefix();
        let embed = src.tensor(&cfg.embed_name())?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut linears = Vec::new();
            let mut names = Vec::new();
            for (m, _, _, bias) in layer_linears(&cfg, l) {
                linears.push(src.linear(&format!("{p}.layers.{l}.{m}"), bias)?);
                names.push(m);
            }
            let mut dense = Vec::new();
            for (n, _) in layer_dense(&cfg, l) {
                let t = src.tensor(&format!("{p}.layers.{l}.{n}"))?;
                dense.push((n, t));
            }
            layers.push(SsmLayer {
                kind: cfg.blocks[l],
                linears,
                dense,
                names,
            });
        }
        let norm = src.tensor(&cfg.final_norm_name())?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.linear("lm_head", false)?)
        };
        let model = SsmLm {
            cfg,
            hf_config,
            embed,
            layers,
            norm,
            lm_head,
            device,
            kind,
        };
        for (_, p) in model.named_parameters() {
            let _ = p.set_requires_grad(true);
        }
        Ok(model)
    }

    /// The parsed configuration.
    pub fn config(&self) -> &SsmConfig {
        &self.cfg
    }

    fn norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        rms_norm(x, w, eps)
    }

    /// RMS norm without weight (Falcon-Mamba's `FalconMambaWeightlessRMSNorm`): in fp32, cast
    /// back to `x`'s kind.
    fn weightless_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float).ctx("rms to fp32")?;
        let var = xf
            .f_square()
            .ctx("rms square")?
            .f_mean_dim(-1, true, Kind::Float)
            .ctx("rms mean")?;
        xf.f_mul(
            &var.f_add_scalar(eps)
                .ctx("rms eps")?
                .f_rsqrt()
                .ctx("rms rsqrt")?,
        )
        .ctx("rms scale")?
        .f_to_kind(kind)
        .ctx("rms cast back")
    }

    /// `x * mask[:, :, None]` (transformers' `apply_mask_to_padding_states`), `x` `[b, t, c]`.
    fn mask_pad(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match mask {
            None => Ok(x.shallow_clone()),
            Some(m) => x
                .f_mul(&m.f_unsqueeze(-1).ctx("pad mask")?)
                .ctx("mask padding")?
                .f_to_kind(x.kind())
                .ctx("mask padding kind"),
        }
    }

    fn mixer(
        &self,
        l: &SsmLayer,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (d, r, n) = (c.d_inner, c.dt_rank, c.state_size);
        let m = c.mixer();
        let x = Self::mask_pad(x, mask)?;
        let proj = l.linears[0].forward(&x, train)?; // [b, t, 2d]
        let xs = proj
            .f_narrow(-1, 0, d)
            .ctx("in_proj split")?
            .f_transpose(1, 2)
            .ctx("in_proj transpose")?;
        let z = proj
            .f_narrow(-1, d, d)
            .ctx("in_proj split")?
            .f_transpose(1, 2)
            .ctx("gate transpose")?;
        let conv_w = l.need(&format!("{m}.conv1d.weight"))?;
        let conv_b = l.get(&format!("{m}.conv1d.bias"));
        let u = causal_conv1d_silu(&xs, conv_w, conv_b)?; // [b, d, t]
        let u_t = Self::mask_pad(&u.f_transpose(1, 2).ctx("conv transpose")?, mask)?; // [b, t, d]
        let xdbl = l.linears[1].forward(&u_t, train)?;
        let mut ts = xdbl.f_narrow(-1, 0, r).ctx("x_proj split")?;
        let mut b = xdbl.f_narrow(-1, r, n).ctx("x_proj split")?;
        let mut cm = xdbl.f_narrow(-1, r + n, n).ctx("x_proj split")?;
        match c.family {
            SsmFamily::FalconMamba => {
                ts = Self::weightless_norm(&ts, c.mixer_eps)?;
                b = Self::weightless_norm(&b, c.mixer_eps)?;
                cm = Self::weightless_norm(&cm, c.mixer_eps)?;
            }
            SsmFamily::Jamba => {
                let cont = |t: Tensor| t.f_contiguous().ctx("x_proj split contiguous");
                ts = self.norm(
                    &cont(ts)?,
                    l.need(&format!("{m}.dt_layernorm.weight"))?,
                    c.mixer_eps,
                )?;
                b = self.norm(
                    &cont(b)?,
                    l.need(&format!("{m}.b_layernorm.weight"))?,
                    c.mixer_eps,
                )?;
                cm = self.norm(
                    &cont(cm)?,
                    l.need(&format!("{m}.c_layernorm.weight"))?,
                    c.mixer_eps,
                )?;
            }
            SsmFamily::Mamba => {}
        }
        // dt_proj with its bias (and adapter); the scan then adds a zero bias
        let dt = l.linears[2]
            .forward(&ts, train)?
            .f_transpose(1, 2)
            .ctx("dt transpose")?;
        let a = l
            .need(&format!("{m}.A_log"))?
            .f_to_kind(Kind::Float)
            .ctx("A_log fp32")?
            .f_exp()
            .ctx("exp(A_log)")?
            .f_neg()
            .ctx("-exp(A_log)")?;
        let dvec = l
            .need(&format!("{m}.D"))?
            .f_to_kind(Kind::Float)
            .ctx("D fp32")?;
        let zero_bias = Tensor::f_zeros([d], (Kind::Float, self.device)).ctx("dt bias")?;
        let fp = |t: Tensor| -> Result<Tensor> {
            t.f_to_kind(Kind::Float)
                .ctx("scan input fp32")?
                .f_contiguous()
                .ctx("scan input contiguous")
        };
        let (uf, dtf, zf, bf, cf) = (
            fp(u_t.f_transpose(1, 2).ctx("u")?)?,
            fp(dt)?,
            fp(z)?,
            fp(b)?,
            fp(cm)?,
        );
        let y = selective_scan(&ScanInput {
            u: &uf,
            dt: &dtf,
            a: &a,
            b: &bf,
            c: &cf,
            d: &dvec,
            z: &zf,
            dt_bias: &zero_bias,
        })?;
        let y = y
            .f_transpose(1, 2)
            .ctx("scan transpose")?
            .f_to_kind(x.kind())
            .ctx("scan kind")?;
        l.linears[3].forward(&y, train)
    }

    fn attention(&self, l: &SsmLayer, x: &Tensor, ctx: &LayerCtx, train: bool) -> Result<Tensor> {
        let (b, t) = match x.size().as_slice() {
            [b, t, _] => (*b, *t),
            s => {
                return Err(Error::Shape {
                    op: "attention".into(),
                    msg: format!("hidden must be [batch, seq, hidden], got {s:?}"),
                });
            }
        };
        let c = &self.cfg;
        let hd = c.head_dim;
        let heads = |y: Tensor, n: i64| -> Result<Tensor> {
            y.f_view([b, t, n, hd])
                .ctx("split heads")?
                .f_transpose(1, 2)
                .ctx("heads transpose")
        };
        let q = heads(l.linears[0].forward(x, train)?, c.num_heads)?;
        let k = heads(l.linears[1].forward(x, train)?, c.num_kv_heads)?;
        let v = heads(l.linears[2].forward(x, train)?, c.num_kv_heads)?;
        let dropout = if train { c.attention_dropout } else { 0.0 };
        let mask = ctx.mask.as_ref();
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            dropout,
            mask.is_none(),
            None::<f64>,
            c.num_heads != c.num_kv_heads,
        )
        .ctx("scaled_dot_product_attention")?
        .f_transpose(1, 2)
        .ctx("merge heads")?
        .f_reshape([b, t, c.num_heads * hd])
        .ctx("merge heads")?;
        l.linears[3].forward(&y, train)
    }

    fn mlp(&self, l: &SsmLayer, x: &Tensor, train: bool) -> Result<Tensor> {
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

    /// The base model's tensors by Hugging Face name, as a dense checkpoint holds them.
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let p = self.cfg.prefix();
        let mut out = vec![(self.cfg.embed_name(), self.embed.shallow_clone())];
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in l.names.iter().zip(&l.linears) {
                out.push((
                    format!("{p}.layers.{i}.{m}.weight"),
                    lin.dense_weight(self.kind)?,
                ));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.layers.{i}.{m}.bias"), b.shallow_clone()));
                }
            }
            for (n, t) in &l.dense {
                out.push((format!("{p}.layers.{i}.{n}"), t.shallow_clone()));
            }
        }
        out.push((self.cfg.final_norm_name(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h.dense_weight(self.kind)?));
        }
        Ok(out)
    }
}

impl CausalLm for SsmLm {
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
        let pad = self.cfg.pad_token_id.unwrap_or(-1);
        Tensor::f_embedding(&self.embed, input_ids, pad, false, false).ctx("embeddings")
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
        let padding = match input.attention_mask {
            None => None,
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
                let all = m
                    .f_ne(0)
                    .ctx("attention_mask")?
                    .f_all()
                    .ctx("attention_mask all")?
                    .f_int64_value(&[])
                    .ctx("attention_mask all")?;
                if all == 1 {
                    None
                } else {
                    Some(
                        m.f_to_kind(self.kind)
                            .ctx("attention_mask kind")?
                            .f_to_device(self.device)
                            .ctx("attention_mask device")?,
                    )
                }
            }
            Some(_) => {
                return Err(Error::Unsupported {
                    what: "packed rows".into(),
                    msg: format!(
                        "{} has Mamba (state-space) layers, whose scan state would run across the \
                     sequences packed into a row (a 4-D attention mask). Set \
                     `data.packing: false`.",
                        self.cfg.architecture
                    ),
                });
            }
        };
        let mask = if self.layers.iter().any(|l| l.kind == BlockKind::Attention) {
            super::llama::build_mask(input, b, t, self.device, None)?
        } else {
            None
        };
        let empty = Tensor::f_zeros([0], (self.kind, self.device)).ctx("empty rope table")?;
        Ok(LayerCtx {
            cos: empty.shallow_clone(),
            sin: empty,
            mask,
            sliding_mask: None,
            local: None,
            padding,
        })
    }

    fn layer(&self, i: usize, hidden: &Tensor, ctx: &LayerCtx, train: bool) -> Result<Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "layer {i} out of range (the model has {})",
                self.layers.len()
            ))
        })?;
        let c = &self.cfg;
        let pad = ctx.padding.as_ref();
        if !c.jamba() {
            let x = self.norm(
                &hidden.f_to_kind(self.kind).ctx("norm input kind")?,
                l.need("norm.weight")?,
                c.norm_eps,
            )?;
            let residual = if c.residual_in_fp32 {
                hidden.f_to_kind(Kind::Float).ctx("residual fp32")?
            } else {
                hidden.shallow_clone()
            };
            let y = self.mixer(l, &x, pad, train)?;
            return residual.f_add(&y).ctx("mixer residual");
        }
        let x = self.norm(hidden, l.need("input_layernorm.weight")?, c.norm_eps)?;
        let y = match l.kind {
            BlockKind::Mamba => self.mixer(l, &x, pad, train)?,
            BlockKind::Attention => self.attention(l, &x, ctx, train)?,
        };
        let h = hidden.f_add(&y).ctx("mixer residual")?;
        let m = self.mlp(
            l,
            &self.norm(&h, l.need("pre_ff_layernorm.weight")?, c.norm_eps)?,
            train,
        )?;
        h.f_add(&m).ctx("mlp residual")
    }

    fn head_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm(
            &hidden.f_to_kind(self.kind).ctx("final norm kind")?,
            &self.norm,
            self.cfg.norm_eps,
        )
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
        let p = self.cfg.prefix();
        let mut out = vec![(self.cfg.embed_name(), self.embed.shallow_clone())];
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in l.names.iter().zip(&l.linears) {
                for (n, t) in lin.named_parameters() {
                    out.push((format!("{p}.layers.{i}.{m}.{n}"), t));
                }
            }
            for (n, t) in &l.dense {
                out.push((format!("{p}.layers.{i}.{n}"), t.shallow_clone()));
            }
        }
        out.push((self.cfg.final_norm_name(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            for (n, t) in h.named_parameters() {
                out.push((format!("lm_head.{n}"), t));
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let p = self.cfg.prefix();
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (m, lin) in l.names.iter().zip(l.linears.iter_mut()) {
                out.push((format!("{p}.layers.{i}.{m}"), lin));
            }
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let p = self.cfg.prefix();
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (m, lin) in l.names.iter().zip(l.linears.iter()) {
                out.push((format!("{p}.layers.{i}.{m}"), lin));
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
            match self.cfg.family {
                SsmFamily::Jamba => "model.embed_tokens.weight",
                _ => "backbone.embeddings.weight",
            }
        }
    }

    fn embed_param(&self) -> &str {
        match self.cfg.family {
            SsmFamily::Jamba => "model.embed_tokens.weight",
            _ => "backbone.embeddings.weight",
        }
    }

    fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        SsmLm::checkpoint_tensors(self)
    }
}
