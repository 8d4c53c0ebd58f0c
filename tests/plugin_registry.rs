//! The static registry: one component of each kind registered by this test crate (a host),
//! built by name from YAML and checked for its effect; listing, unknown names, panicking
//! factories.

mod plugin_support;

use std::sync::Arc;

use serde_yaml::Value;
use tch::{Kind, Tensor};
use volttrain::Error;
use volttrain::adapter::AdapterInjector;
use volttrain::callback::{Callback, Control, StepMetrics};
use volttrain::model::CausalLm;
use volttrain::optim::{
    GroupSpec, NamedParam, Optimizer, ParamGroup, ParamGrouper, ParamInfo, StateDict,
};
use volttrain::plugin::{self, CallbackCtx, ComponentKind, Origin, SchedulerCtx};
use volttrain::quant::{QuantizedTensor, Quantizer};
use volttrain::sched::Scheduler;

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("test yaml")
}

// --- optimizer: plain SGD, p <- p - lr * g ----------------------------------------------------

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SgdConfig {
    lr: Option<f64>,
}

struct Sgd {
    groups: Vec<ParamGroup>,
}

impl Optimizer for Sgd {
    type Config = SgdConfig;
    fn new(mut groups: Vec<ParamGroup>, config: SgdConfig) -> volttrain::Result<Self> {
        if let Some(lr) = config.lr {
            groups.iter_mut().for_each(|g| g.lr = lr * g.lr_mult);
        }
        Ok(Sgd { groups })
    }
    fn name(&self) -> &str {
        "test_sgd"
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }
    fn step(&mut self) -> volttrain::Result<()> {
        let _g = tch::no_grad_guard();
        for g in &mut self.groups {
            for p in &mut g.params {
                let grad = p.tensor.grad();
                if grad.defined() {
                    let _ = p
                        .tensor
                        .f_sub_(&(grad * g.lr))
                        .map_err(|e| Error::invalid(e.to_string()))?;
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

volttrain::register_optimizer!("test_sgd", plugin::optimizer_factory::<Sgd>);

// --- scheduler: linear decay to zero over the run --------------------------------------------

#[derive(Debug)]
struct LinearDecay {
    total: u64,
}

impl Scheduler for LinearDecay {
    fn name(&self) -> &str {
        "test_linear_decay"
    }
    fn factor(&self, step: u64) -> f64 {
        1.0 - step as f64 / self.total as f64
    }
}

fn linear_decay(_: &Value, ctx: &SchedulerCtx) -> volttrain::Result<Box<dyn Scheduler>> {
    if ctx.total_steps == 0 {
        return Err(Error::config("scheduler", "total_steps must be > 0"));
    }
    Ok(Box::new(LinearDecay {
        total: ctx.total_steps,
    }))
}

volttrain::register_scheduler!("test_linear_decay", linear_decay);

// --- quantizer: symmetric per-tensor int8, scale = absmax / 127 --------------------------------

#[derive(Debug)]
struct Int8Tensor {
    codes: Tensor,
    scale: f64,
}

impl QuantizedTensor for Int8Tensor {
    fn format(&self) -> &str {
        "test_int8"
    }
    fn shape(&self) -> (i64, i64) {
        let s = self.codes.size();
        (s[0], s[1])
    }
    fn dequantize(&self, kind: Kind) -> volttrain::Result<Tensor> {
        Ok((self.codes.to_kind(Kind::Float) * self.scale).to_kind(kind))
    }
    fn storage_bytes(&self) -> usize {
        self.codes.numel() + 4
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![("codes".into(), self.codes.shallow_clone())]
    }
}

#[derive(Debug)]
struct Int8Quantizer;

impl Quantizer for Int8Quantizer {
    fn name(&self) -> &str {
        "test_int8"
    }
    fn quantize(&self, w: &Tensor) -> volttrain::Result<Box<dyn QuantizedTensor>> {
        if w.dim() != 2 {
            return Err(Error::invalid(format!(
                "test_int8 wants 2-D, got {:?}",
                w.size()
            )));
        }
        let scale = w.abs().max().double_value(&[]) / 127.0;
        let codes = (w / scale).round().clamp(-127, 127).to_kind(Kind::Int8);
        Ok(Box::new(Int8Tensor { codes, scale }))
    }
}

fn int8(_: &Value) -> volttrain::Result<Arc<dyn Quantizer>> {
    Ok(Arc::new(Int8Quantizer))
}

volttrain::register_quantizer!("test_int8", int8);

// --- adapter: freezes nothing and injects nothing: an error when nothing matches ---------------

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MatchConfig {
    target_modules: Vec<String>,
}

#[derive(Debug)]
struct MatchOnly {
    targets: Vec<String>,
}

impl AdapterInjector for MatchOnly {
    fn name(&self) -> &str {
        "test_match"
    }
    fn inject(&self, model: &mut dyn CausalLm) -> volttrain::Result<Vec<(String, Tensor)>> {
        let hits = model
            .linears_mut()
            .into_iter()
            .filter(|(n, _)| self.targets.iter().any(|t| n.ends_with(t.as_str())))
            .count();
        if hits == 0 {
            return Err(Error::invalid(format!(
                "test_match: no linear module matches {:?}",
                self.targets
            )));
        }
        Ok(Vec::new())
    }
}

fn match_only(cfg: &Value) -> volttrain::Result<Box<dyn AdapterInjector>> {
    let c: MatchConfig = plugin::parse_config("adapter", cfg)?;
    Ok(Box::new(MatchOnly {
        targets: c.target_modules,
    }))
}

volttrain::register_adapter!("test_match", match_only);

// --- grouper: every parameter in one group ----------------------------------------------------

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct OneGroupConfig {
    optimizer: String,
}

#[derive(Debug)]
struct OneGroup {
    optimizer: String,
}

impl ParamGrouper for OneGroup {
    fn name(&self) -> &str {
        "test_one_group"
    }
    fn group(&self, params: &[ParamInfo]) -> volttrain::Result<Vec<GroupSpec>> {
        Ok(vec![GroupSpec {
            name: "all".into(),
            optimizer: self.optimizer.clone(),
            lr_mult: 1.0,
            weight_decay: None,
            params: params.iter().map(|p| p.name.clone()).collect(),
        }])
    }
}

fn one_group(cfg: &Value) -> volttrain::Result<Box<dyn ParamGrouper>> {
    let c: OneGroupConfig = plugin::parse_config("grouper", cfg)?;
    Ok(Box::new(OneGroup {
        optimizer: c.optimizer,
    }))
}

volttrain::register_grouper!("test_one_group", one_group);

// --- callback: stop at a given step -----------------------------------------------------------

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StopAtConfig {
    step: u64,
}

struct StopAt {
    step: u64,
}

impl Callback for StopAt {
    fn name(&self) -> &str {
        "test_stop_at"
    }
    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> volttrain::Result<()> {
        if m.step >= self.step {
            ctl.request_stop(format!("reached step {}", self.step));
        }
        Ok(())
    }
}

fn stop_at(cfg: &Value, _: &CallbackCtx) -> volttrain::Result<Box<dyn Callback>> {
    let c: StopAtConfig = plugin::parse_config("callback", cfg)?;
    Ok(Box::new(StopAt { step: c.step }))
}

volttrain::register_callback!("test_stop_at", stop_at);

// --- a factory that panics --------------------------------------------------------------------

fn panicking(_: &Value, _: &CallbackCtx) -> volttrain::Result<Box<dyn Callback>> {
    panic!("host factory panicked on purpose")
}

volttrain::register_callback!("test_panicking", panicking);

#[derive(Debug)]
struct PanickyTensor;

impl QuantizedTensor for PanickyTensor {
    fn format(&self) -> &str {
        "panicky"
    }
    fn shape(&self) -> (i64, i64) {
        (1, 1)
    }
    fn dequantize(&self, _: Kind) -> volttrain::Result<Tensor> {
        panic!("dequantize panicked on purpose")
    }
    fn storage_bytes(&self) -> usize {
        0
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
}

#[derive(Debug)]
struct PanickyQuantizer;

impl Quantizer for PanickyQuantizer {
    fn name(&self) -> &str {
        "test_panicky_quant"
    }
    fn quantize(&self, _: &Tensor) -> volttrain::Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(PanickyTensor))
    }
}

fn panicky_quant(_: &Value) -> volttrain::Result<Arc<dyn Quantizer>> {
    Ok(Arc::new(PanickyQuantizer))
}

volttrain::register_quantizer!("test_panicky_quant", panicky_quant);

// ---------------------------------------------------------------------------------------------

#[test]
fn every_kind_is_listed_sorted_with_the_host_origin() {
    plugin::check_registry().unwrap();
    let all = plugin::list();
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    assert_eq!(all, sorted);
    let ours: Vec<(ComponentKind, &str)> = all
        .iter()
        .filter(|e| e.name.starts_with("test_"))
        .map(|e| (e.kind, e.name.as_str()))
        .collect();
    assert_eq!(
        ours,
        vec![
            (ComponentKind::Adapter, "test_match"),
            (ComponentKind::Callback, "test_panicking"),
            (ComponentKind::Callback, "test_stop_at"),
            (ComponentKind::Grouper, "test_one_group"),
            (ComponentKind::Optimizer, "test_sgd"),
            (ComponentKind::Quantizer, "test_int8"),
            (ComponentKind::Quantizer, "test_panicky_quant"),
            (ComponentKind::Scheduler, "test_linear_decay"),
        ]
    );
    let host = Origin::Host("plugin_registry".into());
    assert!(
        all.iter()
            .filter(|e| e.name.starts_with("test_"))
            .all(|e| e.origin == host)
    );

    let text = plugin::format_list();
    let kinds: Vec<&str> = text.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(
        kinds,
        [
            "adapter:",
            "callback:",
            "grouper:",
            "optimizer:",
            "quantizer:",
            "scheduler:"
        ]
    );
    let sgd = text.lines().find(|l| l.contains("test_sgd")).unwrap();
    assert!(sgd.trim_end().ends_with("host (plugin_registry)"), "{sgd}");
}

#[test]
fn optimizer_built_by_name_applies_its_rule() {
    let opts = (Kind::Float, tch::Device::Cpu);
    let w0 = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 4.0])
        .view([2, 2])
        .to_kind(opts.0);
    let w = w0.copy().set_requires_grad(true);
    let group = ParamGroup {
        name: "all".into(),
        params: vec![NamedParam {
            name: "w".into(),
            tensor: w.shallow_clone(),
        }],
        lr: 1.0,
        lr_mult: 0.5,
        weight_decay: 0.0,
    };
    let mut opt =
        plugin::build_optimizer("test_sgd", vec![group], &yaml("{name: test_sgd, lr: 0.2}"))
            .unwrap();
    assert_eq!(opt.groups()[0].lr, 0.1);
    // loss = sum(w^2) / 2, grad = w, so one step gives w (1 - lr).
    (&w * &w).sum(Kind::Float).multiply_scalar(0.5).backward();
    opt.step().unwrap();
    let want = &w0 * 0.9;
    assert!(
        w.detach().allclose(&want, 1e-7, 1e-7, false),
        "{w} vs {want}"
    );
    // lr_mult is kept by the scheduler rule: lr = base * mult * factor.
    let sched = plugin::build_scheduler(
        "test_linear_decay",
        &Value::Null,
        &SchedulerCtx { total_steps: 4 },
    )
    .unwrap();
    volttrain::sched::apply(sched.as_ref(), opt.as_mut(), 0.2, 1);
    assert!((opt.groups()[0].lr - 0.2 * 0.5 * 0.75).abs() < 1e-15);
}

#[test]
fn scheduler_quantizer_grouper_adapter_callback_built_by_name() {
    let ctx = SchedulerCtx { total_steps: 8 };
    let s = plugin::build_scheduler(
        "test_linear_decay",
        &yaml("{name: test_linear_decay}"),
        &ctx,
    )
    .unwrap();
    let got: Vec<f64> = (0..=8).map(|t| s.factor(t)).collect();
    let want: Vec<f64> = (0..=8).map(|t| 1.0 - t as f64 / 8.0).collect();
    assert_eq!(got, want);
    let e = plugin::build_scheduler("test_linear_decay", &Value::Null, &SchedulerCtx::default())
        .unwrap_err();
    assert!(e.to_string().contains("total_steps"), "{e}");

    let q = plugin::build_quantizer("test_int8", &Value::Null).unwrap();
    tch::manual_seed(1);
    let w = Tensor::randn([16, 8], (Kind::Float, tch::Device::Cpu));
    let qt = q.quantize(&w).unwrap();
    let scale = w.abs().max().double_value(&[]) / 127.0;
    let err = (qt.dequantize(Kind::Float).unwrap() - &w)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        err <= scale / 2.0 + 1e-7,
        "round-to-nearest error {err} > scale/2 {}",
        scale / 2.0
    );
    assert_eq!(qt.shape(), (16, 8));

    let g = plugin::build_grouper("test_one_group", &yaml("{optimizer: test_sgd}")).unwrap();
    let params = ["a.weight", "b.bias"].map(|n| ParamInfo {
        name: n.into(),
        shape: vec![2],
        role: volttrain::optim::ParamRole::Other,
    });
    let groups = g.group(&params).unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].optimizer, "test_sgd");
    assert_eq!(groups[0].params, vec!["a.weight", "b.bias"]);

    let a = plugin::build_adapter("test_match", &yaml("{target_modules: [q_proj]}")).unwrap();
    let mut model = plugin_support::NoModel::new();
    let e = a.inject(&mut model).unwrap_err().to_string();
    assert!(e.contains("q_proj"), "{e}");
    let e = plugin::build_adapter("test_match", &yaml("{target: [q_proj]}")).unwrap_err();
    assert!(e.to_string().contains("`adapter`"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let ctx = CallbackCtx {
        output_dir: dir.path().into(),
    };
    let mut cb = plugin::build_callback("test_stop_at", &yaml("{step: 3}"), &ctx).unwrap();
    let metrics: Vec<StepMetrics> = (1..=6)
        .map(|step| StepMetrics {
            step,
            loss: 1.0,
            ..Default::default()
        })
        .collect();
    let stopped = plugin_support::drive_steps(cb.as_mut(), dir.path(), &metrics).unwrap();
    assert_eq!(stopped, Some((3, "reached step 3".to_string())));
}

#[test]
fn unknown_name_lists_the_known_ones() {
    let e = plugin::build_scheduler("cosinus", &Value::Null, &SchedulerCtx::default()).unwrap_err();
    match &e {
        Error::UnknownComponent { kind, name, known } => {
            assert_eq!((*kind, name.as_str()), ("scheduler", "cosinus"));
            assert!(
                known.split(", ").any(|n| n == "test_linear_decay"),
                "{known}"
            );
        }
        other => panic!("expected UnknownComponent, got {other}"),
    }
    assert!(
        e.to_string()
            .starts_with("unknown scheduler `cosinus`; known: "),
        "{e}"
    );
    // Names of one kind are not found under another.
    assert!(plugin::build_quantizer("test_sgd", &Value::Null).is_err());
}

#[test]
fn panicking_factory_is_an_error_naming_component_and_origin() {
    let ctx = CallbackCtx::default();
    let e = plugin::build_callback("test_panicking", &Value::Null, &ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("callback `test_panicking` panicked: host factory panicked on purpose"),
        "{e}"
    );
    assert!(e.contains("host (plugin_registry)"), "{e}");
}

#[test]
fn panic_in_a_built_component_method_is_an_error() {
    let q = plugin::build_quantizer("test_panicky_quant", &Value::Null).unwrap();
    let w = Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu));
    let qt = q.quantize(&w).unwrap();
    assert_eq!(qt.format(), "panicky");
    for e in [
        qt.dequantize(Kind::Float).unwrap_err(),
        // The default `linear` dequantizes: the same panic, reported from `linear`.
        qt.linear(&w).unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(
            msg.contains("quantizer `test_panicky_quant` in `")
                && msg.contains("` panicked: dequantize panicked on purpose")
                && msg.contains("host (plugin_registry)"),
            "{msg}"
        );
    }
}
