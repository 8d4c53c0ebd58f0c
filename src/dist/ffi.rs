//! Raw bindings to `csrc/dist_shim.cpp` (compiled by `build.rs`).
//!
//! Every function returns an error code (0 = ok) or a null handle, with a heap error string in
//! `err` that must be freed with [`vt_dist_free_str`]; no C++ exception crosses this boundary.
//! Tensors are `at::Tensor*`, the `tensor` type of torch-sys's C API (`Tensor::as_ptr`), passed
//! here as `*mut c_void` ([`CTensor`]) so the crate needs no direct torch-sys dependency.

use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;

use crate::error::{Error, Result};

/// Opaque process-group handle owned by the shim.
#[repr(C)]
pub struct VtPg {
    _private: [u8; 0],
}

/// Opaque handle of the overlapped gradient reducer.
#[repr(C)]
pub struct VtOverlap {
    _private: [u8; 0],
}

/// `at::Tensor*` as tch's `Tensor::as_ptr` gives it.
pub type CTensor = *mut c_void;

unsafe extern "C" {
    pub fn vt_dist_free_str(s: *mut c_char);
    pub fn vt_dist_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn vt_dist_pg_new(
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
    pub fn vt_dist_pg_free(pg: *mut VtPg);
    pub fn vt_dist_all_reduce_sum(
        pg: *mut VtPg,
        tensors: *const CTensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn vt_dist_broadcast(
        pg: *mut VtPg,
        tensors: *const CTensor,
        n: usize,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn vt_dist_barrier(pg: *mut VtPg, err: *mut *mut c_char) -> c_int;
    pub fn vt_dist_overlap_new(
        pg: *mut VtPg,
        params: *const CTensor,
        bucket_of: *const c_int,
        n: usize,
        err: *mut *mut c_char,
    ) -> *mut VtOverlap;
    pub fn vt_dist_overlap_set_enabled(ov: *mut VtOverlap, enabled: c_int);
    pub fn vt_dist_overlap_finish(ov: *mut VtOverlap, err: *mut *mut c_char) -> c_int;
    pub fn vt_dist_overlap_launched(ov: *mut VtOverlap) -> c_int;
    pub fn vt_dist_overlap_free(ov: *mut VtOverlap);
    pub fn vt_dist_set_grad(param: CTensor, grad: CTensor, err: *mut *mut c_char) -> c_int;
}

/// Takes ownership of a shim error string and returns its text.
///
/// # Safety
/// `err` must be null or a string returned by the shim and not yet freed.
pub(crate) unsafe fn take_msg(err: *mut c_char, fallback: &str) -> String {
    if err.is_null() {
        return format!("{fallback}: the C++ shim gave no message");
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string; we free it right after copying.
    let msg = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { vt_dist_free_str(err) };
    msg
}

/// Takes ownership of a shim error string and turns it into [`Error::Dist`].
///
/// # Safety
/// `err` must be null or a string returned by the shim and not yet freed.
pub(crate) unsafe fn take_err(err: *mut c_char, fallback: &str) -> Error {
    // SAFETY: forwarded to the caller.
    Error::Dist(unsafe { take_msg(err, fallback) })
}

/// Runs a shim call returning an error code; on failure, the C++ message.
pub(crate) fn call(
    what: &str,
    call: impl FnOnce(*mut *mut c_char) -> c_int,
) -> std::result::Result<(), String> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let rc = call(&mut err);
    if rc == 0 {
        if !err.is_null() {
            // SAFETY: a string from the shim; not expected on success, but never leak it.
            unsafe { vt_dist_free_str(err) };
        }
        Ok(())
    } else {
        // SAFETY: `err` was set by the shim (or is null).
        Err(unsafe { take_msg(err, what) })
    }
}

/// Runs a shim call returning an error code, turning a failure into [`Error::Dist`].
pub(crate) fn check(what: &str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    call(what, f).map_err(Error::Dist)
}

/// The raw `at::Tensor*` pointers of `tensors` (valid while `tensors` is borrowed).
pub(crate) fn tensor_ptrs(tensors: &[Tensor]) -> Vec<CTensor> {
    tensors.iter().map(|t| t.as_ptr() as CTensor).collect()
}

/// Whether this build has NCCL support compiled in.
pub fn has_nccl() -> bool {
    // SAFETY: pure function in the shim.
    unsafe { vt_dist_has_nccl() != 0 }
}
