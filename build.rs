//! Build script: gives every binary, test, example and bench of this package a run-time search
//! path (RUNPATH) to libtorch, so nothing needs `LD_LIBRARY_PATH` to start.
//!
//! torch-sys finds libtorch through `LIBTORCH` (set by `tools/provision.sh --print-env`, which
//! the `./dev` script evaluates). We add `-Wl,-rpath,$LIBTORCH/lib`. Because the linker writes a
//! RUNPATH (new dtags), `LD_LIBRARY_PATH` still overrides it: on a GPU machine the same binary
//! runs against another torch 2.11.0 build by pointing `LD_LIBRARY_PATH` at its `lib/`.
//! `VOLTTRAIN_RPATH` replaces the path written (empty to write none).
//!
//! It also compiles the C++ shims against libtorch's headers, as two static libraries whose
//! Rust side is `src/ffi/`:
//!
//! - the kernel library ([`build_kernels`]): the fused CPU ops, autocast and loss scaling, the
//!   quantized linear, the selective scan, CUDA allocator statistics. It needs libtorch's
//!   headers only.
//! - the dist shim ([`build_dist_shim`]): c10d's TCPStore and process groups. Gloo is compiled
//!   in when Debian's `libgloo-dev` headers are found, NCCL when the pinned NVIDIA wheels'
//!   headers are; a backend left out is said in a `cargo:warning` and fails at run time with
//!   the reason (`dist::gloo_build_status`, `dist::nccl_build_status`, `volttrain env`).
//!
//! With the `doc-only` feature (docs.rs, `cargo doc` without libtorch) it compiles and links
//! nothing, as torch-sys does under the same feature.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_RPATH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(volttrain_nccl)");

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

    if env::var_os("CARGO_FEATURE_DOC_ONLY").is_some() {
        // Documentation only: no libtorch, so no shim and nothing to link (the code that calls
        // the shims is type-checked, never linked).
        const WHY: &str = "not compiled: a doc-only build";
        println!("cargo:rustc-env=VOLTTRAIN_NCCL_BUILD={WHY}");
        println!("cargo:rustc-env=VOLTTRAIN_GLOO_BUILD={WHY}");
        return;
    }

    let libtorch = libtorch();
    let cuda = nccl_paths(&libtorch);
    build_kernels(&libtorch, cuda.as_ref().ok());
    build_dist_shim(&libtorch, &cuda);
    link_torch(&libtorch, cuda.as_ref().ok());

    let rpath =
        env::var("VOLTTRAIN_RPATH").unwrap_or_else(|_| libtorch.join("lib").display().to_string());
    if let Some(p) = Some(rpath).filter(|p| !p.is_empty()) {
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

/// `LIBTORCH`, checked: the torch 2.11.0 wheel's `torch/` directory, with the headers the shims
/// include.
fn libtorch() -> PathBuf {
    let Ok(libtorch) = env::var("LIBTORCH") else {
        fail(
            "LIBTORCH is not set; VoltTrain's C++ shims need libtorch's headers. Run \
             `eval \"$(tools/provision.sh --print-env)\"` (or use ./dev) and build again \
             (`--features doc-only` builds documentation without libtorch).",
        );
    };
    let libtorch = PathBuf::from(libtorch);
    let inc = libtorch.join("include");
    if !inc
        .join("torch/csrc/distributed/c10d/TCPStore.hpp")
        .exists()
    {
        fail(&format!(
            "{} has no torch/csrc/distributed/c10d/TCPStore.hpp; LIBTORCH must point at the \
             torch 2.11.0 wheel's torch/ directory (tools/provision.sh --print-env)",
            inc.display()
        ));
    }
    libtorch
}

/// A C++ build against libtorch's headers with the flags both shims share.
fn torch_cpp(libtorch: &Path) -> cc::Build {
    let inc = libtorch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // optimised in every profile: the shim's loops (fused ops' glue, dequantization's
        // statistics) run in debug-build tests and benches too; cc follows the profile otherwise
        .opt_level(3)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    build
}

/// Compiles the kernel library, `volttrain_kernels`: `csrc/fused.cpp`, `amp.cpp`,
/// `qlinear.cpp`, `ssm.cpp`, `cuda_stats.cpp` and `shim_common.cpp` (the error-string ABI both
/// shims use), then their C row loops ([`build_simd`]). Needs libtorch's headers only; the real
/// CUDA statistics also need the CUDA host headers (found with NCCL's, [`nccl_paths`]), and
/// report "not available" without them.
fn build_kernels(libtorch: &Path, cuda: Option<&NcclPaths>) {
    let files = [
        "csrc/shim_common.cpp",
        "csrc/fused.cpp",
        "csrc/amp.cpp",
        "csrc/qlinear.cpp",
        "csrc/cuda_stats.cpp",
        "csrc/ssm.cpp",
    ];
    println!("cargo:rerun-if-changed=csrc/shim_common.h");
    let mut build = torch_cpp(libtorch);
    for f in files {
        println!("cargo:rerun-if-changed={f}");
        build.file(f);
    }
    // at::parallel_for is header code: OpenMP makes it run on libtorch's thread pool
    build.flag("-fopenmp");
    if let Some(paths) = cuda {
        for d in &paths.include {
            build.include(d);
        }
        build.define("VOLTTRAIN_CUDA", None);
    }
    build.compile("volttrain_kernels");
    build_simd(&libtorch.join("include"));
}

/// Compiles `csrc/kernels.c`, `dequant.c` and `ssm_kernels.c`, the row loops of the fused CPU
/// ops (`src/fused.rs`), the 4-bit dequantization and the selective scan, on their own: on
/// x86-64 with `-mavx2 -mfma` (exp through SLEEF's `Sleef_expf8_u10`, which libtorch_cpu
/// exports). They are C on purpose, so no inline C++ function compiled with those flags can be
/// picked by the linker for code outside them; the Rust side calls into them only after checking
/// the CPU for AVX2 and FMA.
fn build_simd(torch_include: &Path) {
    let mut k = cc::Build::new();
    for f in ["csrc/kernels.c", "csrc/dequant.c", "csrc/ssm_kernels.c"] {
        println!("cargo:rerun-if-changed={f}");
        k.file(f);
    }
    k.include(torch_include)
        .flag("-std=c11")
        .flag("-fopenmp-simd")
        .opt_level(3)
        .warnings(false);
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        k.flag("-mavx2").flag("-mfma");
    }
    k.compile("volttrain_simd");
}

/// Compiles `csrc/dist_shim.cpp`, the C ABI over c10d's TCPStore and process groups, into
/// `volttrain_dist`. libtorch's headers are enough for the shim itself; each backend is
/// compiled in when its headers are found, and otherwise left out with a `cargo:warning` (and
/// its status in `VOLTTRAIN_GLOO_BUILD` / `VOLTTRAIN_NCCL_BUILD`, shown by `volttrain env`), so a
/// CPU-only single-process build needs neither:
///
/// - Gloo (CPU ranks): gloo's headers, which the torch wheel does not ship: `apt-get install
///   libgloo-dev` (done by `tools/provision.sh`) or `VOLTTRAIN_GLOO_INCLUDE=<dir holding
///   gloo/config.h>`. Only torch's libraries are linked, never Debian's `libgloo.so`.
/// - NCCL (CUDA ranks): compiled whenever [`nccl_paths`] finds `nccl.h` and the CUDA host
///   headers (`cuda_runtime_api.h`, `crt/host_config.h`, `nv/target`) of the pinned NVIDIA
///   wheels that `tools/provision.sh` installs next to torch, which is every provisioned build,
///   CI included. NCCL builds also link `libtorch_cuda`, `libc10_cuda` and the wheels'
///   `libnccl.so.2` and `libcudart.so.13` ([`link_torch`]).
fn build_dist_shim(libtorch: &Path, nccl: &Result<NcclPaths, String>) {
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_GLOO_INCLUDE");
    let mut build = torch_cpp(libtorch);
    build.file("csrc/dist_shim.cpp");

    match gloo_include() {
        Ok(dir) => {
            build
                .include(dir)
                .define("USE_C10D_GLOO", None)
                .define("VOLTTRAIN_GLOO", None);
            println!("cargo:rustc-env=VOLTTRAIN_GLOO_BUILD=compiled");
        }
        Err(why) => {
            // Loud: a build without Gloo cannot run data parallel on CPU ranks.
            println!("cargo:warning=Gloo is NOT compiled into this build: {why}");
            println!("cargo:rustc-env=VOLTTRAIN_GLOO_BUILD=not compiled: {why}");
        }
    }
    match nccl {
        Ok(paths) => {
            for d in &paths.include {
                build.include(d);
            }
            build
                .define("USE_C10D_NCCL", None)
                .define("VOLTTRAIN_NCCL", None);
            println!("cargo:rustc-cfg=volttrain_nccl");
            println!("cargo:rustc-env=VOLTTRAIN_NCCL_BUILD=compiled");
        }
        Err(why) => {
            // Loud: a build without NCCL cannot run multi-GPU data parallel.
            println!("cargo:warning=NCCL is NOT compiled into this build: {why}");
            println!("cargo:rustc-env=VOLTTRAIN_NCCL_BUILD=not compiled: {why}");
        }
    }
    build.compile("volttrain_dist");
}

/// The directory holding `gloo/config.h` (`VOLTTRAIN_GLOO_INCLUDE`, else `/usr/include` or
/// `/usr/local/include`), or why there is none.
fn gloo_include() -> Result<PathBuf, String> {
    if let Ok(dir) = env::var("VOLTTRAIN_GLOO_INCLUDE") {
        let dir = PathBuf::from(dir);
        return if dir.join("gloo/config.h").exists() {
            Ok(dir)
        } else {
            Err(format!(
                "VOLTTRAIN_GLOO_INCLUDE={} holds no gloo/config.h",
                dir.display()
            ))
        };
    }
    for d in ["/usr/include", "/usr/local/include"] {
        if Path::new(d).join("gloo/config.h").exists() {
            return Ok(PathBuf::from(d));
        }
    }
    Err(
        "gloo's headers (gloo/config.h) were not found; the torch wheel does not ship them. \
         Install them with `apt-get install libgloo-dev` (tools/provision.sh does it), or set \
         VOLTTRAIN_GLOO_INCLUDE to the directory holding gloo/, and build again"
            .into(),
    )
}

/// Links what the shims call: torch's libraries (and, with NCCL, the CUDA ones).
fn link_torch(libtorch: &Path, nccl: Option<&NcclPaths>) {
    // The shims' symbols come from torch's libraries; name them after the static archives so
    // the linker resolves them whatever order the upstream `-l` flags come in.
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
        // ProcessGroupNCCL and the CUDA allocator statistics live in libtorch_cuda and
        // libc10_cuda; NCCL and the CUDA runtime come from the pinned wheels, found at run time
        // through the RUNPATH (or `LD_LIBRARY_PATH`, which overrides it, on a machine with its
        // own torch).
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
fn nccl_paths(libtorch: &Path) -> Result<NcclPaths, String> {
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_NCCL_INCLUDE");
    println!("cargo:rerun-if-env-changed=VOLTTRAIN_CUDA_INCLUDE");
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
