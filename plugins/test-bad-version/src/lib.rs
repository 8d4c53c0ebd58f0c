//! Test fixture for `tests/plugin_dylib.rs`: exports `volttrain_plugin_declaration` with the
//! current ABI version but a rustc, VoltTrain and libtorch version that no host has. Written by
//! hand (no dependency on volttrain), with the layout of `volttrain::plugin::PluginDeclaration`
//! at ABI version 2 (keep `abi_version` below equal to the host's `PLUGIN_ABI_VERSION`). Its
//! register function aborts the process: the host must reject the declaration without calling
//! it.

use std::ffi::c_char;

#[repr(C)]
pub struct Declaration {
    abi_version: u32,
    rustc_version: *const c_char,
    volttrain_version: *const c_char,
    libtorch_version: *const c_char,
    plugin_name: *const c_char,
    plugin_version: *const c_char,
    register: unsafe extern "C" fn(*mut u8) -> *mut c_char,
}

unsafe impl Sync for Declaration {}

unsafe extern "C" fn register(_: *mut u8) -> *mut c_char {
    std::process::abort()
}

static DECLARATION: Declaration = Declaration {
    abi_version: 2,
    rustc_version: c"rustc 1.0.0 (a59807616 2015-05-15)".as_ptr(),
    volttrain_version: c"0.0.1-fixture".as_ptr(),
    libtorch_version: c"1.13.1".as_ptr(),
    plugin_name: c"volttrain-test-bad-version".as_ptr(),
    plugin_version: c"0.0.1".as_ptr(),
    register,
};

#[unsafe(no_mangle)]
pub extern "C" fn volttrain_plugin_declaration() -> *const Declaration {
    &DECLARATION
}
