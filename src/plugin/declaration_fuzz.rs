//! Property test of the host's plugin declaration check: random ABI versions, version and name
//! strings (any bytes, invalid UTF-8, empty) and null pointers, thousands of cases. The check
//! never panics, accepts exactly the declarations that match the host, and every error names
//! the plugin file.

use std::ffi::{CString, c_char};
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::dylib::{
    PLUGIN_ABI_VERSION, PluginDeclaration, PluginRegistrar, RUSTC_VERSION, VOLTTRAIN_VERSION,
    check_declaration,
};

unsafe extern "C" fn never_called(_: *mut PluginRegistrar) -> *mut c_char {
    std::process::abort()
}

/// A declaration string: `None` is a null pointer; the host's own value is likely.
fn field(host: &'static str) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => Just(Some(host.as_bytes().to_vec())),
        1 => Just(None),
        2 => proptest::collection::vec(1u8..=255, 0..40).prop_map(Some),
        1 => (0usize..host.len().max(1), 1u8..=255).prop_map(move |(i, b)| {
            let mut v = host.as_bytes().to_vec();
            if !v.is_empty() {
                let i = i % v.len();
                v[i] = b;
            }
            Some(v)
        }),
    ]
}

#[test]
fn random_declarations_never_panic_and_errors_name_the_plugin() {
    let path = Path::new("/fuzz/libplugin.so");
    let strategy = (
        prop_oneof![3 => Just(PLUGIN_ABI_VERSION), 1 => any::<u32>()],
        field(RUSTC_VERSION),
        field(VOLTTRAIN_VERSION),
        field(crate::LIBTORCH_VERSION),
        field("plugin"),
        field("0.1.0"),
    );
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    });
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |(abi, rustc, volt, torch, name, version)| {
            let owned: Vec<Option<CString>> = [&rustc, &volt, &torch, &name, &version]
                .iter()
                .map(|f| {
                    f.as_ref()
                        .map(|b| CString::new(b.clone()).expect("no NUL inside"))
                })
                .collect();
            let ptr = |i: usize| owned[i].as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            let mut d = PluginDeclaration::new("x\0", "0\0", never_called);
            d.abi_version = abi;
            d.rustc_version = ptr(0);
            d.volttrain_version = ptr(1);
            d.libtorch_version = ptr(2);
            d.plugin_name = ptr(3);
            d.plugin_version = ptr(4);
            // SAFETY: `d` is a whole declaration; its pointers are null or NUL-terminated
            // strings that outlive the call.
            let r = unsafe { check_declaration(path, &d) };
            let matches = abi == PLUGIN_ABI_VERSION
                && rustc.as_deref() == Some(RUSTC_VERSION.as_bytes())
                && volt.as_deref() == Some(VOLTTRAIN_VERSION.as_bytes())
                && torch.as_deref() == Some(crate::LIBTORCH_VERSION.as_bytes())
                && name.is_some()
                && version.is_some();
            match r {
                Ok(_) => {
                    prop_assert!(matches, "accepted a declaration that does not match");
                    accepted.set(accepted.get() + 1);
                }
                Err(e) => {
                    prop_assert!(!matches, "rejected a matching declaration: {e}");
                    let s = e.to_string();
                    prop_assert!(s.starts_with("plugin /fuzz/libplugin.so: "), "{s}");
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("plugin declarations: {e}"));
    eprintln!(
        "plugin declarations: 3000 cases, {} accepted",
        accepted.get()
    );
    assert!(accepted.get() > 0, "no matching declaration was generated");
}
