//! The selective scan and causal convolution of Mamba mixers (Mamba, Falcon-Mamba, Jamba).
//!
//! [`selective_scan`] computes what transformers 5.23's `mamba_selective_scan` computes on its
//! PyTorch path (`models/mamba/modeling_mamba.py`, the loop the `MambaMixer` runs without the
//! CUDA kernels), with `delta_softplus` and a `z` gate:
//!
//! ```text
//! delta_t = softplus(dt_t + dt_bias)
//! h_t     = exp(delta_t A) * h_{t-1} + (delta_t B_t) u_t      (h_{-1} = 0, per channel, N states)
//! y_t     = (C_t . h_t + D u_t) * silu(z_t)
//! ```
//!
//! Two implementations, both tested against transformers (`tests/model_ssm.rs`):
//!
//! - [`selective_scan_fused`]: one libtorch autograd function in the C++ shim (`csrc/ssm.cpp`,
//!   loops in `csrc/ssm_kernels.c`) for fp32 on the CPU. Forward keeps no `[batch, d, T, N]`
//!   tensor; backward re-runs each channel's recurrence into a `T x N` buffer and walks it back.
//! - [`selective_scan_chunked`]: libtorch ops only, so any device (CUDA uses it) and kind (the
//!   scan itself runs in fp32, as transformers' does). The sequence is cut into chunks of
//!   [`DEFAULT_CHUNK`] steps; inside a chunk every state is `sum_k exp(s_t - s_k) b_k` with `s`
//!   the running sum of `delta A` (exponents are never positive, so nothing overflows), and the
//!   last state carries to the next chunk. Autograd differentiates it.
//!
//! [`selective_scan`] picks the fused kernel where [`crate::fused::applies`], the chunked path
//! elsewhere.

use tch::{Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};
use crate::ffi::kernels::vt_fused_selective_scan;
use crate::ffi::ptr;
use crate::fused::new_tensor;

/// Steps per chunk of [`selective_scan_chunked`]: its intermediate is `[batch, d, chunk,
/// chunk, N]` per chunk.
pub const DEFAULT_CHUNK: i64 = 16;

/// The inputs of one scan. Shapes: `u`, `dt` (before bias and softplus), `z` `[batch, d, T]`;
/// `a` (already `-exp(A_log)`) `[d, N]`; `b`, `c` `[batch, T, N]`; `d`, `dt_bias` `[d]`.
pub struct ScanInput<'a> {
    /// The input `[batch, d, T]`.
    pub u: &'a Tensor,
    /// The step sizes before bias and softplus `[batch, d, T]`.
    pub dt: &'a Tensor,
    /// The state matrix `-exp(A_log)` `[d, N]`.
    pub a: &'a Tensor,
    /// The input projection `[batch, T, N]`.
    pub b: &'a Tensor,
    /// The output projection `[batch, T, N]`.
    pub c: &'a Tensor,
    /// The skip weight `[d]`.
    pub d: &'a Tensor,
    /// The gate `[batch, d, T]` (the output is multiplied by `silu(z)`).
    pub z: &'a Tensor,
    /// The bias added to `dt` before softplus `[d]`.
    pub dt_bias: &'a Tensor,
}

impl ScanInput<'_> {
    fn all(&self) -> [&Tensor; 8] {
        [
            self.u,
            self.dt,
            self.a,
            self.b,
            self.c,
            self.d,
            self.z,
            self.dt_bias,
        ]
    }
}

/// `y` `[batch, d, T]` in `u`'s kind: the fused kernel for fp32 CPU tensors, the chunked
/// libtorch path otherwise.
pub fn selective_scan(x: &ScanInput<'_>) -> Result<Tensor> {
    if x.all().iter().all(|t| crate::fused::applies(t)) {
        selective_scan_fused(x)
    } else {
        selective_scan_chunked(x, DEFAULT_CHUNK)
    }
}

/// The shim's fused CPU scan (fp32 CPU tensors only; an error otherwise or when the fused
/// kernels are off).
pub fn selective_scan_fused(x: &ScanInput<'_>) -> Result<Tensor> {
    // SAFETY: the tensors are live for the call; the shim returns a new tensor.
    new_tensor("fused selective scan", |out, err| unsafe {
        vt_fused_selective_scan(
            ptr(x.u),
            ptr(x.dt),
            ptr(x.a),
            ptr(x.b),
            ptr(x.c),
            ptr(x.d),
            ptr(x.z),
            ptr(x.dt_bias),
            out,
            err,
        )
    })
}

/// The device-generic scan from libtorch ops, `chunk` steps at a time (see the module docs).
pub fn selective_scan_chunked(x: &ScanInput<'_>, chunk: i64) -> Result<Tensor> {
    let (nb, nd, t) = match x.u.size().as_slice() {
        [b, d, t] => (*b, *d, *t),
        s => {
            return Err(Error::Shape {
                op: "selective scan".into(),
                msg: format!("u must be [batch, d, seq], got {s:?}"),
            });
        }
    };
    let n = x.a.size().get(1).copied().unwrap_or(0);
    if x.a.size() != [nd, n] || x.b.size() != [nb, t, n] || x.c.size() != [nb, t, n] {
        return Err(Error::Shape {
            op: "selective scan".into(),
            msg: format!(
                "A {:?}, B {:?}, C {:?} do not fit u {:?}",
                x.a.size(),
                x.b.size(),
                x.c.size(),
                x.u.size()
            ),
        });
    }
    if chunk < 1 {
        return Err(Error::invalid("selective scan: chunk must be at least 1"));
    }
    let kind = x.u.kind();
    let f = |t: &Tensor| t.f_to_kind(Kind::Float).ctx("selective scan to fp32");
    let u = f(x.u)?;
    let delta = f(x.dt)?
        .f_add(&f(x.dt_bias)?.f_unsqueeze(-1).ctx("dt bias")?)
        .ctx("dt + bias")?
        .f_softplus()
        .ctx("softplus(dt)")?;
    let a = f(x.a)?;
    // [b, d, T, N]: log of the discretized A, and delta B u
    let log_a = delta
        .f_unsqueeze(-1)
        .ctx("delta")?
        .f_mul(&a.f_view([1, nd, 1, n]).ctx("A view")?)
        .ctx("delta A")?;
    let bu = delta
        .f_unsqueeze(-1)
        .ctx("delta")?
        .f_mul(&f(x.b)?.f_unsqueeze(1).ctx("B view")?)
        .ctx("delta B")?
        .f_mul(&u.f_unsqueeze(-1).ctx("u view")?)
        .ctx("delta B u")?;
    let c = f(x.c)?.f_unsqueeze(1).ctx("C view")?; // [b, 1, T, N]
    let dev = x.u.device();
    let mut h = Tensor::f_zeros([nb, nd, n], (Kind::Float, dev)).ctx("scan state")?;
    let mut ys = Vec::new();
    let mut start = 0;
    while start < t {
        let l = chunk.min(t - start);
        let s = log_a
            .f_narrow(2, start, l)
            .ctx("chunk")?
            .f_cumsum(2, Kind::Float)
            .ctx("chunk cumsum")?; // [b, d, l, N]
        // w[t, k] = exp(s_t - s_k) for k <= t, 0 above the diagonal
        let diff = s
            .f_unsqueeze(3)
            .ctx("s_t")?
            .f_sub(&s.f_unsqueeze(2).ctx("s_k")?)
            .ctx("s_t - s_k")?; // [b, d, l(t), l(k), N]
        let upper = Tensor::f_ones([l, l], (Kind::Bool, dev))
            .ctx("chunk mask")?
            .f_triu(1)
            .ctx("chunk mask")?
            .f_view([1, 1, l, l, 1])
            .ctx("chunk mask")?;
        let w = diff
            .f_masked_fill(&upper, f64::NEG_INFINITY)
            .ctx("chunk mask")?
            .f_exp()
            .ctx("chunk exp")?;
        let bu_c = bu
            .f_narrow(2, start, l)
            .ctx("chunk")?
            .f_unsqueeze(2)
            .ctx("b_k")?;
        let hs = w
            .f_mul(&bu_c)
            .ctx("w b")?
            .f_sum_dim_intlist(3, false, Kind::Float)
            .ctx("sum_k")?
            .f_add(
                &s.f_exp()
                    .ctx("carry decay")?
                    .f_mul(&h.f_unsqueeze(2).ctx("carry")?)
                    .ctx("carry")?,
            )
            .ctx("chunk states")?; // [b, d, l, N]
        let y = hs
            .f_mul(&c.f_narrow(2, start, l).ctx("C chunk")?)
            .ctx("C h")?
            .f_sum_dim_intlist(-1, false, Kind::Float)
            .ctx("C h sum")?;
        ys.push(y);
        h = hs.f_select(2, l - 1).ctx("last state")?;
        start += l;
    }
    let y = Tensor::f_cat(&ys, 2).ctx("scan cat")?;
    let z = f(x.z)?;
    y.f_add(
        &u.f_mul(&f(x.d)?.f_view([1, nd, 1]).ctx("D view")?)
            .ctx("D u")?,
    )
    .ctx("y + D u")?
    .f_mul(&z.f_silu().ctx("silu(z)")?)
    .ctx("gate")?
    .f_to_kind(kind)
    .ctx("scan cast back")
}

/// transformers' `causal_conv1d_fn` followed by silu: a depthwise convolution of `x`
/// `[batch, d, T]` with `weight` `[d, 1, k]` (the checkpoint's `conv1d.weight`), zero padding
/// `k - 1` on the left (the output is cut to the first `T` steps), plus `bias`.
pub fn causal_conv1d_silu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (d, k) = match weight.size().as_slice() {
        [d, 1, k] => (*d, *k),
        s => {
            return Err(Error::Shape {
                op: "causal conv1d".into(),
                msg: format!("the weight must be [channels, 1, kernel], got {s:?}"),
            });
        }
    };
    let t = x.size().last().copied().unwrap_or(0);
    Tensor::f_conv1d(x, weight, bias, [1], [k - 1], [1], d)
        .ctx("causal conv1d")?
        .f_narrow(-1, 0, t)
        .ctx("causal conv1d cut")?
        .f_silu()
        .ctx("conv silu")
}
