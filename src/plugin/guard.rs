//! Panic guards around registered components.
//!
//! Every component the registry builds is wrapped so that a panic inside a fallible method
//! (`step`, a callback hook, `quantize`/`load` and the quantized tensor's `dequantize`/`linear`,
//! `inject`/`save`/`load`, `group`) comes back as an error naming the
//! component, the method and where the component came from. The wrappers are made by the
//! factory closures in [`super::registry::Builder::guarded`]; for a dylib plugin those closures
//! were compiled in the plugin, so the `catch_unwind` below is the plugin's own and can catch the
//! plugin's panics (a panic may not unwind from one copy of `std` into another: it would abort).
//! [`Scheduler`](crate::sched::Scheduler)s are not wrapped: `factor` cannot report an error.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use super::registry::Origin;
use crate::adapter::AdapterInjector;
use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::optim::{DynOptimizer, GroupSpec, ParamGroup, ParamGrouper, ParamInfo, StateDict};
use crate::quant::{QuantizedTensor, Quantizer};

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Calls `f`, turning a panic into an error: `"{context} panicked: {message}"`, an
/// [`Error::Plugin`] for a library's component, else an [`Error::InvalidArgument`] naming the
/// origin.
pub(crate) fn catch<T>(context: &str, origin: &Origin, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = format!("{context} panicked: {}", panic_message(payload.as_ref()));
            Err(match origin {
                Origin::Library(path) => Error::Plugin {
                    path: path.clone(),
                    msg,
                },
                other => Error::invalid(format!("{msg} (registered by {other})")),
            })
        }
    }
}

/// A component with panic guards on its fallible methods.
pub(crate) struct Guarded<T: ?Sized> {
    /// `optimizer `lion``, for messages.
    what: String,
    origin: Origin,
    inner: Box<T>,
}

impl<T: ?Sized> Guarded<T> {
    pub(crate) fn new(what: &str, origin: &Origin, inner: Box<T>) -> Self {
        Guarded {
            what: what.to_string(),
            origin: origin.clone(),
            inner,
        }
    }

    fn call<R>(&self, method: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        catch(&format!("{} in `{method}`", self.what), &self.origin, f)
    }
}

impl<T: ?Sized> std::fmt::Debug for Guarded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guarded({} from {})", self.what, self.origin)
    }
}

impl DynOptimizer for Guarded<dyn DynOptimizer> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn groups(&self) -> &[ParamGroup] {
        self.inner.groups()
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        self.inner.groups_mut()
    }
    fn step(&mut self) -> Result<()> {
        let context = format!("{} in `step`", self.what);
        catch(&context, &self.origin, || self.inner.step())
    }
    fn zero_grad(&mut self) {
        self.inner.zero_grad()
    }
    fn state_dict(&self) -> Result<StateDict> {
        self.call("state_dict", || self.inner.state_dict())
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let context = format!("{} in `load_state_dict`", self.what);
        catch(&context, &self.origin, || self.inner.load_state_dict(state))
    }
}

macro_rules! guarded_hook {
    ($hook:ident ( $($arg:ident : $ty:ty),* )) => {
        fn $hook(&mut self, ctl: &mut Control<'_> $(, $arg: $ty)*) -> Result<()> {
            let context = format!("{} in `{}`", self.what, stringify!($hook));
            catch(&context, &self.origin, || self.inner.$hook(ctl $(, $arg)*))
        }
    };
}

impl Callback for Guarded<dyn Callback> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    guarded_hook!(on_fit_start());
    guarded_hook!(on_fit_end());
    guarded_hook!(on_epoch_start());
    guarded_hook!(on_epoch_end());
    guarded_hook!(on_step_end(metrics: &StepMetrics));
    guarded_hook!(on_eval_end(metrics: &EvalMetrics));
    guarded_hook!(on_save(dir: &Path));
    fn on_error(&mut self, error: &Error) {
        // Nothing to report a panic to: the run is already failing with `error`.
        let _ = catch_unwind(AssertUnwindSafe(|| self.inner.on_error(error)));
    }
    fn summary(&self) -> Option<serde_json::Value> {
        catch_unwind(AssertUnwindSafe(|| self.inner.summary())).unwrap_or(None)
    }
    fn state_dict(&self) -> Result<Option<serde_json::Value>> {
        self.call("state_dict", || self.inner.state_dict())
    }
    fn load_state_dict(&mut self, state: serde_json::Value) -> Result<()> {
        let context = format!("{} in `load_state_dict`", self.what);
        catch(&context, &self.origin, || self.inner.load_state_dict(state))
    }
}

impl AdapterInjector for Guarded<dyn AdapterInjector> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn inject(&self, model: &mut dyn CausalLm) -> Result<Vec<(String, tch::Tensor)>> {
        self.call("inject", || self.inner.inject(model))
    }
    fn save(&self, model: &dyn CausalLm, dir: &Path) -> Result<()> {
        self.call("save", || self.inner.save(model, dir))
    }
    fn load(&mut self, model: &mut dyn CausalLm, dir: &Path) -> Result<Vec<(String, tch::Tensor)>> {
        let context = format!("{} in `load`", self.what);
        catch(&context, &self.origin, || self.inner.load(model, dir))
    }
}

impl ParamGrouper for Guarded<dyn ParamGrouper> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn group(&self, params: &[ParamInfo]) -> Result<Vec<GroupSpec>> {
        self.call("group", || self.inner.group(params))
    }
}

/// A quantizer behind an `Arc`, with a guarded `quantize`.
#[derive(Debug)]
pub(crate) struct GuardedQuantizer {
    pub(crate) what: String,
    pub(crate) origin: Origin,
    pub(crate) inner: Arc<dyn Quantizer>,
}

impl Quantizer for GuardedQuantizer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn quantize(&self, weight: &tch::Tensor) -> Result<Box<dyn QuantizedTensor>> {
        let inner = catch(
            &format!("{} in `quantize`", self.what),
            &self.origin,
            || self.inner.quantize(weight),
        )?;
        Ok(Box::new(Guarded::new(&self.what, &self.origin, inner)))
    }
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, tch::Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        let inner = catch(&format!("{} in `load`", self.what), &self.origin, || {
            self.inner.load(shape, parts)
        })?;
        Ok(Box::new(Guarded::new(&self.what, &self.origin, inner)))
    }
}

impl QuantizedTensor for Guarded<dyn QuantizedTensor> {
    fn format(&self) -> &str {
        self.inner.format()
    }
    fn shape(&self) -> (i64, i64) {
        self.inner.shape()
    }
    fn dequantize(&self, kind: tch::Kind) -> Result<tch::Tensor> {
        self.call("dequantize", || self.inner.dequantize(kind))
    }
    fn storage_bytes(&self) -> usize {
        self.inner.storage_bytes()
    }
    fn linear(&self, x: &tch::Tensor) -> Result<tch::Tensor> {
        self.call("linear", || self.inner.linear(x))
    }
    fn named_tensors(&self) -> Vec<(String, tch::Tensor)> {
        self.inner.named_tensors()
    }
}
