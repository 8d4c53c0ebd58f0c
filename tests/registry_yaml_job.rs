//! The YAML job builds every component kind through the registry by its `name:`: an adapter, a
//! quantizer, a grouper (and the optimizer its groups name) registered by this test crate (a
//! host) are used by `run_sft` from their config sections, as the built-ins are.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_yaml::Value;
use tch::Tensor;
use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
use volttrain::config::SftConfig;
use volttrain::model::CausalLm;
use volttrain::optim::{
    GroupSpec, Optimizer, ParamGroup, ParamGrouper, ParamInfo, StateDict, param_infos,
};
use volttrain::plugin;
use volttrain::quant::{QuantizedTensor, Quantizer};
use volttrain::sft::{RunOptions, run_sft};

/// Calls into this crate's components, by kind.
static INJECTED: AtomicUsize = AtomicUsize::new(0);
static QUANTIZED: AtomicUsize = AtomicUsize::new(0);
static GROUPED: AtomicUsize = AtomicUsize::new(0);
static STEPPED: AtomicUsize = AtomicUsize::new(0);

// --- adapter: LoRA on `q_proj` only, rank from the section ----------------------------------

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct QOnlyConfig {
    rank: i64,
}

#[derive(Debug)]
struct QOnly(LoraInjector);

impl AdapterInjector for QOnly {
    fn name(&self) -> &str {
        "test_q_only"
    }
    fn inject(&self, model: &mut dyn CausalLm) -> volttrain::Result<Vec<(String, Tensor)>> {
        INJECTED.fetch_add(1, Ordering::SeqCst);
        self.0.inject(model)
    }
}

fn q_only(cfg: &Value) -> volttrain::Result<Box<dyn AdapterInjector>> {
    let c: QOnlyConfig = plugin::parse_config("adapter", cfg)?;
    Ok(Box::new(QOnly(LoraInjector::new(LoraConfig {
        r: c.rank,
        target: Targets::Names(vec!["q_proj".into()]),
        ..LoraConfig::default()
    }))))
}
volttrain::register_adapter!("test_q_only", q_only);

// --- quantizer: the built-in int8, counted ---------------------------------------------------

#[derive(Debug)]
struct CountedInt8(Arc<dyn Quantizer>);

impl Quantizer for CountedInt8 {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn quantize(&self, w: &Tensor) -> volttrain::Result<Box<dyn QuantizedTensor>> {
        QUANTIZED.fetch_add(1, Ordering::SeqCst);
        self.0.quantize(w)
    }
}

fn counted_int8(_: &Value) -> volttrain::Result<Arc<dyn Quantizer>> {
    Ok(Arc::new(CountedInt8(plugin::build_quantizer(
        "int8",
        &Value::Null,
    )?)))
}
volttrain::register_quantizer!("test_counted_int8", counted_int8);

// --- grouper: one group, stepped by the optimizer the section names ---------------------------

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct OneGroupConfig {
    optimizer: String,
}

#[derive(Debug)]
struct OneGroup(String);

impl ParamGrouper for OneGroup {
    fn name(&self) -> &str {
        "test_yaml_one_group"
    }
    fn group(&self, params: &[ParamInfo]) -> volttrain::Result<Vec<GroupSpec>> {
        GROUPED.fetch_add(1, Ordering::SeqCst);
        Ok(vec![GroupSpec {
            name: "all".into(),
            optimizer: self.0.clone(),
            lr_mult: 1.0,
            weight_decay: None,
            params: params.iter().map(|p| p.name.clone()).collect(),
        }])
    }
}

fn one_group(cfg: &Value) -> volttrain::Result<Box<dyn ParamGrouper>> {
    let c: OneGroupConfig = plugin::parse_config("grouper", cfg)?;
    Ok(Box::new(OneGroup(c.optimizer)))
}
volttrain::register_grouper!("test_yaml_one_group", one_group);

// --- optimizer: plain SGD, named only by the grouper's GroupSpec ------------------------------

struct Sgd(Vec<ParamGroup>);

impl Optimizer for Sgd {
    type Config = ();
    fn new(groups: Vec<ParamGroup>, _: ()) -> volttrain::Result<Self> {
        Ok(Sgd(groups))
    }
    fn name(&self) -> &str {
        "test_yaml_sgd"
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.0
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.0
    }
    fn step(&mut self) -> volttrain::Result<()> {
        STEPPED.fetch_add(1, Ordering::SeqCst);
        let _g = tch::no_grad_guard();
        for g in &mut self.0 {
            for p in &mut g.params {
                let grad = p.tensor.grad();
                if grad.defined() {
                    let _ = p.tensor.f_sub_(&(grad * g.lr));
                }
            }
        }
        Ok(())
    }
    fn state_dict(&self) -> volttrain::Result<StateDict> {
        Ok(StateDict::default())
    }
    fn load_state_dict(&mut self, _: &StateDict) -> volttrain::Result<()> {
        Ok(())
    }
}
volttrain::register_optimizer!("test_yaml_sgd", plugin::optimizer_factory::<Sgd>);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config(out: &Path, sections: &str) -> SftConfig {
    let yaml = format!(
        "model: {{path: {model}, device: cpu}}\n\
         dataset: {{path: {data}, max_seq_len: 64}}\n\
         training: {{output_dir: {out}, max_steps: 2, batch_size: 2, lr: 0.01, seed: 3, \
         tensorboard: false, log_every: 1}}\n{sections}\n",
        model = root().join("assets/tiny-llama").display(),
        data = root().join("assets/data/train.jsonl").display(),
        out = out.display(),
    );
    SftConfig::from_yaml_str(&yaml, None, &[]).expect("the job config")
}

#[test]
fn host_adapter_quantizer_grouper_and_group_optimizer_come_from_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = config(
        &out,
        "adapter: {name: test_q_only, rank: 2}\n\
         quantization: {name: test_counted_int8}\n\
         grouper: {name: test_yaml_one_group, optimizer: test_yaml_sgd}",
    );
    let summary = run_sft(&cfg, RunOptions::default()).expect("the run");
    assert_eq!(summary.steps, 2);
    assert_eq!(INJECTED.load(Ordering::SeqCst), 1, "adapter injected once");
    // 4 layers x 7 projections of the tiny Llama, quantized while loading
    assert_eq!(
        QUANTIZED.load(Ordering::SeqCst),
        28,
        "base linears quantized"
    );
    assert_eq!(GROUPED.load(Ordering::SeqCst), 1, "grouper called once");
    assert_eq!(
        STEPPED.load(Ordering::SeqCst),
        2,
        "the group's optimizer stepped"
    );
    // only the adapter trained: LoRA on q_proj, rank 2
    let trained = Tensor::read_safetensors(out.join("last/trainable.safetensors")).unwrap();
    assert_eq!(
        trained.len(),
        4 * 2,
        "{:?}",
        trained.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(
        trained
            .iter()
            .all(|(n, t)| n.contains("q_proj.lora_") && t.size().contains(&2)),
        "{:?}",
        trained
            .iter()
            .map(|(n, t)| (n, t.size()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn unknown_names_in_yaml_sections_list_the_registered_ones() {
    let dir = tempfile::tempdir().unwrap();
    for (section, kind, known) in [
        ("adapter: {name: nope}", "adapter", "test_q_only"),
        ("grouper: {name: nope}", "grouper", "test_yaml_one_group"),
        (
            "quantization: {name: nope}\nlora: {rank: 2}",
            "quantizer",
            "test_counted_int8",
        ),
    ] {
        let cfg = config(&dir.path().join(kind), section);
        let e = run_sft(&cfg, RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(kind) && e.contains("nope") && e.contains(known),
            "{section}: {e}"
        );
    }
}

#[test]
fn param_infos_give_hosts_the_reference_grouping() {
    let model = volttrain::model::load_model(
        root().join("assets/tiny-llama"),
        &volttrain::model::LoadOptions::default(),
    )
    .unwrap();
    let infos = param_infos(model.as_ref());
    assert_eq!(infos.len(), model.named_parameters().len());
    let groups = volttrain::optim::ReferenceGrouper::default()
        .group(&infos)
        .unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert!(
        names.contains(&"muon")
            && names.contains(&"adamw_embed")
            && names.contains(&"adamw_no_decay"),
        "{names:?}"
    );
}
