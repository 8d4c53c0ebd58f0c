//! Muon: momentum orthogonalized by a Newton-Schulz iteration, for matrix parameters.
//!
//! The update of a matrix parameter `p` (`rows x cols`, parameters of more than two dimensions
//! flattened to `shape[0] x prod(shape[1..])`) with gradient `g`, as in Keller Jordan's `Muon`
//! (<https://github.com/KellerJordan/Muon>, `muon_update` and `zeropower_via_newtonschulz5`):
//!
//! ```text
//! buf <- lerp(buf, g, 1 - momentum)                     (buf = momentum*buf + (1-momentum)*g)
//! u   <- nesterov ? lerp(g, buf, momentum) : buf
//! X   <- u / (||u||_F + 1e-7), transposed when rows > cols (so X X^T is the small Gram matrix)
//! repeat ns_steps times:  A = X X^T;  B = b A + c A A;  X = a X + B X     ((a,b,c) = NS5 coeffs)
//! p   <- p * (1 - lr * weight_decay)
//! p   <- p - lr * scale * X
//! ```
//!
//! with `scale = max(1, rows/cols)^0.5` ([`MuonScale::Original`]) or
//! `0.2 * sqrt(max(rows, cols))` ([`MuonScale::MatchAdamw`], Moonlight: Liu et al. 2025, "Muon is
//! Scalable for LLM Training", which gives the update the RMS of AdamW's so AdamW learning rates
//! carry over).
//!
//! Matrices of the same shape, kind and device are one *batch*: their momentum buffers are one
//! stacked `[n, rows, cols]` tensor. How the orthogonalization runs is chosen by [`NsMethod`]:
//!
//! - [`NsMethod::Iterative`]: the iteration above on the whole stack, with one batched matmul
//!   (`bmm`/`baddbmm`) per product instead of a loop over matrices. This is what runs on CUDA.
//! - [`NsMethod::Spectral`]: the same map evaluated through the Gram matrix's eigendecomposition.
//!   Every iterate is `X_k = Q_k X_0` with `Q_k` a polynomial in `G = X_0 X_0^T` (each step
//!   multiplies by `a I + b A + c A^2`, `A = X_k X_k^T`, and all these matrices are polynomials in
//!   `G`, so they commute). With `G = V diag(l) V^T`, `Q_steps = V diag(q(l)) V^T`, where the
//!   scalar recursion `q <- q z, r <- r z^2, z = a + b r + c r^2` (from `q = 1, r = l`) is the
//!   iteration acting on one squared singular value. Cost for an `m x n` matrix (`m <= n`): two
//!   `m x m x n` products, one `m x m` eigendecomposition and one `m x m x m` product, instead of
//!   `steps * (2 m^2 n + m^3 + m^2 n)` multiply-adds. It wins for wide matrices (`n >= 2m`) on a
//!   CPU, where a batched matmul buys nothing (the per-matrix GEMMs already run at the core's
//!   peak) and LAPACK's `syevd` is fast. Numerically it matches the fp32 iteration to about 1e-5
//!   relative on well-conditioned inputs; on ill-conditioned ones (singular values spread over six
//!   decades) it differs from an fp64 iteration by up to ~1e-3 relative (forming `G` in fp32
//!   squares the condition number), against ~1e-5 for the fp32 iteration and ~1e-2 for the bf16
//!   iteration that GPU Muon runs use. `tests/optim_parity.rs` measures all three.
//! - [`NsMethod::Auto`] (default): spectral for fp32 matrices on the CPU with `min(rows, cols) >=
//!   256` and `max >= 2 min`; iterative otherwise. On the CPU every matrix is processed on its
//!   own, in place in its momentum slot, so its working set stays in cache
//!   ([`MuonConfig::batched`] chooses).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{
    NamedParam, Optimizer, ParamGroup, StateDict, check_groups, check_no_extra, deep_copy,
    load_tensor,
};
use crate::error::{Error, Result, TchResultExt};

/// How the orthogonalized update is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuonScale {
    /// `max(1, rows/cols)^0.5`, Keller Jordan's original Muon.
    Original,
    /// `0.2 * sqrt(max(rows, cols))`, Moonlight: matches AdamW's update RMS so AdamW learning
    /// rates carry over.
    MatchAdamw,
}

impl MuonScale {
    /// The factor for a `rows x cols` matrix.
    pub fn factor(self, rows: i64, cols: i64) -> f64 {
        match self {
            MuonScale::Original => (rows as f64 / cols as f64).max(1.0).sqrt(),
            MuonScale::MatchAdamw => 0.2 * (rows.max(cols) as f64).sqrt(),
        }
    }
}

/// Precision of the Newton-Schulz iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsPrecision {
    /// bf16 on CUDA (as Keller Jordan's Muon), fp32 elsewhere (bf16 matmul is slow on CPUs
    /// without bf16 instructions).
    Auto,
    /// fp32 everywhere (exact, slower on CUDA).
    Fp32,
    /// bf16 everywhere (fast on CUDA; very slow on CPUs without bf16 instructions).
    Bf16,
}

impl NsPrecision {
    /// The kind the iteration runs in on `device`.
    pub fn kind(self, device: Device) -> Kind {
        match self {
            NsPrecision::Auto if device.is_cuda() => Kind::BFloat16,
            NsPrecision::Auto | NsPrecision::Fp32 => Kind::Float,
            NsPrecision::Bf16 => Kind::BFloat16,
        }
    }
}

/// How the Newton-Schulz map is computed; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsMethod {
    /// [`NsMethod::Spectral`] for wide fp32 matrices on the CPU, [`NsMethod::Iterative`]
    /// otherwise.
    Auto,
    /// The quintic iteration, batched over same-shape matrices (one `bmm` per product).
    Iterative,
    /// The same map through the eigendecomposition of the Gram matrix (fp32/fp64 only).
    Spectral,
}

impl NsMethod {
    /// Whether an `rows x cols` matrix of `kind` on `device` is orthogonalized spectrally.
    pub fn spectral_for(self, rows: i64, cols: i64, kind: Kind, device: Device) -> bool {
        let float = matches!(kind, Kind::Float | Kind::Double);
        match self {
            NsMethod::Iterative => false,
            NsMethod::Spectral => float,
            NsMethod::Auto => {
                let (m, n) = (rows.min(cols), rows.max(cols));
                float && device == Device::Cpu && m >= 256 && n >= 2 * m
            }
        }
    }
}

/// Hyper-parameters of [`Muon`]. The learning rate and weight decay live in each
/// [`ParamGroup`]; `weight_decay` here is the default that group builders use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MuonConfig {
    /// Momentum coefficient. Default `0.95` (Keller Jordan's Muon).
    pub momentum: f64,
    /// Nesterov momentum. Default `true` (Keller Jordan's Muon).
    pub nesterov: bool,
    /// Newton-Schulz iterations. Default `5` (Keller Jordan's Muon).
    pub ns_steps: usize,
    /// Quintic Newton-Schulz coefficients `(a, b, c)`. Default `(3.4445, -4.7750, 2.0315)`
    /// (Keller Jordan's Muon).
    pub ns_coefficients: (f64, f64, f64),
    /// Added to the Frobenius norm before normalising. Default `1e-7` (Keller Jordan's Muon).
    pub ns_eps: f64,
    /// Precision of the iteration. Default [`NsPrecision::Auto`] (bf16 on CUDA, fp32 on CPU).
    pub ns_precision: NsPrecision,
    /// How the map is computed. Default [`NsMethod::Auto`] (spectral for wide fp32 matrices on
    /// the CPU, the batched iteration otherwise).
    pub ns_method: NsMethod,
    /// Run the iteration on the stacked same-shape matrices (`true`) or one matrix at a time in
    /// place (`false`). Default `None`: stacked on CUDA, where one batched matmul per product is
    /// the fast way; one at a time on the CPU, where the stacked iteration measured 0.8x of a
    /// per-matrix loop (the stacks fall out of cache; `muon_step_batched` in the optimizer
    /// benchmark).
    pub batched: Option<bool>,
    /// Update scale. Default [`MuonScale::MatchAdamw`] (Moonlight), because the reference
    /// grouping gives Muon and AdamW the same base learning rate.
    pub scale: MuonScale,
    /// Decoupled weight decay used for groups that do not set their own. Default `0.1`
    /// (Moonlight's setting; Keller Jordan's Muon defaults to 0).
    pub weight_decay: f64,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            ns_coefficients: (3.4445, -4.7750, 2.0315),
            ns_eps: 1e-7,
            ns_precision: NsPrecision::Auto,
            ns_method: NsMethod::Auto,
            batched: None,
            scale: MuonScale::MatchAdamw,
            weight_decay: 0.1,
        }
    }
}

impl MuonConfig {
    /// Checks ranges: `0 <= momentum < 1`, `ns_eps > 0`, `weight_decay >= 0`.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "muon.momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if !(self.ns_eps.is_finite() && self.ns_eps > 0.0) {
            return Err(Error::config(
                "muon.ns_eps",
                format!("must be > 0, got {}", self.ns_eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "muon.weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            ));
        }
        let (a, b, c) = self.ns_coefficients;
        if !(a.is_finite() && b.is_finite() && c.is_finite()) {
            return Err(Error::config("muon.ns_coefficients", "must be finite"));
        }
        Ok(())
    }
}

/// Same-shape matrices stepped together.
#[derive(Debug)]
struct Batch {
    rows: i64,
    cols: i64,
    kind: Kind,
    device: Device,
    /// `(group, param)` of each matrix, in stacking order.
    slots: Vec<(usize, usize)>,
    /// Stacked momentum buffers `[slots.len(), rows, cols]`.
    momentum: Tensor,
}

/// Muon over parameter groups of matrices. See the module documentation.
#[derive(Debug)]
pub struct Muon {
    groups: Vec<ParamGroup>,
    config: MuonConfig,
    batches: Vec<Batch>,
}

/// `rows x cols` of a parameter as Muon sees it, or the error that says to use AdamW.
pub fn matrix_shape(name: &str, shape: &[i64]) -> Result<(i64, i64)> {
    if shape.len() < 2 {
        return Err(Error::Shape {
            op: "muon".into(),
            msg: format!(
                "parameter `{name}` has shape {shape:?}; Muon only handles matrices (2-D or \
                 more, flattened to 2-D). Give 1-D parameters (norms, biases) to AdamW, as the \
                 reference grouping does"
            ),
        });
    }
    Ok((shape[0], shape[1..].iter().product()))
}

/// Orthogonalizes each matrix of `g` (`[n, rows, cols]`) with `steps` quintic Newton-Schulz
/// iterations in `kind`. Returns a tensor of `g`'s kind and shape.
pub fn newton_schulz(
    g: &Tensor,
    steps: usize,
    coefficients: (f64, f64, f64),
    eps: f64,
    kind: Kind,
) -> Result<Tensor> {
    let (a, b, c) = coefficients;
    let size = g.size();
    if size.len() != 3 {
        return Err(Error::Shape {
            op: "muon: newton_schulz".into(),
            msg: format!("expects a [n, rows, cols] stack, got shape {size:?}"),
        });
    }
    let ctx = "muon: Newton-Schulz iteration";
    let transpose = size[1] > size[2];
    let mut x = g.f_to_kind(kind).ctx(ctx)?;
    if transpose {
        x = x.f_mt().ctx(ctx)?;
    }
    let norm = x
        .f_norm_scalaropt_dim(2, [-2i64, -1].as_slice(), true)
        .and_then(|n| n.f_add_scalar(eps))
        .ctx(ctx)?;
    x = x.f_div(&norm).ctx(ctx)?;
    for _ in 0..steps {
        let xt = x.f_mt().ctx(ctx)?;
        let gram = x.f_bmm(&xt).ctx(ctx)?;
        let poly = gram.f_baddbmm(&gram, &gram, b, c).ctx(ctx)?;
        x = x.f_baddbmm(&poly, &x, a, 1.0).ctx(ctx)?;
    }
    if transpose {
        x = x.f_mt().ctx(ctx)?;
    }
    x.f_to_kind(g.kind()).ctx(ctx)
}

/// [`newton_schulz`] of one matrix `g` (`rows x cols`, fp32 or fp64) evaluated through the
/// eigendecomposition of its Gram matrix (see the module documentation), scaled by `factor`:
/// returns `factor * NS(g)`, shaped like `g`.
pub fn newton_schulz_spectral(
    g: &Tensor,
    steps: usize,
    coefficients: (f64, f64, f64),
    eps: f64,
    factor: f64,
) -> Result<Tensor> {
    let size = g.size();
    if size.len() != 2 || !matches!(g.kind(), Kind::Float | Kind::Double) {
        return Err(Error::Shape {
            op: "muon: spectral Newton-Schulz".into(),
            msg: format!(
                "expects one fp32/fp64 matrix, got {:?} of shape {size:?}",
                g.kind()
            ),
        });
    }
    let ctx = "muon: spectral Newton-Schulz";
    let (a, b, c) = coefficients;
    let x = if size[0] > size[1] {
        g.f_mt().ctx(ctx)?
    } else {
        g.shallow_clone()
    };
    // X0 = g / (||g|| + eps); G = X0 X0^T; the result is q(G) X0. Every tensor stays on g's
    // device (the norm too: no host round trip), so this one code path serves CPU and CUDA.
    let norm = g
        .f_norm()
        .and_then(|n| n.f_to_kind(Kind::Double))
        .and_then(|n| n.f_add_scalar(eps))
        .ctx(ctx)?;
    let inv_norm = norm.f_reciprocal().ctx(ctx)?;
    let gram = x
        .f_mm(&x.f_mt().ctx(ctx)?)
        .and_then(|t| t.f_mul(&inv_norm.f_square()?.f_to_kind(g.kind())?))
        .ctx(ctx)?;
    let (lambda, v) = gram.f_linalg_eigh("L").ctx(ctx)?;
    // The iteration on each squared singular value (lambda >= 0 in exact arithmetic), in fp64
    // on the device: q(l) = prod_k z_k with z = a + b r + c r^2, r <- r z^2.
    let mut r = lambda
        .f_to_kind(Kind::Double)
        .and_then(|l| l.f_clamp_min(0.0))
        .ctx(ctx)?;
    let mut q = r.f_ones_like().ctx(ctx)?;
    for _ in 0..steps {
        let z = r
            .f_mul_scalar(c)
            .and_then(|t| t.f_add_scalar(b))
            .and_then(|t| t.f_mul(&r))
            .and_then(|t| t.f_add_scalar(a))
            .ctx(ctx)?;
        q = q.f_mul(&z).ctx(ctx)?;
        r = r.f_mul(&z.f_square().ctx(ctx)?).ctx(ctx)?;
    }
    let q = q
        .f_mul(&inv_norm)
        .and_then(|t| t.f_mul_scalar(factor))
        .and_then(|t| t.f_to_kind(g.kind()))
        .ctx(ctx)?;
    let poly = v
        .f_mul(&q.f_unsqueeze(0).ctx(ctx)?)
        .and_then(|vq| vq.f_mm(&v.f_mt()?))
        .ctx(ctx)?;
    let out = poly.f_mm(&x).ctx(ctx)?;
    if size[0] > size[1] {
        out.f_mt().ctx(ctx)
    } else {
        Ok(out)
    }
}

/// `p`'s gradient as a `rows x cols` matrix, or `None` when it has none this step.
fn matrix_grad(p: &NamedParam, rows: i64, cols: i64) -> Result<Option<Tensor>> {
    let ctx = || format!("muon: grad of `{}`", p.name);
    let g = p.tensor.f_grad().ctx(ctx())?;
    if !g.defined() {
        return Ok(None);
    }
    if g.size() != p.tensor.size() {
        return Err(Error::Shape {
            op: "muon".into(),
            msg: format!(
                "grad of `{}` has shape {:?}, the parameter {:?}",
                p.name,
                g.size(),
                p.tensor.size()
            ),
        });
    }
    g.f_reshape([rows, cols]).ctx(ctx()).map(Some)
}

/// `p <- p * (1 - lr * weight_decay) + upd` (`upd` already scaled by `-lr * scale`).
fn apply_update(p: &NamedParam, group: &ParamGroup, upd: &Tensor) -> Result<()> {
    let ctx = || format!("muon: update of `{}`", p.name);
    let mut t = p.tensor.shallow_clone();
    let decay = 1.0 - group.lr * group.weight_decay;
    if decay != 1.0 {
        let _ = t.f_mul_scalar_(decay).ctx(ctx())?;
    }
    let _ = t.f_add_(&upd.f_reshape(t.size()).ctx(ctx())?).ctx(ctx())?;
    Ok(())
}

impl Muon {
    /// The configuration this optimizer was built with.
    pub fn config(&self) -> &MuonConfig {
        &self.config
    }

    /// Number of same-shape batches (matrices sharing shape, kind and device).
    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    /// One matrix at a time (the CPU path): momentum updated in place in its slot, the update
    /// computed while the matrix is in cache, no stacking copies.
    fn step_batch_per_matrix(&mut self, bi: usize, spectral: bool) -> Result<()> {
        let cfg = &self.config;
        let batch = &self.batches[bi];
        let (rows, cols) = (batch.rows, batch.cols);
        let scale = cfg.scale.factor(rows, cols);
        for (j, &(gi, pi)) in batch.slots.iter().enumerate() {
            let group = &self.groups[gi];
            let p = &group.params[pi];
            let Some(g) = matrix_grad(p, rows, cols)? else {
                continue;
            };
            let pctx = || format!("muon: update of `{}`", p.name);
            let mut buf = batch.momentum.f_get(j as i64).ctx(pctx())?;
            let _ = buf.f_lerp_(&g, 1.0 - cfg.momentum).ctx(pctx())?;
            let u = if cfg.nesterov {
                g.f_lerp(&buf, cfg.momentum).ctx(pctx())?
            } else {
                buf
            };
            let factor = -group.lr * scale;
            let upd = if spectral {
                newton_schulz_spectral(&u, cfg.ns_steps, cfg.ns_coefficients, cfg.ns_eps, factor)?
            } else {
                let x = newton_schulz(
                    &u.f_unsqueeze(0).ctx(pctx())?,
                    cfg.ns_steps,
                    cfg.ns_coefficients,
                    cfg.ns_eps,
                    cfg.ns_precision.kind(batch.device),
                )?;
                x.f_squeeze_dim(0)
                    .and_then(|mut x| x.f_mul_scalar_(factor))
                    .ctx(pctx())?
            };
            apply_update(p, group, &upd)?;
        }
        Ok(())
    }

    fn step_batch(&mut self, bi: usize) -> Result<()> {
        let (cfg, b) = (&self.config, &self.batches[bi]);
        // spectral only where the iteration would run in the parameters' own kind (a bf16
        // `ns_precision` on fp32 parameters asks for the bf16 iteration)
        let spectral = cfg.ns_method.spectral_for(b.rows, b.cols, b.kind, b.device)
            && cfg.ns_precision.kind(b.device) == b.kind;
        if spectral || !cfg.batched.unwrap_or(b.device.is_cuda()) {
            return self.step_batch_per_matrix(bi, spectral);
        }
        let cfg = &self.config;
        let batch = &mut self.batches[bi];
        let (rows, cols) = (batch.rows, batch.cols);
        let mut present = Vec::with_capacity(batch.slots.len());
        let mut grads = Vec::with_capacity(batch.slots.len());
        for (j, &(gi, pi)) in batch.slots.iter().enumerate() {
            if let Some(g) = matrix_grad(&self.groups[gi].params[pi], rows, cols)? {
                grads.push(g);
                present.push(j);
            }
        }
        if present.is_empty() {
            return Ok(());
        }
        let ctx = || format!("muon: step of the {rows}x{cols} batch");
        let mut g = Tensor::f_stack(&grads, 0).ctx(ctx())?;
        drop(grads);
        let all = present.len() == batch.slots.len();
        let index = if all {
            None
        } else {
            let idx: Vec<i64> = present.iter().map(|&j| j as i64).collect();
            Some(
                Tensor::f_from_slice(&idx)
                    .and_then(|t| t.f_to(batch.device))
                    .ctx(ctx())?,
            )
        };
        let mut buf = match &index {
            None => batch.momentum.shallow_clone(),
            Some(idx) => batch.momentum.f_index_select(0, idx).ctx(ctx())?,
        };
        let _ = buf.f_lerp_(&g, 1.0 - cfg.momentum).ctx(ctx())?;
        if let Some(idx) = &index {
            let _ = batch.momentum.f_index_copy_(0, idx, &buf).ctx(ctx())?;
        }
        let u = if cfg.nesterov {
            let _ = g.f_lerp_(&buf, cfg.momentum).ctx(ctx())?;
            g
        } else {
            buf
        };
        let mut x = newton_schulz(
            &u,
            cfg.ns_steps,
            cfg.ns_coefficients,
            cfg.ns_eps,
            cfg.ns_precision.kind(batch.device),
        )?;
        drop(u);
        let scale = cfg.scale.factor(rows, cols);
        let factors: Vec<f64> = present
            .iter()
            .map(|&j| -self.groups[batch.slots[j].0].lr * scale)
            .collect();
        if factors.iter().all(|&f| f == factors[0]) {
            let _ = x.f_mul_scalar_(factors[0]).ctx(ctx())?;
        } else {
            let f = Tensor::f_from_slice(&factors)
                .and_then(|t| t.f_to_kind(batch.kind))
                .and_then(|t| t.f_to(batch.device))
                .and_then(|t| t.f_view([-1, 1, 1]))
                .ctx(ctx())?;
            let _ = x.f_mul_(&f).ctx(ctx())?;
        }
        for (k, &j) in present.iter().enumerate() {
            let (gi, pi) = batch.slots[j];
            let group = &self.groups[gi];
            let upd = x.f_get(k as i64).ctx(ctx())?;
            apply_update(&group.params[pi], group, &upd)?;
        }
        Ok(())
    }
}

impl Optimizer for Muon {
    type Config = MuonConfig;

    fn new(groups: Vec<ParamGroup>, config: MuonConfig) -> Result<Self> {
        config.validate()?;
        check_groups("muon", &groups)?;
        let mut batches: Vec<Batch> = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            for (pi, p) in g.params.iter().enumerate() {
                let (rows, cols) = matrix_shape(&p.name, &p.tensor.size())?;
                let (kind, device) = (p.tensor.kind(), p.tensor.device());
                match batches.iter_mut().find(|b| {
                    b.rows == rows && b.cols == cols && b.kind == kind && b.device == device
                }) {
                    Some(b) => b.slots.push((gi, pi)),
                    None => batches.push(Batch {
                        rows,
                        cols,
                        kind,
                        device,
                        slots: vec![(gi, pi)],
                        momentum: Tensor::new(),
                    }),
                }
            }
        }
        for b in &mut batches {
            b.momentum =
                Tensor::f_zeros([b.slots.len() as i64, b.rows, b.cols], (b.kind, b.device)).ctx(
                    format!(
                        "muon: allocating momentum for {} matrices of {}x{}",
                        b.slots.len(),
                        b.rows,
                        b.cols
                    ),
                )?;
        }
        Ok(Muon {
            groups,
            config,
            batches,
        })
    }

    fn name(&self) -> &str {
        "muon"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for bi in 0..self.batches.len() {
            self.step_batch(bi)?;
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut tensors = BTreeMap::new();
        for b in &self.batches {
            for (j, &(gi, pi)) in b.slots.iter().enumerate() {
                let p = &self.groups[gi].params[pi];
                let key = format!("{}.momentum_buffer", p.name);
                let view = b
                    .momentum
                    .f_get(j as i64)
                    .and_then(|t| t.f_view(p.tensor.size().as_slice()))
                    .ctx(format!("muon state: `{key}`"))?;
                tensors.insert(key, deep_copy(&view)?);
            }
        }
        Ok(StateDict {
            tensors,
            scalars: BTreeMap::new(),
        })
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut expected = HashSet::new();
        for b in &self.batches {
            for (j, &(gi, pi)) in b.slots.iter().enumerate() {
                let p = &self.groups[gi].params[pi];
                let key = format!("{}.momentum_buffer", p.name);
                let mut view = b
                    .momentum
                    .f_get(j as i64)
                    .and_then(|t| t.f_view(p.tensor.size().as_slice()))
                    .ctx(format!("muon state: `{key}`"))?;
                load_tensor("muon", state, &key, &mut view)?;
                expected.insert(key);
            }
        }
        check_no_extra("muon", state, &expected)
    }
}
