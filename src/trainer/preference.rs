//! Preference objectives on the trainer: DPO (`sigmoid`), IPO, hinge, robust DPO and ORPO, with
//! TRL's formulas, reference handling and metric names (trl 1.16.0: `DPOTrainer._compute_loss`,
//! `experimental/orpo/ORPOTrainer.odds_ratio_loss` and `concatenated_forward`).
//!
//! A micro-batch holds `B` pairs as `2B` rows, chosen rows first (see
//! [`crate::data::preference`]); the labels mark the completion tokens. For row `i`,
//! `logp_i` is the sum of the completion tokens' log-probabilities. With
//! `Δ = (logp_c - ref_c) - (logp_r - ref_r)` and `β = beta`, per pair:
//!
//! | `loss_type` | loss | source |
//! |---|---|---|
//! | `sigmoid` | `-log σ(β Δ)` | DPO, Rafailov et al. 2023, eq. 7 |
//! | `hinge` | `max(0, 1 - β Δ)` | SLiC, Zhao et al. 2023 |
//! | `ipo` | `(Δc/len_c - Δr/len_r - 1/(2β))²` (per-token averaged, as TRL) | Azar et al. 2023, eq. 17 |
//! | `robust` | `(-(1-ε) log σ(β Δ) + ε log σ(-β Δ)) / (1 - 2ε)`, `ε = label_smoothing` | Chowdhury et al. 2024 |
//! | `orpo` | `NLL(chosen) - β log σ(log odds)`, reference-free | Hong et al. 2024, eqs. 4-7 |
//!
//! The loss of a step is the mean over its pairs (all micro-batches, all ranks). The metrics are
//! TRL's: `rewards/chosen` (`β (logp_c - ref_c)`, ORPO: `β mean logp_c`), `rewards/rejected`,
//! `rewards/accuracies` (chosen reward > rejected reward), `rewards/margins`, `logps/chosen`,
//! `logps/rejected` (ORPO: per-token means), each a mean over the pairs.
//!
//! The reference log-probabilities come from, in this order: a table computed before training
//! (`precompute_ref_log_probs`), a frozen reference model given to the objective, or the trained
//! model itself with its LoRA adapters switched off ([`crate::adapter::AdaptersDisabled`]: no
//! second copy of the weights).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::BatchSource;
use super::step::{self, Prepared};
use crate::adapter::{AdaptersDisabled, set_adapters_enabled};
use crate::amp::Autocast;
use crate::error::{Error, Result, TchResultExt};
use crate::model::CausalLm;

/// Which preference loss (TRL's `loss_type` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceLoss {
    /// DPO's logistic loss (TRL's default).
    #[default]
    Sigmoid,
    /// IPO's squared loss on per-token averaged log-ratios.
    Ipo,
    /// SLiC's hinge loss.
    Hinge,
    /// Robust DPO: `label_smoothing` is the probability that a label is flipped.
    Robust,
    /// ORPO: SFT loss on the chosen rows plus the odds-ratio term; no reference model.
    Orpo,
}

/// The `preference:` section. Defaults are TRL's `DPOConfig` (trl 1.16.0): `beta` 0.1,
/// `label_smoothing` 0, `loss_type` sigmoid, no precomputation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceConfig {
    /// The preference loss (default `sigmoid`, DPO's).
    #[serde(default)]
    pub loss_type: PreferenceLoss,
    /// How far the policy may move from the reference (larger: less); IPO's τ; ORPO's λ.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// The label-flip probability of `robust` (in `[0, 0.5)`). TRL 1.16 reads it only for robust
    /// (and EXO/AOT), so any other loss type refuses a non-zero value instead of ignoring it.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Compute every reference log-probability once before training (no reference forward per
    /// step; full fine-tuning then needs no reference copy).
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        PreferenceConfig {
            loss_type: PreferenceLoss::Sigmoid,
            beta: default_beta(),
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
        }
    }
}

impl PreferenceConfig {
    /// Checks the values (errors name `preference.<key>`).
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::config(
                "preference.beta",
                format!("must be > 0, got {}", self.beta),
            ));
        }
        let ls = self.label_smoothing;
        match self.loss_type {
            PreferenceLoss::Robust => {
                if !(0.0..0.5).contains(&ls) {
                    return Err(Error::config(
                        "preference.label_smoothing",
                        format!("must lie in [0, 0.5) for the robust loss, got {ls}"),
                    ));
                }
            }
            other => {
                if ls != 0.0 {
                    return Err(Error::config(
                        "preference.label_smoothing",
                        format!(
                            "{ls} has no effect with loss_type {other:?} (TRL applies it to \
                             `robust` only); use loss_type: robust or remove it"
                        ),
                    ));
                }
            }
        }
        if self.loss_type == PreferenceLoss::Orpo && self.precompute_ref_log_probs {
            return Err(Error::config(
                "preference.precompute_ref_log_probs",
                "ORPO uses no reference model; remove precompute_ref_log_probs",
            ));
        }
        Ok(())
    }

    /// Whether the loss needs reference log-probabilities.
    pub fn needs_reference(&self) -> bool {
        self.loss_type != PreferenceLoss::Orpo
    }
}

/// The keys of the metrics, in TRL's names.
pub const METRIC_KEYS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// Key of a row for the precomputed table: its real tokens, then where its labels start and how
/// many there are (a row's reference log-probability depends on nothing else).
type RowKey = Vec<i64>;

/// A preference objective for [`super::TrainerBuilder::preference`].
pub struct PreferenceObjective {
    cfg: PreferenceConfig,
    reference: Option<Box<dyn CausalLm>>,
    table: HashMap<RowKey, f64>,
    /// Sums over pairs: the six metrics, then the number of pairs.
    sums: [f64; 7],
}

/// Per-row values of a forward pass.
struct RowStats {
    /// Summed completion log-probabilities `[rows]` (with a graph when trained).
    logps: Tensor,
    /// Completion tokens per row `[rows]` (fp32).
    counts: Tensor,
}

impl PreferenceObjective {
    /// An objective with `cfg` (checked). Without a reference model, the reference is the
    /// trained model with its adapters off, or the precomputed table.
    pub fn new(cfg: PreferenceConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(PreferenceObjective {
            cfg,
            reference: None,
            table: HashMap::new(),
            sums: [0.0; 7],
        })
    }

    /// A frozen reference model (full fine-tuning without precomputation). Its parameters are
    /// set to `requires_grad(false)`.
    pub fn with_reference_model(mut self, model: Box<dyn CausalLm>) -> Self {
        for (_, p) in model.named_parameters() {
            let _ = p.set_requires_grad(false);
        }
        self.reference = Some(model);
        self
    }

    /// The `preference:` settings this objective runs with.
    pub fn config(&self) -> &PreferenceConfig {
        &self.cfg
    }

    /// Reference log-probabilities computed so far (precomputation).
    pub fn precomputed_rows(&self) -> usize {
        self.table.len()
    }

    /// Checks that a reference is available for `model` (called by the trainer's `build`).
    pub(crate) fn check(&self, model: &dyn CausalLm) -> Result<()> {
        if !self.cfg.needs_reference() || self.cfg.precompute_ref_log_probs {
            return Ok(());
        }
        if let Some(r) = &self.reference {
            if r.device() != model.device() || r.vocab_size() != model.vocab_size() {
                return Err(Error::invalid(format!(
                    "preference: the reference model ({:?}, vocabulary {}) does not match the \
                     trained model ({:?}, vocabulary {})",
                    r.device(),
                    r.vocab_size(),
                    model.device(),
                    model.vocab_size()
                )));
            }
            return Ok(());
        }
        let n = set_adapters_enabled(model, true);
        if n == 0 {
            return Err(Error::invalid(
                "preference: full fine-tuning needs a reference: give a frozen reference model \
                 (PreferenceObjective::with_reference_model) or set \
                 preference.precompute_ref_log_probs: true (LoRA uses the model with its \
                 adapters off)",
            ));
        }
        Ok(())
    }

    /// Computes the reference log-probability of every row of `data` (epoch `epoch`) now, so
    /// that steps run no reference forward. Uses the reference model, or `model` with its
    /// adapters off (call it before training when `model` is fully fine-tuned).
    pub fn precompute(
        &mut self,
        model: &dyn CausalLm,
        data: &mut dyn BatchSource,
        epoch: usize,
        device: Device,
    ) -> Result<()> {
        for i in 0..data.num_batches(epoch) {
            let b = data.batch(epoch, i)?;
            let p = step::prepare(&b, device)?;
            let keys = row_keys(&p)?;
            if keys.iter().all(|k| self.table.contains_key(k)) {
                continue;
            }
            let ref_logps = self.reference_forward(model, &p)?;
            let v = to_vec(&ref_logps)?;
            for (k, x) in keys.into_iter().zip(v) {
                self.table.insert(k, x);
            }
        }
        Ok(())
    }

    /// The reference's summed completion log-probabilities of each row, no graph.
    fn reference_forward(&self, model: &dyn CausalLm, p: &Prepared) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        match &self.reference {
            Some(r) => {
                let h = step::hidden_states(r.as_ref(), p, false)?;
                Ok(row_stats(r.as_ref(), &h, p)?.logps)
            }
            None => {
                let _off = AdaptersDisabled::new(model);
                let h = step::hidden_states(model, p, false)?;
                Ok(row_stats(model, &h, p)?.logps)
            }
        }
    }

    /// Reference log-probabilities of the rows of `p`, `[rows]`.
    fn reference_logps(&mut self, model: &dyn CausalLm, p: &Prepared) -> Result<Tensor> {
        let rows = p.input_ids.size()[0];
        if !self.cfg.needs_reference() {
            return Tensor::f_zeros([rows], (Kind::Float, p.input_ids.device())).ctx("zeros");
        }
        if !self.cfg.precompute_ref_log_probs {
            return self.reference_forward(model, p);
        }
        let keys = row_keys(p)?;
        let mut v = Vec::with_capacity(keys.len());
        for k in &keys {
            match self.table.get(k) {
                Some(x) => v.push(*x),
                None => {
                    return Err(Error::State {
                        owner: "preference reference table".into(),
                        msg: "a row has no precomputed reference log-probability (the table was \
                              computed on other data); call PreferenceObjective::precompute on \
                              every data source"
                            .into(),
                    });
                }
            }
        }
        Tensor::f_from_slice(&v)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .and_then(|t| t.f_to(p.input_ids.device()))
            .ctx("precomputed reference log-probs")
    }

    /// Forward, loss (summed over the pairs) times `scale`, and backward. Returns the unscaled
    /// summed loss; the metrics are added to the running sums.
    pub(crate) fn forward_backward(
        &mut self,
        model: &dyn CausalLm,
        p: &Prepared,
        scale: f64,
        checkpoint: bool,
        seed: (u64, u64, usize),
        amp: Autocast,
    ) -> Result<f64> {
        let ref_logps = amp.run(|| self.reference_logps(model, p))?;
        let mut sums = [0.0; 7];
        let cfg = self.cfg.clone();
        let value = step::forward_backward_with(model, p, checkpoint, seed, amp, &mut |h| {
            let (loss, m) = pair_loss(&cfg, model, h, p, &ref_logps)?;
            sums = m;
            let v = loss.f_double_value(&[]).ctx("loss value")?;
            Ok((loss.f_mul_scalar(scale).ctx("scale loss")?, v))
        })?;
        self.add(&sums);
        Ok(value)
    }

    /// Summed loss of a batch without gradients (evaluation); the metrics go to the sums.
    pub(crate) fn eval_loss(&mut self, model: &dyn CausalLm, p: &Prepared) -> Result<f64> {
        let ref_logps = self.reference_logps(model, p)?;
        let _g = tch::no_grad_guard();
        let h = step::hidden_states(model, p, false)?;
        let (loss, m) = pair_loss(&self.cfg, model, &h, p, &ref_logps)?;
        self.add(&m);
        loss.f_double_value(&[]).ctx("loss value")
    }

    fn add(&mut self, m: &[f64; 7]) {
        for (s, x) in self.sums.iter_mut().zip(m) {
            *s += x;
        }
    }

    /// The running sums (six metrics summed over pairs, then the pair count), reset to zero.
    pub(crate) fn take_sums(&mut self) -> [f64; 7] {
        std::mem::take(&mut self.sums)
    }

    /// Pairs in a micro-batch.
    pub(crate) fn units(p: &Prepared) -> f64 {
        (p.input_ids.size()[0] / 2) as f64
    }
}

/// The metrics as TRL names them, means over the pairs of `sums` (from
/// [`PreferenceObjective::take_sums`], possibly summed over ranks).
pub(crate) fn metrics_from_sums(sums: &[f64]) -> BTreeMap<String, f64> {
    let n = sums.get(6).copied().unwrap_or(0.0);
    if n <= 0.0 {
        return BTreeMap::new();
    }
    METRIC_KEYS
        .iter()
        .zip(sums)
        .map(|(k, s)| (k.to_string(), s / n))
        .collect()
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    let t = t
        .f_to_kind(Kind::Double)
        .and_then(|t| t.f_to(Device::Cpu))
        .ctx("to cpu")?;
    Vec::<f64>::try_from(&t).ctx("tensor to vec")
}

fn row_keys(p: &Prepared) -> Result<Vec<RowKey>> {
    let size = p.input_ids.size();
    let (b, t) = (size[0] as usize, size[1] as usize);
    let ids: Vec<i64> = Vec::try_from(
        &p.input_ids
            .f_to(Device::Cpu)
            .and_then(|x| x.f_reshape([-1]))
            .ctx("ids to cpu")?,
    )
    .ctx("ids")?;
    let mask: Vec<i64> = if p.attention_mask.dim() == 2 {
        Vec::try_from(
            &p.attention_mask
                .f_to_kind(Kind::Int64)
                .and_then(|m| m.f_to(Device::Cpu))
                .and_then(|m| m.f_reshape([-1]))
                .ctx("mask to cpu")?,
        )
        .ctx("mask")?
    } else {
        vec![1; b * t]
    };
    let pos: Vec<i64> =
        Vec::try_from(&p.label_pos.f_to(Device::Cpu).ctx("label pos")?).ctx("label positions")?;
    let mut first = vec![i64::MAX; b];
    let mut count = vec![0i64; b];
    for q in pos {
        let r = (q as usize) / (t - 1).max(1);
        first[r] = first[r].min(q % (t as i64 - 1).max(1));
        count[r] += 1;
    }
    Ok((0..b)
        .map(|r| {
            let mut k: Vec<i64> = (0..t)
                .filter(|&j| mask[r * t + j] != 0)
                .map(|j| ids[r * t + j])
                .collect();
            k.extend([-1, first[r], count[r]]);
            k
        })
        .collect())
}

/// Per-token log-probabilities of the label positions from the last hidden states, summed per
/// row.
fn row_stats(model: &dyn CausalLm, hidden: &Tensor, p: &Prepared) -> Result<RowStats> {
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
    let tok = token_logps(model, &sel, &p.targets)?;
    let row = p
        .label_pos
        .f_floor_divide_scalar(t - 1)
        .ctx("row of each label")?;
    let dev = hidden.device();
    let logps = Tensor::f_zeros([b], (Kind::Float, dev))
        .ctx("zeros")?
        .f_index_add(0, &row, &tok)
        .ctx("sum per row")?;
    let ones = Tensor::f_ones([tok.size()[0]], (Kind::Float, dev)).ctx("ones")?;
    let counts = Tensor::f_zeros([b], (Kind::Float, dev))
        .ctx("zeros")?
        .f_index_add(0, &row, &ones)
        .ctx("count per row")?;
    Ok(RowStats { logps, counts })
}

/// `log_softmax(head(h))[target]` for each row of `sel` `[n, h]`, fp32.
fn token_logps(model: &dyn CausalLm, sel: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = model
        .head(sel)?
        .f_to_kind(Kind::Float)
        .ctx("logits to fp32")?;
    logits
        .f_log_softmax(-1, Kind::Float)
        .ctx("log_softmax")?
        .f_gather(1, &targets.f_unsqueeze(1).ctx("targets")?, false)
        .ctx("gather targets")?
        .f_squeeze_dim(1)
        .ctx("squeeze")
}

/// ORPO's NLL: mean cross-entropy over every real next token of the chosen rows (prompt
/// included), as TRL's `concatenated_forward`.
fn chosen_nll(model: &dyn CausalLm, hidden: &Tensor, p: &Prepared, pairs: i64) -> Result<Tensor> {
    let size = hidden.size();
    let (t, h) = (size[1], size[2]);
    let chosen = hidden
        .f_narrow(0, 0, pairs)
        .and_then(|x| x.f_narrow(1, 0, t - 1))
        .and_then(|x| x.f_reshape([pairs * (t - 1), h]))
        .ctx("chosen hidden")?;
    let ids = p.input_ids.f_narrow(0, 0, pairs).ctx("chosen ids")?;
    let next = ids
        .f_narrow(1, 1, t - 1)
        .and_then(|x| x.f_reshape([pairs * (t - 1)]))
        .ctx("next tokens")?;
    let real = if p.attention_mask.dim() == 2 {
        p.attention_mask
            .f_narrow(0, 0, pairs)
            .and_then(|m| m.f_narrow(1, 1, t - 1))
            .and_then(|m| m.f_reshape([pairs * (t - 1)]))
            .and_then(|m| m.f_ne(0))
            .ctx("real tokens")?
    } else {
        Tensor::f_ones([pairs * (t - 1)], (Kind::Bool, hidden.device())).ctx("ones")?
    };
    let pos = real.f_nonzero().ctx("nonzero")?.reshape([-1]);
    let sel = chosen.f_index_select(0, &pos).ctx("select")?;
    let tgt = next.f_index_select(0, &pos).ctx("select targets")?;
    let tok = token_logps(model, &sel, &tgt)?;
    tok.f_mean(Kind::Float).ctx("mean")?.f_neg().ctx("nll")
}

/// `log(1 - exp(x))` for `x < 0`, stable on both sides of `-ln 2` (TRL's `log1mexp`).
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let t = -std::f64::consts::LN_2;
    let near = x
        .f_expm1()
        .and_then(|e| e.f_neg())
        .and_then(|e| e.f_log())
        .ctx("log(-expm1)")?;
    let far = x
        .f_exp()
        .and_then(|e| e.f_neg())
        .and_then(|e| e.f_log1p())
        .ctx("log1p(-exp)")?;
    let lt = x.f_lt(t).ctx("branch")?;
    far.f_where_self(&lt, &near).ctx("where")
}

/// The summed loss over the pairs of `p` and the metric sums (six metrics, pair count).
fn pair_loss(
    cfg: &PreferenceConfig,
    model: &dyn CausalLm,
    hidden: &Tensor,
    p: &Prepared,
    ref_logps: &Tensor,
) -> Result<(Tensor, [f64; 7])> {
    let rows = hidden.size()[0];
    if rows % 2 != 0 || rows == 0 {
        return Err(Error::Shape {
            op: "preference batch".into(),
            msg: format!(
                "the batch has {rows} rows; it must be 2B rows (chosen rows, then rejected)"
            ),
        });
    }
    let n = rows / 2;
    let st = row_stats(model, hidden, p)?;
    let split = |x: &Tensor| -> Result<(Tensor, Tensor)> {
        Ok((
            x.f_narrow(0, 0, n).ctx("chosen")?,
            x.f_narrow(0, n, n).ctx("rejected")?,
        ))
    };
    let beta = cfg.beta;
    let (logp_c, logp_r) = split(&st.logps)?;
    let (len_c, len_r) = split(&st.counts)?;
    let (loss, reward_c, reward_r, show_c, show_r) = if cfg.loss_type == PreferenceLoss::Orpo {
        // Per-token mean log-probabilities (TRL's `average_log_prob=True`).
        let avg_c = logp_c
            .f_div(&len_c.f_clamp_min(1.0).ctx("len")?)
            .ctx("avg")?;
        let avg_r = logp_r
            .f_div(&len_r.f_clamp_min(1.0).ctx("len")?)
            .ctx("avg")?;
        let log_odds = avg_c
            .f_sub(&avg_r)
            .ctx("log odds")?
            .f_sub(
                &log1mexp(&avg_c)?
                    .f_sub(&log1mexp(&avg_r)?)
                    .ctx("log odds")?,
            )
            .ctx("log odds")?;
        let ratio = log_odds.f_log_sigmoid().ctx("logsigmoid")?;
        let nll = chosen_nll(model, hidden, p, n)?;
        // Summed over pairs: n * (nll - mean(β ratio)).
        let loss = nll
            .f_mul_scalar(n as f64)
            .ctx("nll")?
            .f_sub(
                &ratio
                    .f_sum(Kind::Float)
                    .ctx("sum")?
                    .f_mul_scalar(beta)
                    .ctx("beta")?,
            )
            .ctx("orpo loss")?;
        let rc = avg_c
            .f_detach()
            .ctx("detach")?
            .f_mul_scalar(beta)
            .ctx("reward")?;
        let rr = avg_r
            .f_detach()
            .ctx("detach")?
            .f_mul_scalar(beta)
            .ctx("reward")?;
        (
            loss,
            rc,
            rr,
            avg_c.f_detach().ctx("detach")?,
            avg_r.f_detach().ctx("detach")?,
        )
    } else {
        let (ref_c, ref_r) = split(ref_logps)?;
        let ratio_c = logp_c.f_sub(&ref_c).ctx("chosen log-ratio")?;
        let ratio_r = logp_r.f_sub(&ref_r).ctx("rejected log-ratio")?;
        let delta = ratio_c.f_sub(&ratio_r).ctx("delta")?;
        let bd = delta.f_mul_scalar(beta).ctx("beta delta")?;
        let per_pair = reference_loss(cfg, &bd, [&ratio_c, &ratio_r], [&len_c, &len_r])
            .ctx("preference loss")?;
        let loss = per_pair.f_sum(Kind::Float).ctx("sum")?;
        let rc = ratio_c
            .f_detach()
            .ctx("detach")?
            .f_mul_scalar(beta)
            .ctx("reward")?;
        let rr = ratio_r
            .f_detach()
            .ctx("detach")?
            .f_mul_scalar(beta)
            .ctx("reward")?;
        (
            loss,
            rc,
            rr,
            logp_c.f_detach().ctx("detach")?,
            logp_r.f_detach().ctx("detach")?,
        )
    };
    let sum = |x: &Tensor| -> Result<f64> {
        x.f_sum(Kind::Double)
            .ctx("sum")?
            .f_double_value(&[])
            .ctx("value")
    };
    let acc = reward_c.f_gt_tensor(&reward_r).ctx("accuracy")?;
    let margin = reward_c.f_sub(&reward_r).ctx("margin")?;
    let m = [
        sum(&reward_c)?,
        sum(&reward_r)?,
        sum(&acc)?,
        sum(&margin)?,
        sum(&show_c)?,
        sum(&show_r)?,
        n as f64,
    ];
    Ok((loss, m))
}

/// The per-pair loss of the reference-based loss types from `bd = β Δ`, the log-ratios and the
/// completion lengths.
fn reference_loss(
    cfg: &PreferenceConfig,
    bd: &Tensor,
    ratios: [&Tensor; 2],
    lens: [&Tensor; 2],
) -> std::result::Result<Tensor, tch::TchError> {
    match cfg.loss_type {
        PreferenceLoss::Sigmoid => bd.f_log_sigmoid()?.f_neg(),
        PreferenceLoss::Hinge => bd.f_neg()?.f_add_scalar(1.0)?.f_relu(),
        PreferenceLoss::Ipo => {
            // TRL divides each sequence's log-ratio by its completion length.
            let d = ratios[0]
                .f_div(&lens[0].f_clamp_min(1.0)?)?
                .f_sub(&ratios[1].f_div(&lens[1].f_clamp_min(1.0)?)?)?;
            d.f_sub_scalar(1.0 / (2.0 * cfg.beta))?.f_square()
        }
        PreferenceLoss::Robust => {
            let e = cfg.label_smoothing;
            let clean = bd.f_log_sigmoid()?.f_mul_scalar(-(1.0 - e))?;
            let flipped = bd.f_neg()?.f_log_sigmoid()?.f_mul_scalar(-e)?;
            clean.f_sub(&flipped)?.f_div_scalar(1.0 - 2.0 * e)
        }
        PreferenceLoss::Orpo => Err(tch::TchError::Kind(
            "orpo has no reference loss (handled separately)".into(),
        )),
    }
}

/// At the start of `fit`: fills the reference table from the training data (epoch 0) and the
/// eval data when `precompute_ref_log_probs` is on and nothing was precomputed yet.
pub(crate) fn precompute_if_asked(
    o: &mut PreferenceObjective,
    model: &dyn CausalLm,
    train: &mut dyn BatchSource,
    eval: Option<&mut Box<dyn BatchSource>>,
    device: Device,
) -> Result<()> {
    if !o.cfg.precompute_ref_log_probs || !o.table.is_empty() {
        return Ok(());
    }
    o.precompute(model, train, 0, device)?;
    if let Some(e) = eval {
        o.precompute(model, e.as_mut(), 0, device)?;
    }
    tracing::info!(
        rows = o.table.len(),
        "precomputed reference log-probabilities"
    );
    Ok(())
}

/// Evaluation sums: `[loss summed over pairs, label tokens]` and the metric sums (the pair
/// count last).
pub(crate) fn eval_sums(
    o: &mut PreferenceObjective,
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
    amp: Autocast,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let _ = o.take_sums();
    let mut sums = vec![0.0, 0.0];
    for i in 0..data.num_batches(0) {
        let b = data.batch(0, i)?;
        let p = step::prepare(&b, device)?;
        sums[0] += amp.run(|| o.eval_loss(model, &p))?;
        sums[1] += p.n_labels as f64;
    }
    Ok((sums, o.take_sums().to_vec()))
}
