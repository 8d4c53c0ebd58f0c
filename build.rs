//! Build script: gives every binary, test, example and bench of this package a run-time search
//! path (RUNPATH) to libtorch, so nothing needs `LD_LIBRARY_PATH` to start.
//!
//! torch-sys finds libtorch through `LIBTORCH` (set by `tools/provision.sh --print-env`, which
//! the `./dev` script evaluates). We add `-Wl,-rpath,$LIBTORCH/lib`. Because the linker writes a
//! RUNPATH (new dtags), `LD_LIBRARY_PATH` still overrides it: on a GPU machine the same binary
//! runs against another torch 2.11.0 build by pointing `LD_LIBRARY_PATH` at its `lib/`.
//! `VOLTTRAIN_RPATH` replaces the path written (empty to write none).
//!
//! It also compiles the C++ shim of the `dist` module (`csrc/dist_shim.cpp`, see
//! [`build_dist_shim`]) against libtorch's headers and Debian's `libgloo-dev` headers.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    build_dist_shim();

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

/// Compiles `csrc/dist_shim.cpp`, the C ABI over c10d's TCPStore and ProcessGroupGloo (and
/// ProcessGroupNCCL when NCCL and CUDA host headers are found), into a static library.
///
/// Needs `LIBTORCH` (its `include/` and `include/torch/csrc/api/include`) and gloo's headers,
/// which the torch wheel does not ship: `apt-get install libgloo-dev` (done by
/// `tools/provision.sh`) or `VOLTTRAIN_GLOO_INCLUDE=<dir holding gloo/config.h>`. Only torch's
/// libraries are linked, never Debian's `libgloo.so`.
///
/// NCCL: compiled whenever [`nccl_paths`] finds `nccl.h` and the CUDA host headers
/// (`cuda_runtime_api.h`, `crt/host_config.h`, `nv/target`) of the pinned NVIDIA wheels that
/// `tools/provision.sh` installs next to torch, which is every provisioned build, CI included.
/// NCCL builds also link `libtorch_cuda`, `libc10_cuda` and the wheels' `libnccl.so.2` and
/// `libcudart.so.13`. When something is missing the build goes on without NCCL, says why in a
/// `cargo:warning`, and records it in `VOLTTRAIN_NCCL_BUILD` (`dist::nccl_build_status`,
/// shown by `volttrain env`).
fn build_dist_shim() {
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/fused.cpp");
    println!("cargo:rerun-if-changed=csrc/amp.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_common.h");
    println!("cargo:rerun-if-changed=csrc/kernels.c");
    println!("cargo:rerun-if-changed=csrc/qlinear.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_stats.cpp");
    println!("cargo:rerun-if-changed=csrc/dequant.c");
    println!("cargo:rerun-if-changed=csrc/ssm.cpp");
    println!("cargo:rerun-if-changed=csrc/ssm_kernels.c");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_NCCL_INCLUDE");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_CUDA_INCLUDE");

    let Ok(libtorch) = env::var("LIBTORCH") else {
        fail(
            "LIBTORCH is not set; the dist shim needs libtorch's headers. Run \
             `eval \"$(tools/provision.sh --print-env)\"` (or use ./dev) and build again.",
        );
    };
    let libtorch = PathBuf::from(libtorch);
    let inc = libtorch.join("include");
    let api_inc = inc.join("torch/csrc/api/include");
    if !inc
        .join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
        .exists()
    {
        fail(&format!(
            "{} has no torch/csrc/distributed/c10d/ProcessGroupGloo.hpp; LIBTORCH must point at \
             the torch 2.11.0 wheel's torch/ directory (tools/provision.sh --print-env)",
            inc.display()
        ));
    }

    let gloo_inc = env::var("VOLTTRAIN_GLOO_INCLUDE")
        .ok()
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/include", "/usr/local/include"]
                .iter()
                .map(PathBuf::from)
                .find(|d| d.join("gloo/config.h").exists())
        });
    let Some(gloo_inc) = gloo_inc.filter(|d| d.join("gloo/config.h").exists()) else {
        fail(
            "gloo's headers (gloo/config.h) were not found; the torch wheel does not ship them. \
             Install them with `apt-get install libgloo-dev` (tools/provision.sh does it), or set \
             VOLTTRAIN_GLOO_INCLUDE to the directory holding gloo/.",
        );
    };

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/dist_shim.cpp")
        .file("csrc/fused.cpp")
        .file("csrc/amp.cpp")
        .file("csrc/qlinear.cpp")
        .file("csrc/cuda_stats.cpp")
        .file("csrc/ssm.cpp")
        .include(&inc)
        .include(&api_inc)
        .include(&gloo_inc)
        .flag("-std=c++17")
        // at::parallel_for is header code: OpenMP makes it run on libtorch's thread pool
        .flag("-fopenmp")
        // optimised in every profile: the shim's loops (fused ops' glue, dequantization's
        // statistics) run in debug-build tests and benches too; cc follows the profile otherwise
        .opt_level(3)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);

    let nccl = match nccl_paths(&libtorch) {
        Ok(paths) => {
            for d in &paths.include {
                build.include(d);
            }
            build
                .define("USE_C10D_NCCL", None)
                .define("VOLTTRAIN_NCCL", None);
            println!("cargo:rustc-cfg=volttrain_nccl");
            println!("cargo:rustc-env=VOLTTRAIN_NCCL_BUILD=compiled");
            Some(paths)
        }
        Err(why) => {
            // Loud: a build without NCCL cannot run multi-GPU data parallel.
            println!("cargo:warning=NCCL is NOT compiled into this build: {why}");
            println!("cargo:rustc-env=VOLTTRAIN_NCCL_BUILD=not compiled: {why}");
            None
        }
    };
    println!("cargo:rustc-check-cfg=cfg(volttrain_nccl)");
    build.compile("volttrain_dist_shim");
    build_kernels(&inc);

    // The shim's symbols come from torch's libraries; name them after the static archive so the
    // linker resolves them whatever order the upstream `-l` flags come in.
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // The OpenMP runtime libtorch_cpu itself uses (the wheel's own copy), so fused.cpp's
    // parallel regions share libtorch's threads instead of starting a second runtime.
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    if let Some(paths) = nccl {
        // ProcessGroupNCCL lives in libtorch_cuda; NCCL and the CUDA runtime come from the
        // pinned wheels, found at run time through the RUNPATH (or `LD_LIBRARY_PATH`, which
        // overrides it, on a machine with its own torch).
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        for d in &paths.lib {
            println!("cargo:rustc-link-search=native={}", d.display());
            if env::var("VOLTTRAIN_RPATH").map_or(true, |p| !p.is_empty()) {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
            }
        }
        println!("cargo:rustc-link-lib=dylib:+verbatim=libnccl.so.2");
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    }
}

/// Compiles `csrc/kernels.c`, the row loops of the fused CPU ops (`src/fused.rs`), on its own:
/// on x86-64 with `-mavx2 -mfma` (exp through SLEEF's `Sleef_expf8_u10`, which libtorch_cpu
/// exports). It is C on purpose, so no inline C++ function compiled with those flags can be
/// picked by the linker for code outside it; the Rust side calls into it only after checking
/// the CPU for AVX2 and FMA.
fn build_kernels(torch_include: &Path) {
    let mut k = cc::Build::new();
    k.file("csrc/kernels.c")
        .file("csrc/dequant.c")
        .file("csrc/ssm_kernels.c")
        .include(torch_include)
        .flag("-std=c11")
        .flag("-fopenmp-simd")
        .opt_level(3)
        .warnings(false);
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        k.flag("-mavx2").flag("-mfma");
    }
    k.compile("volttrain_kernels");
}

/// What the NCCL build needs, found next to torch in `site-packages` (the pinned wheels
/// `tools/provision.sh` installs: `nvidia-nccl-cu13`, `nvidia-cuda-runtime`, `nvidia-cuda-crt`,
/// `nvidia-cuda-cccl`) or through `VOLTTRAIN_NCCL_INCLUDE` / `VOLTTRAIN_CUDA_INCLUDE`.
struct NcclPaths {
    include: Vec<PathBuf>,
    /// Directories of `libnccl.so.2` and `libcudart.so.13` (linked and put on the RUNPATH).
    lib: Vec<PathBuf>,
}

/// The NCCL build inputs, or why they are missing (said in a `cargo:warning` and by
/// `volttrain env`).
fn nccl_paths(libtorch: &Path) -> std::result::Result<NcclPaths, String> {
    const FIX: &str = "run tools/provision.sh (or ./dev), which installs the pinned NVIDIA \
                       wheels into the torch venv, and build again";
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        return Err(format!(
            "{} has no libtorch_cuda.so (a CPU-only torch); NCCL needs the CUDA wheel of torch \
             2.11.0",
            libtorch.join("lib").display()
        ));
    }
    let site = libtorch
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("LIBTORCH {} has no parent directory", libtorch.display()))?;
    // Build again once provisioning adds the headers (cargo scans the folder's mtimes).
    for d in ["nvidia/cu13/include", "nvidia/nccl/include"] {
        if site.join(d).is_dir() {
            println!("cargo:rerun-if-changed={}", site.join(d).display());
        }
    }
    let nccl = env::var("VOLTTRAIN_NCCL_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| site.join("nvidia/nccl/include"));
    if !nccl.join("nccl.h").exists() {
        return Err(format!(
            "{} is missing; {FIX}",
            nccl.join("nccl.h").display()
        ));
    }
    let cuda: Vec<PathBuf> = match env::var("VOLTTRAIN_CUDA_INCLUDE") {
        Ok(v) => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        Err(_) => vec![site.join("nvidia/cu13/include")],
    };
    for rel in ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"] {
        if !cuda.iter().any(|d| d.join(rel).exists()) {
            let dirs: Vec<String> = cuda.iter().map(|d| d.display().to_string()).collect();
            return Err(format!(
                "the CUDA host header {rel} is not in {} (VOLTTRAIN_CUDA_INCLUDE to override); \
                 {FIX}",
                dirs.join(":")
            ));
        }
    }
    let mut lib = Vec::new();
    for (dir, so) in [
        (site.join("nvidia/nccl/lib"), "libnccl.so.2"),
        (site.join("nvidia/cu13/lib"), "libcudart.so.13"),
    ] {
        if !dir.join(so).exists() {
            return Err(format!("{} is missing; {FIX}", dir.join(so).display()));
        }
        lib.push(dir);
    }
    let mut include = vec![nccl];
    include.extend(cuda);
    Ok(NcclPaths { include, lib })
}

/// Stops the build with `msg` (build scripts report errors through stderr and the exit code).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
