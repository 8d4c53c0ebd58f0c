//! Test fixture for `tests/plugin_dylib.rs`. What it does depends on the library's file name
//! (tests load copies under different names):
//! - a name containing `register_panics`: registers scheduler `fixture_never`, then panics, so
//!   the host must report an error and add nothing;
//! - otherwise: registers scheduler `fixture_panicking_factory`, whose factory panics, so the
//!   host must get an error from `build_scheduler`.

use volttrain::plugin::{PluginRegistrar, SchedulerCtx};
use volttrain::sched::Scheduler;

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
    Ok(())
}

volttrain::declare_plugin!(register);
