//! Gradient averaging over ranks in flat per-dtype buckets, and the start-of-training parameter
//! broadcast.
//!
//! c10d's multi-tensor all-reduce takes one same-shaped tensor per device, so gradients of
//! different shapes are packed into flat buckets (one dtype and device per bucket, at most
//! `bucket_mb` each, parameters in order), summed with one collective per bucket, divided by the
//! world size (Gloo has no AVG) and copied back.
//!
//! [`GradSync::overlapped`] does the same work during `backward()`, as DDP's Reducer does: a post
//! hook on each parameter's gradient accumulator (registered by the C++ shim; tch has no hook
//! API) launches a bucket's all-reduce as soon as all its gradients exist, in a fixed bucket
//! order on every rank (parameters in reverse, the order in which backward produces them), and
//! [`GradSync::sync`] then only waits, divides and copies back.

use tch::{Device, Kind, Tensor};

use super::ProcessGroup;
use crate::error::{Error, Result, TchResultExt};
use crate::ffi::dist as ffi;

struct Bucket {
    /// Indices into `GradSync::params`.
    members: Vec<usize>,
    kind: Kind,
    device: Device,
}

/// Averages the gradients of a fixed parameter list over all ranks.
///
/// Build it once after the model is made (every rank with the same parameter list in the same
/// order), call [`GradSync::sync`] after `backward()` and before the optimizer step.
pub struct GradSync {
    params: Vec<Tensor>,
    names: Vec<String>,
    buckets: Vec<Bucket>,
    overlap: Option<Overlap>,
}

/// The shim's hook-driven reducer; freed (hooks removed) on drop.
struct Overlap {
    raw: std::ptr::NonNull<ffi::VtOverlap>,
}

// SAFETY: the shim's reducer guards its state with a mutex; hooks may run on autograd threads.
unsafe impl Send for Overlap {}

impl Drop for Overlap {
    fn drop(&mut self) {
        // SAFETY: created by `vt_dist_overlap_new`, freed exactly once.
        unsafe { ffi::vt_dist_overlap_free(self.raw.as_ptr()) };
    }
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("params", &self.params.len())
            .field("buckets", &self.bucket_sizes())
            .field("overlapped", &self.overlap.is_some())
            .finish()
    }
}

impl GradSync {
    /// Buckets the trainable parameters (`requires_grad`) of `params`, `(name, tensor)` pairs,
    /// into flat buckets of at most `bucket_mb` MB per dtype and device (a larger tensor gets a
    /// bucket of its own). Frozen parameters are skipped.
    pub fn new(params: &[(String, Tensor)], bucket_mb: f64) -> Result<Self> {
        Self::bucketed(params.iter(), bucket_mb)
    }

    /// Like [`GradSync::new`], but the all-reduces run during `backward()`: buckets are filled
    /// in reverse parameter order and each is launched as soon as backward has produced all
    /// its gradients. [`GradSync::sync`] must then follow every `backward()` (before any other
    /// collective on `pg`); with gradient accumulation, turn the hooks off with
    /// [`GradSync::set_overlap`]`(false)` for all micro-batches but the last (DDP's
    /// `no_sync`). Hooks stay on the parameters until the `GradSync` is dropped. With one rank
    /// no hook is registered.
    pub fn overlapped(
        pg: &ProcessGroup,
        params: &[(String, Tensor)],
        bucket_mb: f64,
    ) -> Result<Self> {
        let mut gs = Self::bucketed(params.iter().rev(), bucket_mb)?;
        super::check_collective_devices(
            pg.backend(),
            "gradient bucket",
            gs.names
                .iter()
                .map(String::as_str)
                .zip(gs.params.iter().map(Tensor::device)),
        )?;
        if pg.world_size() == 1 || gs.params.is_empty() {
            return Ok(gs);
        }
        for (p, name) in gs.params.iter().zip(&gs.names) {
            if !p.is_leaf() {
                return Err(Error::invalid(format!(
                    "GradSync::overlapped: parameter `{name}` is not a leaf tensor"
                )));
            }
        }
        let mut bucket_of = vec![0 as std::ffi::c_int; gs.params.len()];
        for (b, bucket) in gs.buckets.iter().enumerate() {
            for &i in &bucket.members {
                bucket_of[i] = b as std::ffi::c_int;
            }
        }
        let ptrs = ffi::tensor_ptrs(&gs.params);
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the pointers are live for the call; the shim keeps its own references.
        let raw = unsafe {
            ffi::vt_dist_overlap_new(
                pg.raw(),
                ptrs.as_ptr(),
                bucket_of.as_ptr(),
                ptrs.len(),
                &mut err,
            )
        };
        match std::ptr::NonNull::new(raw) {
            Some(raw) => {
                gs.overlap = Some(Overlap { raw });
                Ok(gs)
            }
            // SAFETY: on null the shim set `err` (or left it null).
            None => Err(pg.tag(unsafe { ffi::take_err(err, "GradSync overlap set-up") })),
        }
    }

    /// Turns the backward hooks of an overlapped `GradSync` on or off (no effect otherwise).
    /// Off, gradients only accumulate locally and the next [`GradSync::sync`] reduces them all.
    pub fn set_overlap(&self, enabled: bool) {
        if let Some(ov) = &self.overlap {
            // SAFETY: live handle.
            unsafe {
                ffi::vt_dist_overlap_set_enabled(ov.raw.as_ptr(), enabled as std::ffi::c_int)
            };
        }
    }

    /// Whether the all-reduces run during backward.
    pub fn is_overlapped(&self) -> bool {
        self.overlap.is_some()
    }

    /// Buckets already launched by backward hooks in the step in progress (0 when not
    /// overlapped); [`GradSync::sync`] resets it.
    pub fn buckets_launched_in_backward(&self) -> usize {
        match &self.overlap {
            // SAFETY: live handle.
            Some(ov) => unsafe { ffi::vt_dist_overlap_launched(ov.raw.as_ptr()) }.max(0) as usize,
            None => 0,
        }
    }

    fn bucketed<'a>(
        params: impl Iterator<Item = &'a (String, Tensor)>,
        bucket_mb: f64,
    ) -> Result<Self> {
        if !(bucket_mb.is_finite() && bucket_mb > 0.0) {
            return Err(Error::config(
                "distributed.bucket_mb",
                format!("must be a positive number of MB, got {bucket_mb}"),
            ));
        }
        let cap = (bucket_mb * 1024.0 * 1024.0) as usize;
        let mut kept = Vec::new();
        let mut names = Vec::new();
        for (name, p) in params {
            if p.requires_grad() {
                kept.push(p.shallow_clone());
                names.push(name.clone());
            }
        }
        // Open buckets, one per (kind, device), with their byte count.
        let mut open: Vec<(Bucket, usize)> = Vec::new();
        let mut buckets = Vec::new();
        for (i, p) in kept.iter().enumerate() {
            let (kind, device) = (p.kind(), p.device());
            let bytes = p.numel() * kind.elt_size_in_bytes();
            let slot = open
                .iter()
                .position(|(b, _)| b.kind == kind && b.device == device);
            let slot = match slot {
                Some(s) if open[s].1 + bytes > cap && !open[s].0.members.is_empty() => {
                    let (full, _) = open.swap_remove(s);
                    buckets.push(full);
                    None
                }
                s => s,
            };
            let s = match slot {
                Some(s) => s,
                None => {
                    open.push((
                        Bucket {
                            members: Vec::new(),
                            kind,
                            device,
                        },
                        0,
                    ));
                    open.len() - 1
                }
            };
            open[s].0.members.push(i);
            open[s].1 += bytes;
        }
        buckets.extend(open.into_iter().map(|(b, _)| b));
        Ok(GradSync {
            params: kept,
            names,
            buckets,
            overlap: None,
        })
    }

    /// Number of parameters in each bucket (for logs and tests).
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.members.len()).collect()
    }

    /// Number of trainable parameters synchronized.
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// Replaces each gradient by its mean over all ranks. A parameter without a gradient on
    /// this rank contributes zeros and receives the mean, so every rank ends with the same
    /// gradients. A no-op with one rank.
    pub fn sync(&self, pg: &ProcessGroup) -> Result<()> {
        let world = pg.world_size();
        if world == 1 {
            return Ok(());
        }
        if let Some(ov) = &self.overlap {
            return ffi::check("GradSync", |err| {
                // SAFETY: live handle; the parameters it holds are kept alive by the shim.
                unsafe { ffi::vt_dist_overlap_finish(ov.raw.as_ptr(), err) }
            })
            .map_err(|e| pg.tag(e));
        }
        let _guard = tch::no_grad_guard();
        for bucket in &self.buckets {
            let mut parts = Vec::with_capacity(bucket.members.len());
            for &i in &bucket.members {
                let p = &self.params[i];
                let g = p.grad();
                let flat = if g.defined() {
                    g.f_reshape([-1])
                } else {
                    Tensor::f_zeros([p.numel() as i64], (bucket.kind, bucket.device))
                };
                parts.push(flat.ctx(format!("GradSync: flatten grad of `{}`", self.names[i]))?);
            }
            let flat = Tensor::f_cat(&parts, 0).ctx("GradSync: fill bucket")?;
            drop(parts);
            let mut one = [flat];
            pg.all_reduce_sum(&mut one)?;
            let [mut flat] = one;
            let _ = flat
                .f_div_scalar_(world as f64)
                .ctx("GradSync: divide by world size")?;
            let mut off = 0i64;
            for &i in &bucket.members {
                let p = &self.params[i];
                let n = p.numel() as i64;
                let name = &self.names[i];
                let slice = flat
                    .f_narrow(0, off, n)
                    .and_then(|s| s.f_view(p.size().as_slice()))
                    .ctx(format!("GradSync: unpack grad of `{name}`"))?;
                let mut g = p.grad();
                if g.defined() {
                    g.f_copy_(&slice)
                        .ctx(format!("GradSync: write grad of `{name}`"))?;
                } else {
                    let owned = slice
                        .f_detach_copy()
                        .ctx(format!("GradSync: new grad of `{name}`"))?;
                    set_grad(p, &owned).map_err(|e| match e {
                        Error::Dist(m) => Error::Dist(format!("parameter `{name}`: {m}")),
                        o => o,
                    })?;
                }
                off += n;
            }
        }
        Ok(())
    }
}

/// Sets `param.grad = grad` (tch has no setter for it).
fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    if param.size() != grad.size() {
        return Err(Error::Shape {
            op: "set_grad".into(),
            msg: format!(
                "gradient shape {:?} differs from parameter shape {:?}",
                grad.size(),
                param.size()
            ),
        });
    }
    let (p, g) = (
        param.as_ptr() as ffi::CTensor,
        grad.as_ptr() as ffi::CTensor,
    );
    // SAFETY: both tensors are live for the call; the shim only assigns the grad field.
    ffi::check("set_grad", |err| unsafe {
        ffi::vt_dist_set_grad(p, g, err)
    })
}

/// Copies every parameter of rank `root` into the same parameter on all other ranks (call it
/// once after building the model, before the first step), with autograd off.
pub fn broadcast_params(pg: &ProcessGroup, params: &[(String, Tensor)], root: usize) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let mut direct = Vec::new();
    let mut staged = Vec::new();
    for (name, p) in params {
        if !p.defined() {
            return Err(Error::invalid(format!(
                "broadcast_params: parameter `{name}` is undefined"
            )));
        }
        if p.is_contiguous() {
            direct.push(p.detach());
        } else {
            let c = p
                .f_contiguous()
                .ctx(format!("broadcast_params: contiguous copy of `{name}`"))?;
            staged.push((name, p, c));
        }
    }
    pg.broadcast(&mut direct, root)?;
    if !staged.is_empty() {
        let mut bufs: Vec<Tensor> = staged.iter().map(|(_, _, c)| c.shallow_clone()).collect();
        pg.broadcast(&mut bufs, root)?;
        for ((name, p, _), b) in staged.into_iter().zip(bufs) {
            p.detach()
                .f_copy_(&b)
                .ctx(format!("broadcast_params: write `{name}`"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_dtype_and_size() {
        let mk = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu)).set_requires_grad(true);
        // 0.001 MB = 1048 bytes: 200 f32 (800 B) fit, a second 200 does not.
        let params = vec![
            ("a".to_string(), mk(200, Kind::Float)),
            ("b".to_string(), mk(200, Kind::Float)),
            ("c".to_string(), mk(10, Kind::Double)),
            ("d".to_string(), mk(10, Kind::Float)),
            (
                "frozen".to_string(),
                Tensor::zeros([5], (Kind::Float, Device::Cpu)),
            ),
        ];
        let gs = GradSync::new(&params, 0.001).unwrap();
        assert_eq!(gs.num_params(), 4);
        let mut sizes = gs.bucket_sizes();
        sizes.sort();
        // [a], [b, d] (f32) and [c] (f64)
        assert_eq!(sizes, vec![1, 1, 2]);
        for b in &gs.buckets {
            assert!(b.members.iter().all(|&i| gs.params[i].kind() == b.kind));
        }
        assert!(GradSync::new(&params, 0.0).is_err());
    }
}
