//! Declarations of the dist shim (`csrc/dist_shim.cpp`), and its failures as [`Error::Dist`].
//! The safe wrappers are [`crate::dist::ProcessGroup`] and the gradient synchronisation.

use std::ffi::{c_char, c_int};

pub(crate) use super::{CTensor, tensor_ptrs};
use super::{call, take_msg};
use crate::error::{Error, Result};

/// Opaque process-group handle owned by the shim.
#[repr(C)]
pub(crate) struct VtPg {
    _private: [u8; 0],
}

/// Opaque handle of the overlapped gradient reducer.
#[repr(C)]
pub(crate) struct VtOverlap {
    _private: [u8; 0],
}

unsafe extern "C" {
    pub(crate) fn vt_dist_has_gloo() -> c_int;
    pub(crate) fn vt_dist_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_dist_pg_new(
        backend: c_int,
        master_addr: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        iface: *const c_char,
        host: *const c_char,
        prefix: *const c_char,
        gloo_threads: c_int,
        err: *mut *mut c_char,
    ) -> *mut VtPg;
    pub(crate) fn vt_dist_pg_free(pg: *mut VtPg);
    pub(crate) fn vt_dist_all_reduce_sum(
        pg: *mut VtPg,
        tensors: *const CTensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_dist_broadcast(
        pg: *mut VtPg,
        tensors: *const CTensor,
        n: usize,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_dist_barrier(pg: *mut VtPg, err: *mut *mut c_char) -> c_int;
    pub(crate) fn vt_dist_overlap_new(
        pg: *mut VtPg,
        params: *const CTensor,
        bucket_of: *const c_int,
        n: usize,
        err: *mut *mut c_char,
    ) -> *mut VtOverlap;
    pub(crate) fn vt_dist_overlap_set_enabled(ov: *mut VtOverlap, enabled: c_int);
    pub(crate) fn vt_dist_overlap_finish(ov: *mut VtOverlap, err: *mut *mut c_char) -> c_int;
    pub(crate) fn vt_dist_overlap_launched(ov: *mut VtOverlap) -> c_int;
    pub(crate) fn vt_dist_overlap_free(ov: *mut VtOverlap);
    pub(crate) fn vt_dist_set_grad(param: CTensor, grad: CTensor, err: *mut *mut c_char) -> c_int;
}

/// Takes ownership of a shim error string and turns it into [`Error::Dist`].
///
/// # Safety
/// `err` must be null or a string returned by the shim and not yet freed.
pub(crate) unsafe fn take_err(err: *mut c_char, fallback: &str) -> Error {
    // SAFETY: forwarded to the caller.
    Error::Dist(unsafe { take_msg(err, fallback) })
}

/// Runs a dist-shim call returning an error code, turning a failure into [`Error::Dist`].
pub(crate) fn check(what: &str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    call(what, f).map_err(Error::Dist)
}

/// Whether this build has Gloo support compiled in.
pub(crate) fn has_gloo() -> bool {
    // SAFETY: pure function in the shim.
    unsafe { vt_dist_has_gloo() != 0 }
}

/// Whether this build has NCCL support compiled in.
pub(crate) fn has_nccl() -> bool {
    // SAFETY: pure function in the shim.
    unsafe { vt_dist_has_nccl() != 0 }
}
