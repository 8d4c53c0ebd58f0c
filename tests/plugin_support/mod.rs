//! Shared by the `plugin_*` tests: builds a plugin crate of this workspace with the same cargo,
//! target directory and profile as the running test, and returns its library's path.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// `<target>/<profile>`, from the test executable's path `<target>/<profile>/deps/<test>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable under <target>/<profile>/deps")
        .to_path_buf()
}

/// Builds workspace package `package` (a cdylib plugin) and returns the path of its library.
pub fn plugin_library(package: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build for the plugin");
    assert!(status.success(), "cargo build -p {package} failed");
    let lib = profile_dir.join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.exists(), "{} was not built", lib.display());
    lib
}

/// `$VOLTTRAIN_PYTHON_REF`, or `python3`.
pub fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

/// Runs `reference/<script>` with `args`, failing the test with its stderr.
pub fn run_reference(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("reference")
        .join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .expect("run the python reference");
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A model with no layers, for driving callbacks outside a trainer.
pub struct NoModel {
    config: serde_json::Value,
}

impl NoModel {
    pub fn new() -> Self {
        NoModel {
            config: serde_json::json!({}),
        }
    }
}

fn no_model() -> volttrain::Error {
    volttrain::Error::invalid("NoModel has no layers")
}

impl volttrain::model::CausalLm for NoModel {
    fn architecture(&self) -> &str {
        "NoModel"
    }
    fn hf_config(&self) -> &serde_json::Value {
        &self.config
    }
    fn num_layers(&self) -> usize {
        0
    }
    fn vocab_size(&self) -> i64 {
        1
    }
    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }
    fn kind(&self) -> tch::Kind {
        tch::Kind::Float
    }
    fn embed(&self, _: &tch::Tensor) -> volttrain::Result<tch::Tensor> {
        Err(no_model())
    }
    fn prepare(
        &self,
        _: &volttrain::model::ForwardInput<'_>,
    ) -> volttrain::Result<volttrain::model::LayerCtx> {
        Err(no_model())
    }
    fn layer(
        &self,
        _: usize,
        _: &tch::Tensor,
        _: &volttrain::model::LayerCtx,
        _: bool,
    ) -> volttrain::Result<tch::Tensor> {
        Err(no_model())
    }
    fn head(&self, _: &tch::Tensor) -> volttrain::Result<tch::Tensor> {
        Err(no_model())
    }
    fn named_parameters(&self) -> Vec<(String, tch::Tensor)> {
        Vec::new()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut volttrain::nn::Linear)> {
        Vec::new()
    }
    fn linears(&self) -> Vec<(String, &volttrain::nn::Linear)> {
        Vec::new()
    }
    fn lm_head_param(&self) -> &str {
        "lm_head.weight"
    }
    fn embed_param(&self) -> &str {
        "model.embed_tokens.weight"
    }
    fn freeze_base(&mut self) {}
    fn checkpoint_tensors(&self) -> volttrain::Result<Vec<(String, tch::Tensor)>> {
        Ok(Vec::new())
    }
}

/// A saver that writes nothing.
pub struct NoSaver;

impl volttrain::callback::ModelSaver for NoSaver {
    fn save_to(&self, _: &dyn volttrain::model::CausalLm, _: &Path) -> volttrain::Result<()> {
        Ok(())
    }
}

/// Feeds `metrics` to `cb.on_step_end` in order, as a trainer would, stopping at the first stop
/// request. Returns the step at which the stop was requested and its reason.
pub fn drive_steps(
    cb: &mut dyn volttrain::callback::Callback,
    output_dir: &Path,
    metrics: &[volttrain::callback::StepMetrics],
) -> volttrain::Result<Option<(u64, String)>> {
    let model = NoModel::new();
    let saver = NoSaver;
    let mut stop = None;
    {
        let mut ctl =
            volttrain::callback::Control::new(0, 0, &model, &saver, output_dir, true, &mut stop);
        cb.on_fit_start(&mut ctl)?;
    }
    for m in metrics {
        let mut ctl = volttrain::callback::Control::new(
            m.step, m.epoch, &model, &saver, output_dir, true, &mut stop,
        );
        cb.on_step_end(&mut ctl, m)?;
        if let Some(reason) = ctl.stop_requested() {
            return Ok(Some((m.step, reason.to_string())));
        }
    }
    Ok(None)
}
