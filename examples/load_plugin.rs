//! Template: loading a dylib plugin and building its components by name.
//!
//! Build the plugin and run:
//!
//! ```text
//! cargo build -p volttrain-lion
//! cargo run --example load_plugin                       # loads the lion plugin built above
//! cargo run --example load_plugin -- path/to/libmy_plugin.so
//! ```
//!
//! In a YAML run the same happens with `plugins: [path/to/libmy_plugin.so]`: with the lion
//! plugin, the end of `main` runs such a job (LoRA on the bundled tiny Llama, `optimizer: lion`).
//! The plugin must be built by the same rustc, against the same VoltTrain and libtorch as this
//! program: the loader checks that before calling anything in the library, and says what to
//! rebuild otherwise.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use volttrain::error::{Error, Result, TchResultExt};
use volttrain::optim::{NamedParam, ParamGroup};
use volttrain::plugin::{self, ComponentKind};
use volttrain::sft::{RunOptions, run_sft};

/// The lion plugin next to this example: `<target>/<profile>/examples/load_plugin` →
/// `<target>/<profile>/libvolttrain_lion.so`.
fn default_plugin() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("<current executable>", e))?;
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or_else(|| Error::invalid("cannot locate the target directory; pass a plugin path"))?;
    Ok(profile_dir.join(format!(
        "{}volttrain_lion{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )))
}

fn main() -> Result<()> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => default_plugin()?,
    };
    if !path.exists() {
        return Err(Error::Plugin {
            path,
            msg: "not found; build it with `cargo build -p volttrain-lion` or pass a path".into(),
        });
    }

    // Checks the versions, then registers the plugin's factories into this program's registry.
    let info = plugin::load_plugin(&path)?;
    println!(
        "loaded {} {} from {}",
        info.name,
        info.version,
        info.path.display()
    );
    for (kind, name) in &info.components {
        println!("  {kind} `{name}`");
    }
    println!();
    print!("{}", plugin::format_list());

    // The plugin's optimizers are built like built-ins: by name, from a YAML section.
    let lion_loaded = info
        .components
        .iter()
        .any(|(k, n)| *k == ComponentKind::Optimizer && n == "lion");
    if lion_loaded {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let target = Tensor::randn([8], opts);
        let w = Tensor::zeros([8], opts).set_requires_grad(true);
        let groups = vec![ParamGroup {
            name: "all".into(),
            params: vec![NamedParam {
                name: "w".into(),
                tensor: w.shallow_clone(),
            }],
            lr: 0.0,
            lr_mult: 1.0,
            weight_decay: 0.0,
        }];
        let section: serde_yaml::Value =
            serde_yaml::from_str("{ name: lion, lr: 0.02, betas: [0.9, 0.99] }")
                .map_err(|e| Error::config("optimizer", e.to_string()))?;
        let mut opt = plugin::build_optimizer("lion", groups, &section)?;
        for step in 0..=60 {
            opt.zero_grad();
            let loss = (&w - &target)
                .f_square()
                .and_then(|d| d.f_mean(Kind::Float))
                .ctx("loss")?;
            loss.f_backward().ctx("backward")?;
            opt.step()?;
            if step % 20 == 0 {
                println!("lion step {step:2}  loss {:.5}", loss.double_value(&[]));
            }
        }
        yaml_job(&path)?;
    }
    Ok(())
}

/// A fine-tuning job that loads the plugin from its `plugins:` list (a no-op here: a library is
/// loaded once per process) and trains LoRA with its optimizer, on the bundled assets.
fn yaml_job(plugin_path: &Path) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join("volttrain-load-plugin");
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    }
    let yaml = format!(
        "plugins: ['{plugin}']
model: {{ path: '{model}', device: cpu }}
lora: {{ rank: 8, alpha: 16 }}
dataset: {{ path: '{data}', max_seq_len: 256 }}
training: {{ output_dir: '{out}', max_steps: 5, batch_size: 4, lr: 1.0e-3, warmup_steps: 0 }}
optimizer: {{ name: lion, betas: [0.9, 0.99] }}
scheduler: {{ name: constant }}
",
        plugin = plugin_path.display(),
        model = root.join("assets/tiny-llama").display(),
        data = root.join("assets/data/train.jsonl").display(),
        out = out.display(),
    );
    let cfg = volttrain::config::SftConfig::from_yaml_str(&yaml, None, &[])?;
    let summary = run_sft(&cfg, RunOptions::default())?;
    println!(
        "\nYAML job with optimizer lion: {} steps, final train loss {:.4}, metrics in {}",
        summary.steps,
        summary.final_train_loss.unwrap_or(f64::NAN),
        out.join("metrics.jsonl").display()
    );
    Ok(())
}
