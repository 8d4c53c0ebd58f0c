//! Test fixture for `tests/plugin_dylib.rs`. What it does depends on the library's file name
//! (tests load copies under different names):
//! - a name containing `register_panics`: registers scheduler `fixture_never`, then panics, so
//!   the host must report an error and add nothing;
//! - otherwise: registers scheduler `fixture_panicking_factory`, whose factory panics, optimizer
//!   `fixture_panicking_step`, whose `step` panics, and callback `fixture_panicking_hook`, whose
//!   `on_step_end` panics: the host must get errors, and go on running.

use volttrain::callback::{Callback, Control, StepMetrics};
use volttrain::optim::{DynOptimizer, ParamGroup, StateDict};
use volttrain::plugin::{CallbackCtx, PluginRegistrar, SchedulerCtx};
use volttrain::sched::Scheduler;

struct PanicStep {
    groups: Vec<ParamGroup>,
}

impl DynOptimizer for PanicStep {
    fn name(&self) -> &str {
        "fixture_panicking_step"
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }
    fn step(&mut self) -> volttrain::Result<()> {
        panic!("fixture step panicked on purpose")
    }
    fn state_dict(&self) -> volttrain::Result<StateDict> {
        Ok(StateDict::default())
    }
    fn load_state_dict(&mut self, _: &StateDict) -> volttrain::Result<()> {
        Ok(())
    }
}

fn panic_step(
    groups: Vec<ParamGroup>,
    _: &serde_yaml::Value,
) -> volttrain::Result<Box<dyn DynOptimizer>> {
    Ok(Box::new(PanicStep { groups }))
}

struct PanicHook;

impl Callback for PanicHook {
    fn on_step_end(&mut self, _: &mut Control<'_>, m: &StepMetrics) -> volttrain::Result<()> {
        panic!("fixture hook panicked on purpose at step {}", m.step)
    }
}

fn panic_hook(_: &serde_yaml::Value, _: &CallbackCtx) -> volttrain::Result<Box<dyn Callback>> {
    Ok(Box::new(PanicHook))
}

fn never(_: &serde_yaml::Value, _: &SchedulerCtx) -> volttrain::Result<Box<dyn Scheduler>> {
    Err(volttrain::Error::invalid(
        "fixture_never must not be registered",
    ))
}

fn panicking(_: &serde_yaml::Value, _: &SchedulerCtx) -> volttrain::Result<Box<dyn Scheduler>> {
    panic!("fixture factory panicked on purpose")
}

fn register(r: &mut PluginRegistrar) -> volttrain::Result<()> {
    let name = r
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains("register_panics") {
        r.register_scheduler("fixture_never", never);
        panic!("fixture register panicked on purpose");
    }
    r.register_scheduler("fixture_panicking_factory", panicking);
    r.register_optimizer("fixture_panicking_step", panic_step);
    r.register_callback("fixture_panicking_hook", panic_hook);
    Ok(())
}

volttrain::declare_plugin!(register);
