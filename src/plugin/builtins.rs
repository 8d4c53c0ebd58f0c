//! VoltTrain's own components in the registry, under the names the YAML file uses.
//!
//! | kind | names |
//! |---|---|
//! | optimizer | `adamw`, `muon` |
//! | scheduler | `constant`, `constant_with_warmup`, `linear`, `cosine`, `wsd` |
//! | quantizer | `nf4`, `fp4`, `int8`, `fp8_e4m3`, `fp8_e5m2` |
//! | adapter | `lora` |
//! | grouper | `reference` |
//! | callback | `epoch_saver`, `metrics_jsonl`, `tensorboard`, `wandb`, `mlflow`, `sample_generations` |
//!
//! Schedules take their step counts from the run: `total_steps` comes from the trainer, and
//! every other option from the section (`{name: cosine, warmup_steps: 10, min_lr_ratio: 0.1}`).

use std::sync::Arc;

use serde_yaml::Value;

use super::{CallbackCtx, SchedulerCtx, parse_config};
use crate::adapter::{AdapterInjector, LoraConfig, LoraInjector};
use crate::callback::{
    Callback, EpochSaver, MetricsJsonl, Mlflow, MlflowConfig, TensorBoard, Wandb, WandbConfig,
};
use crate::error::{Error, Result};
use crate::optim::{AdamW, Muon, ParamGrouper, ReferenceGrouper, ReferenceGrouperConfig};
use crate::quant::{QuantConfig, Quantizer};
use crate::sched::{Scheduler, SchedulerConfig};

crate::register_optimizer!("adamw", super::optimizer_factory::<AdamW>);
crate::register_optimizer!("muon", super::optimizer_factory::<Muon>);

/// Builds a schedule: the section's options plus `type` (the registered name) and the run's
/// `total_steps` unless the section gives its own.
fn schedule(kind: &'static str, cfg: &Value, ctx: &SchedulerCtx) -> Result<Box<dyn Scheduler>> {
    let mut map = match cfg {
        Value::Null => serde_yaml::Mapping::new(),
        Value::Mapping(m) => m.clone(),
        other => {
            return Err(Error::config(
                "scheduler",
                format!("expected a mapping of settings, found {other:?}"),
            ));
        }
    };
    map.remove("name");
    map.insert("type".into(), kind.into());
    if kind != "constant" && kind != "constant_with_warmup" && !map.contains_key("total_steps") {
        map.insert("total_steps".into(), ctx.total_steps.into());
    }
    if kind != "constant" && !map.contains_key("warmup_steps") {
        map.insert("warmup_steps".into(), 0u64.into());
    }
    let sc: SchedulerConfig = serde_yaml::from_value(Value::Mapping(map))
        .map_err(|e| Error::config("scheduler", e.to_string()))?;
    sc.build()
}

macro_rules! schedule_factory {
    ($name:literal, $f:ident) => {
        fn $f(cfg: &Value, ctx: &SchedulerCtx) -> Result<Box<dyn Scheduler>> {
            schedule($name, cfg, ctx)
        }
        crate::register_scheduler!($name, $f);
    };
}
schedule_factory!("constant", sched_constant);
schedule_factory!("constant_with_warmup", sched_constant_warmup);
schedule_factory!("linear", sched_linear);
schedule_factory!("cosine", sched_cosine);
schedule_factory!("wsd", sched_wsd);

fn quantizer(kind: &'static str, cfg: &Value) -> Result<Arc<dyn Quantizer>> {
    let mut map = match cfg {
        Value::Null => serde_yaml::Mapping::new(),
        Value::Mapping(m) => m.clone(),
        other => {
            return Err(Error::config(
                "quantization",
                format!("expected a mapping of settings, found {other:?}"),
            ));
        }
    };
    map.remove("type");
    map.insert("name".into(), kind.into());
    let qc: QuantConfig = serde_yaml::from_value(Value::Mapping(map))
        .map_err(|e| Error::config("quantization", e.to_string()))?;
    qc.validate()?;
    qc.quantizer()
}

macro_rules! quant_factory {
    ($name:literal, $f:ident) => {
        fn $f(cfg: &Value) -> Result<Arc<dyn Quantizer>> {
            quantizer($name, cfg)
        }
        crate::register_quantizer!($name, $f);
    };
}
quant_factory!("nf4", quant_nf4);
quant_factory!("fp4", quant_fp4);
quant_factory!("int8", quant_int8);
quant_factory!("fp8_e4m3", quant_fp8_e4m3);
quant_factory!("fp8_e5m2", quant_fp8_e5m2);

fn lora(cfg: &Value) -> Result<Box<dyn AdapterInjector>> {
    let c: LoraConfig = parse_config("lora", cfg)?;
    c.validate()?;
    Ok(Box::new(LoraInjector::new(c)))
}
crate::register_adapter!("lora", lora);

fn reference(cfg: &Value) -> Result<Box<dyn ParamGrouper>> {
    let c: ReferenceGrouperConfig = parse_config("grouper", cfg)?;
    Ok(Box::new(ReferenceGrouper::new(c)))
}
crate::register_grouper!("reference", reference);

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EpochSaverConfig {
    keep_last: Option<usize>,
    every: Option<usize>,
}

fn epoch_saver(cfg: &Value, _: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: EpochSaverConfig = parse_config("callbacks.epoch_saver", cfg)?;
    let d = EpochSaver::default();
    Ok(Box::new(EpochSaver {
        keep_last: c.keep_last.unwrap_or(d.keep_last),
        every: c.every.unwrap_or(d.every),
    }))
}
crate::register_callback!("epoch_saver", epoch_saver);

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PathConfig {
    path: Option<std::path::PathBuf>,
}

fn metrics_jsonl(cfg: &Value, ctx: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: PathConfig = parse_config("callbacks.metrics_jsonl", cfg)?;
    Ok(Box::new(MetricsJsonl::new(
        c.path
            .unwrap_or_else(|| ctx.output_dir.join("metrics.jsonl")),
    )))
}
crate::register_callback!("metrics_jsonl", metrics_jsonl);

fn tensorboard(cfg: &Value, ctx: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: PathConfig = parse_config("callbacks.tensorboard", cfg)?;
    Ok(Box::new(TensorBoard::new(
        c.path.unwrap_or_else(|| ctx.output_dir.join("tensorboard")),
    )))
}
crate::register_callback!("tensorboard", tensorboard);

fn wandb(cfg: &Value, _: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: WandbConfig = parse_config("callbacks.wandb", cfg)?;
    Ok(Box::new(Wandb::new(c)?))
}
crate::register_callback!("wandb", wandb);

fn mlflow(cfg: &Value, _: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: MlflowConfig = parse_config("callbacks.mlflow", cfg)?;
    Ok(Box::new(Mlflow::new(c)?))
}
crate::register_callback!("mlflow", mlflow);

fn sample_generations(cfg: &Value, ctx: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let c: crate::callback::SampleGenerationsConfig =
        parse_config("callbacks.sample_generations", cfg)?;
    Ok(Box::new(crate::callback::SampleGenerations::new(
        c,
        &ctx.output_dir,
    )?))
}
crate::register_callback!("sample_generations", sample_generations);

#[cfg(test)]
mod tests {
    use super::super::{ComponentKind, build_scheduler, names};
    use super::*;

    #[test]
    fn builtins_are_listed() {
        assert_eq!(names(ComponentKind::Optimizer), vec!["adamw", "muon"]);
        assert!(names(ComponentKind::Scheduler).contains(&"wsd".to_string()));
        assert!(names(ComponentKind::Quantizer).contains(&"nf4".to_string()));
        assert_eq!(names(ComponentKind::Adapter), vec!["lora"]);
    }

    #[test]
    fn cosine_gets_total_steps_from_the_run() {
        let cfg: Value = serde_yaml::from_str("{warmup_steps: 10}").unwrap();
        let s = build_scheduler("cosine", &cfg, &SchedulerCtx { total_steps: 110 }).unwrap();
        // transformers' get_cosine_schedule_with_warmup: step 5 -> 0.5, step 60 -> 0.5, end -> 0
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        assert!((s.factor(60) - 0.5).abs() < 1e-12);
        assert!(s.factor(110).abs() < 1e-12);
    }
}
