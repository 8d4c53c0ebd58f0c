//! Adapters save and load their own state through `AdapterInjector::save` / `load`: a plugin
//! adapter registered by this test crate goes through the run's saver (`SftSaver`) and back into
//! a fresh model with the generic state file; LoRA through the same trait writes exactly the
//! PEFT files `save_peft_adapter` writes and takes its shape from them when loading.

mod common;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use serde_yaml::Value;
use tch::{Kind, Tensor};
use volttrain::adapter::{
    ADAPTER_STATE_FILE, AdapterInjector, LoraConfig, LoraInjector, Targets, save_peft_adapter,
};
use volttrain::callback::{ModelSaver, SftSaver};
use volttrain::data::Tokenizer;
use volttrain::model::{CausalLm, ForwardInput};
use volttrain::nn::LinearAdapter;
use volttrain::{Error, plugin};

use common::ToyLm;

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("test yaml")
}

// --- a plugin adapter: a trainable per-output scale, y = W x * (1 + s) --------------------------

#[derive(Debug)]
struct Scale {
    s: Tensor,
}

impl LinearAdapter for Scale {
    fn forward(&self, _x: &Tensor, base_out: Tensor, _train: bool) -> volttrain::Result<Tensor> {
        Ok(&base_out * (&self.s + 1.0))
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("scale".into(), self.s.shallow_clone())]
    }
    fn delta_weight(&self) -> volttrain::Result<Tensor> {
        Err(Error::invalid("test_scale cannot be merged"))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ScaleConfig {
    target: String,
}

#[derive(Debug)]
struct ScaleInjector {
    target: String,
}

impl AdapterInjector for ScaleInjector {
    fn name(&self) -> &str {
        "test_scale"
    }
    fn inject(&self, model: &mut dyn CausalLm) -> volttrain::Result<Vec<(String, Tensor)>> {
        model.freeze_base();
        let mut out = Vec::new();
        for (name, lin) in model.linears_mut() {
            if !name.ends_with(&format!(".{}", self.target)) {
                continue;
            }
            let s = Tensor::zeros([lin.shape().0], (Kind::Float, tch::Device::Cpu))
                .set_requires_grad(true);
            out.push((format!("{name}.scale"), s.shallow_clone()));
            lin.adapter = Some(Box::new(Scale { s }));
        }
        Ok(out)
    }
}

fn scale_injector(cfg: &Value) -> volttrain::Result<Box<dyn AdapterInjector>> {
    let c: ScaleConfig = plugin::parse_config("adapter", cfg)?;
    Ok(Box::new(ScaleInjector { target: c.target }))
}

volttrain::register_adapter!("test_scale", scale_injector);

// ------------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn logits(model: &dyn CausalLm) -> Tensor {
    let ids = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2]).view([2, 3]);
    let _g = tch::no_grad_guard();
    model
        .forward(
            &ForwardInput {
                input_ids: &ids,
                attention_mask: None,
                position_ids: None,
            },
            false,
        )
        .expect("forward")
}

/// Gives every parameter other values than a fresh injection has.
fn perturb(params: &[(String, Tensor)], seed: i64) {
    tch::manual_seed(seed);
    let _g = tch::no_grad_guard();
    for (_, t) in params {
        let mut t = t.shallow_clone();
        t.copy_(&(Tensor::randn_like(&t) * 0.3));
    }
}

#[test]
fn plugin_adapter_saves_through_the_run_saver_and_loads_back_equal() {
    let mut model = ToyLm::new(16, 8, 2, 0.0, 3);
    let base = logits(&model);
    let injector = plugin::build_adapter("test_scale", &yaml("{target: up}")).unwrap();
    let params = injector.inject(&mut model).unwrap();
    assert_eq!(params.len(), 2);
    perturb(&params, 7);
    let trained = logits(&model);
    assert!(!trained.allclose(&base, 1e-6, 1e-6, false));

    // the run's saver writes the adapter through its injector, beside tokenizer and config
    let tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let saver = SftSaver::new(Some(injector), Arc::new(tok), "model: {}\n");
    let dir = tempfile::tempdir().unwrap();
    saver.save_to(&model, dir.path()).unwrap();
    for f in [
        ADAPTER_STATE_FILE,
        "tokenizer.json",
        "volttrain_config.yaml",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    assert!(!dir.path().join("model.safetensors").exists());

    // a fresh model gets the same parameters and outputs back
    let mut fresh = ToyLm::new(16, 8, 2, 0.0, 3);
    let mut again = plugin::build_adapter("test_scale", &yaml("{target: up}")).unwrap();
    let loaded = again.load(&mut fresh, dir.path()).unwrap();
    assert_eq!(
        loaded.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        params.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((n, a), (_, b)) in params.iter().zip(&loaded) {
        assert!(a.equal(b), "{n} differs after the round trip");
        assert!(b.requires_grad(), "{n} is not trainable");
    }
    assert!(logits(&fresh).equal(&trained));

    // an adapter of another shape names the file and the tensors it cannot place
    let mut other = plugin::build_adapter("test_scale", &yaml("{target: down}")).unwrap();
    let e = other
        .load(&mut ToyLm::new(16, 8, 2, 0.0, 3), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(ADAPTER_STATE_FILE) && e.contains("model.layers.0.up.scale"),
        "{e}"
    );
}

#[test]
fn plugin_adapter_load_errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = ToyLm::new(16, 8, 2, 0.0, 3);
    let injector = plugin::build_adapter("test_scale", &yaml("{target: up}")).unwrap();
    // nothing saved yet
    let mut fresh = plugin::build_adapter("test_scale", &yaml("{target: up}")).unwrap();
    let e = fresh
        .load(&mut ToyLm::new(16, 8, 2, 0.0, 3), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(ADAPTER_STATE_FILE) && e.contains("missing"),
        "{e}"
    );
    // nothing trainable yet
    model.freeze_base();
    let e = injector.save(&model, dir.path()).unwrap_err().to_string();
    assert!(e.contains("test_scale"), "{e}");

    let params = injector.inject(&mut model).unwrap();
    injector.save(&model, dir.path()).unwrap();
    // a file written for a model of another width: the shape error names the tensor
    let mut wide = ToyLm::new(16, 12, 2, 0.0, 3);
    let e = fresh.load(&mut wide, dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.up.scale") && e.contains("expected shape"),
        "{e}"
    );
    // a file missing one of the parameters
    let one = [(params[0].0.clone(), params[0].1.shallow_clone())];
    Tensor::write_safetensors(&one, dir.path().join(ADAPTER_STATE_FILE)).unwrap();
    let e = fresh
        .load(&mut ToyLm::new(16, 8, 2, 0.0, 3), dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&params[1].0) && e.contains("missing"), "{e}");
}

#[test]
fn lora_through_the_trait_writes_the_peft_files_and_loads_their_shape() {
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target: Targets::Names(vec!["up".into(), "down".into()]),
        init_lora_weights: false,
        ..Default::default()
    };
    let mut model = ToyLm::new(16, 8, 2, 0.0, 5);
    let injector = plugin::build_adapter(
        "lora",
        &yaml("{r: 2, alpha: 4, dropout: 0.0, target: [up, down], init_lora_weights: false}"),
    )
    .unwrap();
    let params = injector.inject(&mut model).unwrap();
    perturb(&params, 9);
    let by_trait = tempfile::tempdir().unwrap();
    let direct = tempfile::tempdir().unwrap();
    injector.save(&model, by_trait.path()).unwrap();
    save_peft_adapter(&model, &cfg, direct.path()).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(by_trait.path().join(f)).unwrap(),
            std::fs::read(direct.path().join(f)).unwrap(),
            "{f} differs"
        );
    }

    // the rank and targets come from the directory, the dropout stays the injector's
    let mut fresh = ToyLm::new(16, 8, 2, 0.0, 5);
    let mut lora = LoraInjector::new(LoraConfig {
        r: 8,
        dropout: 0.1,
        target: Targets::Names(vec!["up".into()]),
        ..Default::default()
    });
    let loaded = lora.load(&mut fresh, by_trait.path()).unwrap();
    assert_eq!((lora.config.r, lora.config.alpha), (2, 4.0));
    // (PEFT's target_modules: the suffixes of every adapted module, sorted)
    assert_eq!(
        lora.config.target,
        Targets::Names(vec!["down".into(), "up".into()])
    );
    assert_eq!(lora.config.dropout, 0.1);
    assert_eq!(loaded.len(), params.len());
    for ((n, a), (m, b)) in params.iter().zip(&loaded) {
        assert_eq!(n, m);
        assert!(a.equal(b), "{n} differs after the round trip");
    }
    assert!(logits(&fresh).equal(&logits(&model)));
}
