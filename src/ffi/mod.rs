//! The Rust side of VoltTrain's C++ shims, both of them, in one place: the raw declarations and
//! the machinery every call shares.
//!
//! `build.rs` compiles two static libraries against libtorch's headers:
//!
//! - the kernel library (`csrc/fused.cpp`, `amp.cpp`, `qlinear.cpp`, `ssm.cpp`,
//!   `cuda_stats.cpp`, `shim_common.cpp`, with the C row loops of `kernels.c`, `dequant.c`,
//!   `ssm_kernels.c`), declared in [`kernels`]; it needs libtorch's headers only;
//! - the dist shim (`csrc/dist_shim.cpp`, c10d with Gloo and NCCL where their headers were
//!   found), declared in [`dist`].
//!
//! The ABI rules both keep (`csrc/shim_common.h`): every fallible function returns an error code
//! (0 = ok) or a null handle, with a heap error string in `err` that [`vt_free_str`] frees; no
//! C++ exception crosses the boundary. Tensors are `at::Tensor*`, the `tensor` type of
//! torch-sys's C API (`Tensor::as_ptr`), passed as `*mut c_void` ([`CTensor`]) so the crate
//! needs no direct torch-sys dependency; a returned tensor is a new heap `at::Tensor*` that the
//! Rust [`Tensor`] takes over.
//!
//! Failures of the kernel library become [`Error::Kernel`] ([`kernel`], [`new_tensor`]); the
//! dist shim's become [`Error::Dist`] ([`dist::check`]).

pub(crate) mod dist;
pub(crate) mod kernels;

use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;

use crate::error::{Error, Result};

/// `at::Tensor*` as tch's `Tensor::as_ptr` gives it.
pub(crate) type CTensor = *mut c_void;

/// Where a shim function writes the new tensor it returns.
pub(crate) type RawTensor = *mut CTensor;

unsafe extern "C" {
    /// Frees an error string set by either shim (`csrc/shim_common.cpp`).
    pub(crate) fn vt_free_str(s: *mut c_char);
}

/// The raw `at::Tensor*` of `t` (valid while `t` is borrowed).
pub(crate) fn ptr(t: &Tensor) -> CTensor {
    t.as_ptr() as CTensor
}

/// The raw `at::Tensor*` pointers of `tensors` (valid while `tensors` is borrowed).
pub(crate) fn tensor_ptrs<T: std::borrow::Borrow<Tensor>>(tensors: &[T]) -> Vec<CTensor> {
    tensors.iter().map(|t| ptr(t.borrow())).collect()
}

/// Takes ownership of a shim error string and returns its text.
///
/// # Safety
/// `err` must be null or a string returned by a shim and not yet freed.
pub(crate) unsafe fn take_msg(err: *mut c_char, fallback: &str) -> String {
    if err.is_null() {
        return format!("{fallback}: the C++ shim gave no message");
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string; we free it right after copying.
    let msg = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { vt_free_str(err) };
    msg
}

/// Runs a shim call returning an error code; on failure, the C++ message (which starts with
/// the shim's name for the operation).
pub(crate) fn call(
    what: &str,
    call: impl FnOnce(*mut *mut c_char) -> c_int,
) -> std::result::Result<(), String> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let rc = call(&mut err);
    if rc == 0 {
        if !err.is_null() {
            // SAFETY: a string from the shim; not expected on success, but never leak it.
            unsafe { vt_free_str(err) };
        }
        Ok(())
    } else {
        // SAFETY: `err` was set by the shim (or is null).
        Err(unsafe { take_msg(err, what) })
    }
}

/// [`Error::Kernel`] for `op` from a shim message, without the `op: ` prefix the C++ side
/// already put on it.
pub(crate) fn kernel_error(op: &str, msg: &str) -> Error {
    let msg = msg
        .strip_prefix(op)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(msg);
    Error::Kernel {
        op: op.to_string(),
        msg: msg.to_string(),
    }
}

/// Runs a kernel-library call returning an error code, turning a failure into
/// [`Error::Kernel`] for `op`.
pub(crate) fn kernel(op: &str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    call(op, f).map_err(|m| kernel_error(op, &m))
}

/// Runs a kernel-library call that returns a new tensor through its out-pointer.
pub(crate) fn new_tensor(
    op: &str,
    f: impl FnOnce(RawTensor, *mut *mut c_char) -> c_int,
) -> Result<Tensor> {
    let mut out: CTensor = std::ptr::null_mut();
    kernel(op, |err| f(&mut out, err))?;
    if out.is_null() {
        return Err(kernel_error(op, "the shim returned no tensor"));
    }
    // SAFETY: the shim hands over a heap `at::Tensor*` (torch-sys's `tensor` type), which the
    // returned Tensor owns and frees.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_name_the_op_once() {
        let e = kernel_error("fused rope", "fused rope: x must be fp32");
        assert!(
            matches!(&e, Error::Kernel { op, msg } if op == "fused rope" && msg == "x must be fp32")
        );
        assert_eq!(e.to_string(), "fused rope: x must be fp32");
        // a message without the prefix is kept whole
        let e = kernel_error("clear_grad", "undefined tensor");
        assert_eq!(e.to_string(), "clear_grad: undefined tensor");
    }

    #[test]
    fn kernel_failure_is_a_kernel_error_not_a_dist_error() {
        // clear_grad on an undefined tensor: the C++ side throws, the shim reports it.
        let r = kernel("clear_grad", |err| unsafe {
            kernels::vt_clear_grad(std::ptr::null_mut(), err)
        });
        match r {
            Err(Error::Kernel { op, msg }) => {
                assert_eq!(op, "clear_grad");
                assert!(msg.contains("undefined tensor"), "{msg}");
            }
            other => panic!("expected Error::Kernel, got {other:?}"),
        }
    }
}
