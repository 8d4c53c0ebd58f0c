//! Build script: gives the harness's binaries, tests, examples and benches a run-time search
//! path (RUNPATH) to libtorch, as the library's build.rs does for its own targets (Cargo applies
//! a build script's link arguments to its own package only). `VOLTTRAIN_RPATH` replaces the path
//! written (empty to write none); `LD_LIBRARY_PATH` still overrides it (new dtags). When
//! libtorch has `libtorch_cuda.so`, it is linked even though nothing names its symbols, so that
//! CUDA is usable (`volttrain-gpu-check`).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_RPATH");
    println!("cargo:rerun-if-changed=build.rs");
    let rpath = match env::var("VOLTTRAIN_RPATH") {
        Ok(p) => Some(p),
        Err(_) => env::var("LIBTORCH")
            .ok()
            .map(|lt| PathBuf::from(lt).join("lib").display().to_string()),
    };
    let Some(p) = rpath.filter(|p| !p.is_empty()) else {
        return;
    };
    for arg in [format!("-Wl,-rpath,{p}"), "-Wl,--enable-new-dtags".into()] {
        println!("cargo:rustc-link-arg={arg}");
    }
    if PathBuf::from(&p).join("libtorch_cuda.so").exists() {
        for arg in ["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"] {
            println!("cargo:rustc-link-arg={arg}");
        }
        println!("cargo:rustc-link-search=native={p}");
    }
}
