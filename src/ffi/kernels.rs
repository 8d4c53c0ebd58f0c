//! Declarations of the kernel library (`csrc/fused.cpp`, `amp.cpp`, `qlinear.cpp`, `ssm.cpp`),
//! one block per source file. The safe wrappers live with their users: [`crate::fused`],
//! [`crate::amp`], [`crate::quant`]'s quantized linear and [`crate::model`]'s selective scan.

use std::ffi::{c_char, c_int};

use super::{CTensor, RawTensor};

// csrc/fused.cpp: fused CPU training ops and the optimizer-side calls tch lacks.
unsafe extern "C" {
    pub(crate) fn vt_fused_rms_norm(
        x: CTensor,
        weight: CTensor,
        eps: f64,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_fused_swiglu(
        gate: CTensor,
        up: CTensor,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_fused_rope(
        x: CTensor,
        cos: CTensor,
        sin: CTensor,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_fused_linear_ce(
        h: CTensor,
        w: CTensor,
        targets: CTensor,
        ignore: i64,
        scale: f64,
        cap: f64,
        chunk_rows: i64,
        out: RawTensor,
        loss_sum: *mut f64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_clear_grad(param: CTensor, err: *mut *mut c_char) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_fused_adamw(
        param: CTensor,
        grad: CTensor,
        exp_avg: CTensor,
        exp_avg_sq: CTensor,
        max_exp_avg_sq: CTensor,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> c_int;
}

// csrc/ssm.cpp: the fused selective scan.
unsafe extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_fused_selective_scan(
        u: CTensor,
        dt: CTensor,
        a: CTensor,
        b: CTensor,
        c: CTensor,
        d: CTensor,
        z: CTensor,
        bias: CTensor,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
}

// csrc/amp.cpp: autocast state and GradScaler's kernels.
unsafe extern "C" {
    pub(crate) fn vt_amp_enter(
        device: c_int,
        dtype: c_int,
        enabled: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_amp_exit(
        device: c_int,
        prev_enabled: c_int,
        prev_dtype: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_amp_state(
        device: c_int,
        enabled: *mut c_int,
        dtype: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_amp_cuda_bf16_supported() -> c_int;
    pub(crate) fn vt_amp_unscale(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_amp_update_scale(
        scale: CTensor,
        growth_tracker: CTensor,
        found_inf: CTensor,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: i64,
        err: *mut *mut c_char,
    ) -> c_int;
}

// csrc/qlinear.cpp: dequantization and the product with a frozen quantized weight.
unsafe extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_qweight_dequant(
        fmt: i64,
        parts: *const CTensor,
        nparts: i64,
        rows: i64,
        cols: i64,
        bs: i64,
        offset: f64,
        fast: c_int,
        r0: i64,
        r1: i64,
        dtype: c_int,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vt_qweight_linear(
        x: CTensor,
        fmt: i64,
        parts: *const CTensor,
        nparts: i64,
        rows: i64,
        cols: i64,
        bs: i64,
        offset: f64,
        fast: c_int,
        xb: CTensor,
        xs: CTensor,
        scaled_mm: c_int,
        out_dtype: c_int,
        out: RawTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vt_dequant_4bit_raw(
        packed: CTensor,
        absmax: CTensor,
        code: CTensor,
        out: CTensor,
        bs: i64,
        vector: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
}
