//! Build script: gives every binary, test, example and bench of this package a run-time search
//! path (RUNPATH) to libtorch, so nothing needs `LD_LIBRARY_PATH` to start.
//!
//! torch-sys finds libtorch through `LIBTORCH` (set by `tools/provision.sh --print-env`, which
//! the `./dev` script evaluates). We add `-Wl,-rpath,$LIBTORCH/lib`. Because the linker writes a
//! RUNPATH (new dtags), `LD_LIBRARY_PATH` still overrides it: on a GPU machine the same binary
//! runs against another torch 2.11.0 build by pointing `LD_LIBRARY_PATH` at its `lib/`.
//! `VOLTTRAIN_RPATH` replaces the path written (empty to write none).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_RPATH");
    println!("cargo:rerun-if-changed=build.rs");

    // The compiler version, checked when a dylib plugin is loaded (src/plugin/dylib.rs): Rust
    // types cross the plugin boundary, which is sound only with the same rustc on both sides.
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    match std::process::Command::new(&rustc).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("cargo:rustc-env=VOLTTRAIN_RUSTC_VERSION={version}");
        }
        Ok(out) => panic!(
            "`{rustc} --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run `{rustc} --version`: {e}"),
    }

    let rpath = match env::var("VOLTTRAIN_RPATH") {
        Ok(p) => Some(p),
        Err(_) => env::var("LIBTORCH")
            .ok()
            .map(|lt| PathBuf::from(lt).join("lib").display().to_string()),
    };
    if let Some(p) = rpath.filter(|p| !p.is_empty()) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{p}");
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
        // rustc links with --as-needed; keep libtorch_cuda when it is there so CUDA is usable.
        if PathBuf::from(&p).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
            println!("cargo:rustc-link-search=native={p}");
        }
    }
}
