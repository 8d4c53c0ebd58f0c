//! `volttrain env`: the JSON schema tools read (`--json`, with its `distributed_backends` list)
//! and the text form, checked against what this process itself sees (libtorch, the build's
//! NCCL, the fused kernels, the CUDA devices).

use std::process::Command;

fn env_json() -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .args(["env", "--json"])
        .env_remove("OMP_NUM_THREADS")
        .output()
        .expect("run volttrain env --json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("env --json prints one JSON object")
}

#[test]
fn env_json_schema_and_values() {
    let v = env_json();
    let obj = v.as_object().unwrap();
    // Every key, with its JSON type (the schema tools rely on).
    let want = [
        ("volttrain_version", "string"),
        ("libtorch_version", "string"),
        ("libtorch_loaded_version", "string|null"),
        ("libtorch_path", "string|null"),
        ("cuda_available", "bool"),
        ("cuda_device_count", "number"),
        ("cuda_error", "string|null"),
        ("cuda_devices", "array"),
        ("cudnn_available", "bool"),
        ("cpu_bf16_native", "bool"),
        ("cpu_fp8", "string"),
        ("distributed_backends", "array"),
        ("nccl_build", "string"),
        ("gloo_build", "string"),
        ("fused_cpu_kernels", "bool"),
        ("threads", "number"),
        ("cpu_cores", "number"),
        ("omp_num_threads", "string|null"),
    ];
    let ty = |x: &serde_json::Value| match x {
        serde_json::Value::String(_) => "string",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Null => "null",
        serde_json::Value::Object(_) => "object",
    };
    for (k, t) in want {
        let got = obj.get(k).unwrap_or_else(|| panic!("missing key {k}: {v}"));
        assert!(
            t.split('|').any(|x| x == ty(got)),
            "{k}: {t} expected, got {got}"
        );
    }
    assert_eq!(obj.len(), want.len(), "unexpected keys: {v}");

    assert_eq!(v["volttrain_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["libtorch_version"], volttrain::LIBTORCH_VERSION);
    // The libtorch this test links is the one the binary loaded (its RUNPATH).
    let lib = std::path::PathBuf::from(v["libtorch_path"].as_str().expect("libtorch_path"));
    assert!(lib.join("libtorch_cpu.so").exists(), "{}", lib.display());
    let loaded = v["libtorch_loaded_version"]
        .as_str()
        .expect("version.py read");
    assert!(loaded.starts_with(volttrain::LIBTORCH_VERSION), "{loaded}");

    let backends: Vec<&str> = v["distributed_backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    if volttrain::dist::nccl_available() {
        assert_eq!(backends, ["gloo", "nccl"]);
        assert_eq!(v["nccl_build"], "compiled");
    } else {
        assert_eq!(backends, ["gloo"]);
        let why = v["nccl_build"].as_str().unwrap();
        assert!(why.starts_with("not compiled: "), "{why}");
    }
    assert_eq!(v["nccl_build"], volttrain::dist::nccl_build_status());
    if volttrain::dist::gloo_available() {
        assert_eq!(v["gloo_build"], "compiled");
    } else {
        let why = v["gloo_build"].as_str().unwrap();
        assert!(why.starts_with("not compiled: "), "{why}");
    }
    assert_eq!(v["gloo_build"], volttrain::dist::gloo_build_status());
    assert_eq!(v["fused_cpu_kernels"], volttrain::fused::enabled());
    assert_eq!(v["cuda_available"], tch::Cuda::is_available());
    let n = tch::Cuda::device_count() as u64;
    assert_eq!(v["cuda_device_count"], n);
    let devices = v["cuda_devices"].as_array().unwrap();
    if v["cuda_error"].is_null() {
        assert_eq!(devices.len() as u64, n);
    }
    for d in devices {
        for k in [
            "index",
            "name",
            "capability",
            "total_memory_bytes",
            "bf16",
            "fp8",
        ] {
            assert!(d.get(k).is_some(), "device without {k}: {d}");
        }
    }
    assert!(v["threads"].as_i64().unwrap() >= 1);
    assert!(v["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(v["omp_num_threads"].is_null());
}

#[test]
fn env_text_names_each_item() {
    let out = Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .arg("env")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for k in [
        "VoltTrain",
        "libtorch",
        "libtorch path",
        "CUDA available",
        "CPU bf16",
        "distributed backends",
        "NCCL build",
        "Gloo build",
        "fused CPU kernels",
        "threads",
    ] {
        assert!(text.contains(k), "no `{k}` in:\n{text}");
    }
    let backends = if volttrain::dist::nccl_available() {
        "gloo, nccl"
    } else {
        "gloo"
    };
    assert!(text.contains(backends), "{text}");
}
