//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as PEFT implements it
//! (peft 0.21.2 `tuners/lora/layer.py`): `y = W x + b + scaling * B(A(dropout(x)))` with
//! `A: [r, in]`, `B: [out, r]`, `scaling = alpha / r`, or `alpha / sqrt(r)` with rsLoRA
//! (Kalajdzievski 2023, <https://arxiv.org/abs/2312.03732>). A starts Kaiming-uniform with
//! `a = sqrt(5)` (bound `1 / sqrt(in)`), B at zero, so a fresh adapter leaves the model unchanged.

use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::AdapterInjector;
use super::peft::{load_peft_adapter_as, read_peft_config, save_peft_adapter};
use super::presets::{get_targets, module_targets};
use crate::error::{Error, Result, TchResultExt};
use crate::model::CausalLm;
use crate::nn::{Linear, LinearAdapter, LowRank};

/// Which linear modules get an adapter.
///
/// In YAML/JSON: `all-linear` (or `all_linear`), a preset name (`llama`), a list of names
/// (`[q_proj, v_proj]`), or one of `{preset: mlp_only}`, `{names: [...]}`, `{regex: "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TargetsRepr", into = "TargetsRepr")]
pub enum Targets {
    /// Module names or name suffixes, PEFT's list semantics: a module matches when its full name
    /// equals an entry or ends with `.` + entry (`q_proj`, `self_attn.q_proj`,
    /// `model.layers.0.mlp.up_proj`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name (PEFT's string form).
    Regex(String),
    /// Every linear layer except the LM head (PEFT's `all-linear`).
    AllLinear,
    /// A named preset, see [`super::presets::get_targets`] (with the fused projections of
    /// [`super::presets::module_targets`]).
    Preset(String),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Preset("llama".to_string())
    }
}

/// The serialized forms of [`Targets`].
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum TargetsRepr {
    Word(String),
    List(Vec<String>),
    Map(TargetsMap),
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TargetsMap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<TargetsRepr> for Targets {
    type Error = String;
    fn try_from(r: TargetsRepr) -> std::result::Result<Self, String> {
        match r {
            TargetsRepr::Word(w) if w == "all-linear" || w == "all_linear" => {
                Ok(Targets::AllLinear)
            }
            TargetsRepr::Word(w) => match get_targets(&w) {
                Ok(_) => Ok(Targets::Preset(w)),
                Err(e) => Err(format!(
                    "{e}; or use all-linear, a list of module names, {{names: [...]}} or {{regex: ...}}"
                )),
            },
            TargetsRepr::List(l) => Ok(Targets::Names(l)),
            TargetsRepr::Map(m) => match (m.preset, m.names, m.regex) {
                (Some(p), None, None) => Ok(Targets::Preset(p)),
                (None, Some(n), None) => Ok(Targets::Names(n)),
                (None, None, Some(r)) => Ok(Targets::Regex(r)),
                _ => Err("give exactly one of `preset`, `names`, `regex`".to_string()),
            },
        }
    }
}

impl From<Targets> for TargetsRepr {
    fn from(t: Targets) -> Self {
        match t {
            Targets::AllLinear => TargetsRepr::Word("all-linear".into()),
            Targets::Names(n) => TargetsRepr::List(n),
            Targets::Preset(p) => TargetsRepr::Map(TargetsMap {
                preset: Some(p),
                ..Default::default()
            }),
            Targets::Regex(r) => TargetsRepr::Map(TargetsMap {
                regex: Some(r),
                ..Default::default()
            }),
        }
    }
}

/// A compiled [`Targets`].
enum Matcher {
    Names(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl Matcher {
    fn new(t: &Targets) -> Result<Self> {
        Ok(match t {
            Targets::Names(n) => {
                if n.is_empty() {
                    return Err(Error::config("lora.target.names", "is empty"));
                }
                Matcher::Names(n.clone())
            }
            Targets::Regex(r) => {
                Matcher::Regex(regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                    Error::config("lora.target.regex", format!("invalid regex `{r}`: {e}"))
                })?)
            }
            Targets::AllLinear => Matcher::AllLinear,
            Targets::Preset(p) => {
                Matcher::Names(module_targets(p)?.into_iter().map(String::from).collect())
            }
        })
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Matcher::Names(n) => n.iter().any(|t| name_matches(module, t)),
            Matcher::Regex(r) => r.is_match(module),
            Matcher::AllLinear => module != "lm_head" && !module.ends_with(".lm_head"),
        }
    }
}

/// `module == target` or `module` ends with `.target`.
pub(crate) fn name_matches(module: &str, target: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module.as_bytes()[module.len() - target.len() - 1] == b'.')
}

/// LoRA hyper-parameters: the `lora:` section of the YAML file (and the options of
/// `adapter: {name: lora, ...}`), and what [`LoraInjector`] injects.
///
/// Defaults: `r = 16`, `alpha = 32`, `dropout = 0.0` (the reference system's YAML defaults, which
/// `config/sft.yaml` shows; PEFT's own `LoraConfig` defaults are `r = 8`, `lora_alpha = 8`,
/// `lora_dropout = 0.0`), `use_rslora = false` and PEFT's initialisation (both as in PEFT),
/// targets the `llama` preset.
///
/// Key names: the reference system's (`rank`, `alpha`, `dropout`, `target_modules`), which are
/// written, and the library's and PEFT's (`r`, `target`, `lora_alpha`, `lora_dropout`), which
/// are accepted too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// The YAML switch: `false` trains all weights without an adapter (the section is then
    /// ignored). [`LoraInjector`] does not read it. Default `true`.
    pub enabled: bool,
    /// Rank (`rank`; `r` is accepted).
    #[serde(rename = "rank", alias = "r")]
    pub r: i64,
    /// Scale numerator (`lora_alpha`).
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input while training (`lora_dropout`).
    #[serde(alias = "lora_dropout")]
    pub dropout: f64,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Which linear modules get an adapter (`target_modules`; `target` is accepted).
    #[serde(rename = "target_modules", alias = "target")]
    pub target: Targets,
    /// Modules (names or `.`-suffixes) trained in full next to the adapters and saved with them.
    pub modules_to_save: Vec<String>,
    /// PEFT's initialisation (A Kaiming-uniform, B zero). `false` draws B like A too, so a fresh
    /// adapter already changes the outputs (PEFT's `init_lora_weights=False` is for tests too).
    pub init_lora_weights: bool,
    /// Written to `adapter_config.json` as `base_model_name_or_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Start from the weights of this PEFT adapter directory (saved by VoltTrain or PEFT) with a
    /// fresh optimizer, schedule and step count, unlike `--resume`. Its `adapter_config.json`
    /// gives the adapter's shape (rank, alpha, targets, `modules_to_save`); `dropout` is this
    /// config's. Read by [`super::inject_lora`], not by [`LoraInjector`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            enabled: true,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target: Targets::default(),
            modules_to_save: Vec::new(),
            init_lora_weights: true,
            base_model_name_or_path: None,
            init_from: None,
        }
    }
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values; errors name the field under `lora.` (`lora.rank`).
    pub fn validate(&self) -> Result<()> {
        self.validate_as("lora")
    }

    /// [`validate`](Self::validate) with errors under `section` (`lora`, `adapter`).
    pub fn validate_as(&self, section: &str) -> Result<()> {
        let key = |k: &str| format!("{section}.{k}");
        if self.r <= 0 {
            return Err(Error::config(
                key("rank"),
                format!("must be >= 1, got {}", self.r),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config(
                key("alpha"),
                format!("must be finite and > 0, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                key("dropout"),
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        Matcher::new(&self.target).map(|_| ())
    }
}

/// The low-rank update of one linear layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// Factor on `B A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
    /// Probability of zeroing an input element before `A` while training (0: no dropout).
    pub dropout: f64,
    /// Off: the layer computes its base output alone (PEFT's `disable_adapter()`), e.g. for the
    /// reference log-probs of preference tuning. Shared-reference switch, see
    /// [`AdaptersDisabled`].
    enabled: AtomicBool,
}

impl LoraAdapter {
    /// Whether the adapter adds its update (true unless switched off).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switches the update on or off (the parameters are kept).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// A fresh adapter for a `[out, in]` layer in `kind` on `device`, trainable.
    pub fn new(
        out: i64,
        inp: i64,
        cfg: &LoraConfig,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self> {
        let _g = tch::no_grad_guard();
        // kaiming_uniform_(a = sqrt(5)) on [r, in]: gain = sqrt(2 / (1 + 5)), bound =
        // gain * sqrt(3 / fan_in) = 1 / sqrt(in).
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::f_empty([cfg.r, inp], (kind, device))
            .ctx("lora_A alloc")?
            .f_uniform_(-bound, bound)
            .ctx("lora_A init")?;
        let b = if cfg.init_lora_weights {
            Tensor::f_zeros([out, cfg.r], (kind, device)).ctx("lora_B init")?
        } else {
            let bound = 1.0 / (cfg.r as f64).sqrt();
            Tensor::f_empty([out, cfg.r], (kind, device))
                .ctx("lora_B alloc")?
                .f_uniform_(-bound, bound)
                .ctx("lora_B init")?
        };
        Ok(LoraAdapter {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            enabled: AtomicBool::new(true),
        })
    }
}

impl LinearAdapter for LoraAdapter {
    fn forward(&self, x: &Tensor, base_out: Tensor, train: bool) -> Result<Tensor> {
        if !self.is_enabled() {
            return Ok(base_out);
        }
        let x = if train && self.dropout > 0.0 {
            x.f_dropout(self.dropout, true).ctx("lora dropout")?
        } else {
            x.shallow_clone()
        };
        let x = x.f_to_kind(self.a.kind()).ctx("lora input kind")?;
        let delta = x
            .f_linear::<&Tensor>(&self.a, None)
            .ctx("lora_A")?
            .f_linear::<&Tensor>(&self.b, None)
            .ctx("lora_B")?
            .f_mul_scalar(self.scaling)
            .ctx("lora scaling")?
            .f_to_kind(base_out.kind())
            .ctx("lora output kind")?;
        base_out.f_add(&delta).ctx("lora add")
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("lora_A.weight".to_string(), self.a.shallow_clone()),
            ("lora_B.weight".to_string(), self.b.shallow_clone()),
        ]
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.b
            .f_matmul(&self.a)
            .ctx("lora B @ A")?
            .f_mul_scalar(self.scaling)
            .ctx("lora delta scaling")
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn low_rank(&self, train: bool) -> Option<LowRank<'_>> {
        if (train && self.dropout > 0.0) || !self.is_enabled() {
            return None;
        }
        Some(LowRank {
            a: &self.a,
            b: &self.b,
            scaling: self.scaling,
        })
    }
}

/// Adds LoRA adapters to the matching linear layers and returns the trainable parameters.
#[derive(Debug, Clone, Default)]
pub struct LoraInjector {
    /// The adapters' shape and training settings (after [`AdapterInjector::load`]: the loaded
    /// adapter's shape).
    pub config: LoraConfig,
}

impl LoraInjector {
    /// An injector of adapters shaped by `config`.
    pub fn new(config: LoraConfig) -> Self {
        LoraInjector { config }
    }
}

/// Whether `module` is (inside) one of `modules_to_save`.
fn in_modules_to_save(module: &str, modules_to_save: &[String]) -> bool {
    modules_to_save.iter().any(|m| name_matches(module, m))
}

/// The module part of a parameter name (`lm_head.weight` -> `lm_head`).
fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map(|(m, _)| m).unwrap_or(param)
}

impl AdapterInjector for LoraInjector {
    fn name(&self) -> &str {
        "lora"
    }

    /// Freezes the base, wraps the matching linears and keeps `modules_to_save` trainable.
    /// Errors when the targets match no linear of the model, when a `modules_to_save` entry
    /// matches no parameter, or when a layer already holds an adapter.
    fn inject(&self, model: &mut dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
        let cfg = &self.config;
        cfg.validate()?;
        let matcher = Matcher::new(&cfg.target)?;
        if let Targets::Preset(p) = &cfg.target {
            let modules: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
            super::presets::check_model_kinds(p, model.architecture(), &modules)?;
        }
        // trainable weights stay fp32 over a half-precision base (`model.dtype`): autocast
        // computes the products in the half kind, the optimizer updates fp32
        let kind = trainable_kind(model.kind());
        let device = model.device();
        model.freeze_base();
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for (name, lin) in model.linears_mut() {
            if !matcher.matches(&name) || in_modules_to_save(&name, &cfg.modules_to_save) {
                if seen.len() < 8 {
                    seen.push(name);
                }
                continue;
            }
            if lin.adapter.is_some() {
                return Err(Error::invalid(format!("`{name}` already has an adapter")));
            }
            let (o, i) = lin.shape();
            let adapter = LoraAdapter::new(o, i, cfg, kind, device)?;
            for (n, t) in adapter.named_parameters() {
                out.push((format!("{name}.{n}"), t));
            }
            lin.adapter = Some(Box::new(adapter));
            lin.merged = false;
        }
        if out.is_empty() {
            return Err(Error::config(
                "lora.target",
                format!(
                    "{:?} matches no linear module of the model; modules look like: {}",
                    cfg.target,
                    seen.join(", ")
                ),
            ));
        }
        for m in &cfg.modules_to_save {
            let params: Vec<(String, Tensor)> = model
                .named_parameters()
                .into_iter()
                .filter(|(n, _)| name_matches(module_of(n), m) && !n.contains(".lora_"))
                .collect();
            if params.is_empty() {
                return Err(Error::config(
                    "lora.modules_to_save",
                    format!("`{m}` matches no module with parameters"),
                ));
            }
            for (n, mut t) in params {
                if t.kind() != trainable_kind(t.kind()) {
                    // the module's own tensor, converted in place (PyTorch's `param.data = ...`)
                    let _g = tch::no_grad_guard();
                    let f = t
                        .f_to_kind(trainable_kind(t.kind()))
                        .ctx(format!("`{n}` to fp32"))?;
                    t.f_set_data(&f).ctx(format!("`{n}` to fp32"))?;
                }
                let _ = t.set_requires_grad(true);
                out.push((n, t));
            }
        }
        Ok(out)
    }

    /// PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
    /// ([`save_peft_adapter`] with this injector's config).
    fn save(&self, model: &dyn CausalLm, dir: &Path) -> Result<()> {
        save_peft_adapter(model, &self.config, dir)
    }

    /// Loads a PEFT adapter (VoltTrain's or PEFT's own): its rank, alpha, rsLoRA, targets and
    /// `modules_to_save` come from `dir/adapter_config.json`, the dropout and
    /// `base_model_name_or_path` (settings of this run, not of the weights) stay this
    /// injector's, and `self.config` becomes that combination. Every adapter parameter is
    /// trainable.
    fn load(&mut self, model: &mut dyn CausalLm, dir: &Path) -> Result<Vec<(String, Tensor)>> {
        let mut cfg = read_peft_config(dir)?;
        cfg.dropout = self.config.dropout;
        cfg.base_model_name_or_path = self.config.base_model_name_or_path.clone();
        let (cfg, params) = load_peft_adapter_as(model, dir, cfg)?;
        for (_, t) in &params {
            let _ = t.set_requires_grad(true);
        }
        self.config = cfg;
        Ok(params)
    }
}

/// The kind trainable weights get over a base of `base` kind: fp32 for a half-precision base,
/// the base's kind otherwise.
fn trainable_kind(base: Kind) -> Kind {
    match base {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// Names the layer in a merge error, keeping its variant.
fn in_layer(e: Error, what: &str, name: &str) -> Error {
    match e {
        Error::Torch { context, source } => Error::Torch {
            context: format!("{what} `{name}`: {context}"),
            source,
        },
        Error::Unsupported { what: w, msg } => Error::Unsupported {
            what: format!("{what} `{name}`: {w}"),
            msg,
        },
        Error::Shape { op, msg } => Error::Shape {
            op: format!("{what} `{name}`: {op}"),
            msg,
        },
        other => other,
    }
}

/// Adds every adapter's delta into its dense base weight.
pub fn merge_adapters(model: &mut dyn CausalLm) -> Result<()> {
    for (name, lin) in model.linears_mut() {
        lin.merge().map_err(|e| in_layer(e, "merging", &name))?;
    }
    Ok(())
}

/// Subtracts merged deltas again.
pub fn unmerge_adapters(model: &mut dyn CausalLm) -> Result<()> {
    for (name, lin) in model.linears_mut() {
        lin.unmerge().map_err(|e| in_layer(e, "unmerging", &name))?;
    }
    Ok(())
}

/// Switches every LoRA adapter of a model off until dropped (PEFT's `with
/// model.disable_adapter():`): the model then computes its base outputs, as the frozen reference
/// of preference tuning needs, without a second copy of the weights.
pub struct AdaptersDisabled<'a> {
    model: &'a dyn CausalLm,
}

impl<'a> AdaptersDisabled<'a> {
    /// Switches the adapters of `model` off.
    pub fn new(model: &'a dyn CausalLm) -> Self {
        set_adapters_enabled(model, false);
        AdaptersDisabled { model }
    }
}

impl Drop for AdaptersDisabled<'_> {
    fn drop(&mut self) {
        set_adapters_enabled(self.model, true);
    }
}

/// Switches every LoRA adapter of `model` on or off; returns how many it switched.
pub fn set_adapters_enabled(model: &dyn CausalLm, on: bool) -> usize {
    let mut n = 0;
    for (_, l) in model.linears() {
        if let Some(a) = l
            .adapter
            .as_ref()
            .and_then(|a| a.as_any().downcast_ref::<LoraAdapter>())
        {
            a.set_enabled(on);
            n += 1;
        }
    }
    n
}

/// Whether `l` carries a LoRA adapter.
pub fn is_lora(l: &Linear) -> bool {
    l.adapter
        .as_ref()
        .is_some_and(|a| a.as_any().downcast_ref::<LoraAdapter>().is_some())
}

/// The LoRA adapters of a model by module name.
pub fn lora_modules(model: &mut dyn CausalLm) -> Vec<(String, &mut Linear)> {
    model
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| is_lora(l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused forward of `Linear` (one accumulating product) against PEFT's formula
    /// `W x + b + scaling * B(A x)`, values and gradients, with a non-power-of-two scaling.
    #[test]
    fn fused_low_rank_forward_matches_peft_formula() {
        tch::manual_seed(3);
        let cfg = LoraConfig {
            r: 4,
            alpha: 3.0,
            dropout: 0.0,
            init_lora_weights: false,
            ..LoraConfig::default()
        };
        let w = Tensor::randn([6, 5], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([6], (Kind::Float, tch::Device::Cpu));
        let mut lin = Linear::new(w.shallow_clone(), Some(b.shallow_clone()));
        let ad = LoraAdapter::new(6, 5, &cfg, Kind::Float, tch::Device::Cpu).unwrap();
        let (a, bb) = (ad.a.shallow_clone(), ad.b.shallow_clone());
        lin.adapter = Some(Box::new(ad));
        let x = Tensor::randn([2, 3, 5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let got = lin.forward(&x, true).unwrap();
        assert_eq!(got.size(), [2, 3, 6]);
        let lora = x.linear::<&Tensor>(&a, None).linear::<&Tensor>(&bb, None) * 0.75;
        let want = x.linear(&w, Some(&b)) + lora;
        assert!(got.allclose(&want, 1e-5, 1e-6, false));
        let gw = Tensor::randn([2, 3, 6], (Kind::Float, tch::Device::Cpu));
        let grads = |y: &Tensor| -> Vec<Tensor> {
            let g =
                Tensor::run_backward(&[(y * &gw).sum(Kind::Float)], &[&x, &a, &bb], false, false);
            g.into_iter().map(|t| t.detach()).collect()
        };
        for (g1, g2) in grads(&got).iter().zip(grads(&want).iter()) {
            assert!(g1.allclose(g2, 1e-5, 1e-6, false));
        }
    }

    #[test]
    fn config_from_yaml_with_peft_field_names_and_defaults() {
        let cfg: LoraConfig = serde_yaml::from_str(
            "r: 16\nlora_alpha: 32\ntarget: {preset: mlp_only}\nmodules_to_save: [lm_head]\nuse_rslora: true\n",
        )
        .unwrap();
        assert_eq!(cfg.r, 16);
        assert_eq!(cfg.alpha, 32.0);
        assert_eq!(cfg.dropout, 0.0);
        assert_eq!(cfg.target, Targets::Preset("mlp_only".into()));
        // rsLoRA: alpha / sqrt(r) (Kalajdzievski 2023)
        assert_eq!(cfg.scaling(), 32.0 / 4.0);
        let plain = LoraConfig::default();
        assert_eq!((plain.r, plain.alpha, plain.dropout), (16, 32.0, 0.0));
        assert_eq!(plain.scaling(), 32.0 / 16.0);
        let all: LoraConfig = serde_yaml::from_str("target: all-linear").unwrap();
        assert_eq!(all.target, Targets::AllLinear);
        let named: LoraConfig = serde_yaml::from_str("target: [q_proj, v_proj]").unwrap();
        assert_eq!(
            named.target,
            Targets::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        let preset: LoraConfig = serde_yaml::from_str("target: llama").unwrap();
        assert_eq!(preset.target, Targets::Preset("llama".into()));
        let re: LoraConfig = serde_yaml::from_str("target: {regex: '.*q_proj'}").unwrap();
        assert_eq!(re.target, Targets::Regex(".*q_proj".into()));
        let unknown = serde_yaml::from_str::<LoraConfig>("target: attention")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("mlp_only"), "{unknown}");
        for c in [cfg.clone(), re, named, all] {
            let back: LoraConfig =
                serde_yaml::from_str(&serde_yaml::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        // the reference system's key names are the same fields
        let reference: LoraConfig =
            serde_yaml::from_str("rank: 4\ntarget_modules: [q_proj]\nenabled: false").unwrap();
        assert_eq!(reference.r, 4);
        assert_eq!(reference.target, Targets::Names(vec!["q_proj".into()]));
        assert!(!reference.enabled);
        assert!(serde_yaml::from_str::<LoraConfig>("rnak: 4").is_err());
        let bad = LoraConfig {
            r: 0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("lora.rank")
        );
    }

    #[test]
    fn dropout_only_while_training_and_delta_is_scaled_b_a() {
        let cfg = LoraConfig {
            r: 2,
            alpha: 3.0,
            dropout: 0.5,
            init_lora_weights: false,
            ..Default::default()
        };
        let lora = LoraAdapter::new(4, 6, &cfg, Kind::Float, tch::Device::Cpu).unwrap();
        let x = Tensor::randn([5, 6], (Kind::Float, tch::Device::Cpu));
        let base = Tensor::zeros([5, 4], (Kind::Float, tch::Device::Cpu));
        let eval = lora.forward(&x, base.shallow_clone(), false).unwrap();
        // eval: exactly x A^T B^T * alpha / r
        let want = x.matmul(&lora.a.tr()).matmul(&lora.b.tr()) * 1.5;
        assert!(f64::try_from((&eval - &want).abs().max()).unwrap() < 1e-6);
        let delta = lora.delta_weight().unwrap();
        assert!(f64::try_from((x.matmul(&delta.tr()) - &want).abs().max()).unwrap() < 1e-6);
        let train = lora.forward(&x, base, true).unwrap();
        assert!(f64::try_from((&train - &eval).abs().max()).unwrap() > 1e-4);
    }

    #[test]
    fn name_matching_is_by_whole_components() {
        assert!(name_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(name_matches(
            "model.layers.0.self_attn.q_proj",
            "self_attn.q_proj"
        ));
        assert!(name_matches("lm_head", "lm_head"));
        assert!(!name_matches("model.layers.0.self_attn.q_proj", "proj"));
        assert!(!name_matches("model.layers.0.self_attn.qq_proj", "q_proj"));
    }
}
