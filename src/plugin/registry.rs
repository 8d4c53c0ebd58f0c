//! The registry of named component factories.
//!
//! Static registrations are const [`ComponentDescriptor`]s collected with `inventory`
//! ([`register_optimizer!`](crate::register_optimizer) and friends). They are read once, sorted
//! by kind, name and origin, and merged into one table that dylib plugins add to at run time
//! ([`super::load_plugin`]). Nothing depends on registration order: a name registered twice is
//! kept as a duplicate, reported by [`check_registry`] and by any attempt to build it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_yaml::Value;

use super::guard::{Guarded, GuardedQuantizer, catch};
use crate::adapter::AdapterInjector;
use crate::callback::Callback;
use crate::error::{Error, Result};
use crate::optim::{DynOptimizer, Optimizer, ParamGroup, ParamGrouper};
use crate::quant::Quantizer;
use crate::sched::Scheduler;

/// Where a registered component comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Registered by VoltTrain itself.
    BuiltIn,
    /// Registered statically by the host application; holds its crate name.
    Host(String),
    /// Registered by a dylib plugin loaded from this path.
    Library(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("built-in"),
            Origin::Host(krate) => write!(f, "host ({krate})"),
            Origin::Library(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The extension points that have a registry. Declared in alphabetical order, so sorting by
/// kind and sorting by kind name agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    /// An [`AdapterInjector`](crate::adapter::AdapterInjector) (`adapter:`).
    Adapter,
    /// A [`Callback`] (`callbacks:`).
    Callback,
    /// A [`ParamGrouper`] (`grouper:`).
    Grouper,
    /// An optimizer (`optimizer:`).
    Optimizer,
    /// A [`Quantizer`] (`quantization:`).
    Quantizer,
    /// A [`Scheduler`] (`scheduler:`).
    Scheduler,
}

impl ComponentKind {
    /// Every kind, in sort order.
    pub const ALL: [ComponentKind; 6] = [
        ComponentKind::Adapter,
        ComponentKind::Callback,
        ComponentKind::Grouper,
        ComponentKind::Optimizer,
        ComponentKind::Quantizer,
        ComponentKind::Scheduler,
    ];

    /// Lower-case name, as in the YAML file and in messages (`optimizer`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Adapter => "adapter",
            ComponentKind::Callback => "callback",
            ComponentKind::Grouper => "grouper",
            ComponentKind::Optimizer => "optimizer",
            ComponentKind::Quantizer => "quantizer",
            ComponentKind::Scheduler => "scheduler",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a scheduler factory knows of the run.
#[derive(Debug, Clone, Default)]
pub struct SchedulerCtx {
    /// Optimizer steps the run will make.
    pub total_steps: u64,
}

/// What a callback factory knows of the run.
#[derive(Debug, Clone, Default)]
pub struct CallbackCtx {
    /// The run's output directory.
    pub output_dir: PathBuf,
}

/// Builds an optimizer over parameter groups from its config section.
pub type OptimizerFactory = fn(Vec<ParamGroup>, &Value) -> Result<Box<dyn DynOptimizer>>;
/// Builds a learning-rate schedule from its config section.
pub type SchedulerFactory = fn(&Value, &SchedulerCtx) -> Result<Box<dyn Scheduler>>;
/// Builds a quantizer from its config section.
pub type QuantizerFactory = fn(&Value) -> Result<Arc<dyn Quantizer>>;
/// Builds an adapter injector from its config section.
pub type AdapterFactory = fn(&Value) -> Result<Box<dyn AdapterInjector>>;
/// Builds a parameter grouper from its config section.
pub type GrouperFactory = fn(&Value) -> Result<Box<dyn ParamGrouper>>;
/// Builds a callback from its config section.
pub type CallbackFactory = fn(&Value, &CallbackCtx) -> Result<Box<dyn Callback>>;

/// A factory of one kind.
#[derive(Clone, Copy)]
pub enum Factory {
    /// Builds an adapter injector.
    Adapter(AdapterFactory),
    /// Builds a callback.
    Callback(CallbackFactory),
    /// Builds a parameter grouper.
    Grouper(GrouperFactory),
    /// Builds an optimizer over parameter groups.
    Optimizer(OptimizerFactory),
    /// Builds a quantizer.
    Quantizer(QuantizerFactory),
    /// Builds a learning-rate schedule.
    Scheduler(SchedulerFactory),
}

impl Factory {
    /// The kind of component this factory builds.
    pub const fn kind(&self) -> ComponentKind {
        match self {
            Factory::Adapter(_) => ComponentKind::Adapter,
            Factory::Callback(_) => ComponentKind::Callback,
            Factory::Grouper(_) => ComponentKind::Grouper,
            Factory::Optimizer(_) => ComponentKind::Optimizer,
            Factory::Quantizer(_) => ComponentKind::Quantizer,
            Factory::Scheduler(_) => ComponentKind::Scheduler,
        }
    }
}

impl fmt::Debug for Factory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Factory::{}", self.kind())
    }
}

/// A static registration, made by the `register_*!` macros and collected with `inventory`.
#[derive(Debug)]
pub struct ComponentDescriptor {
    /// Name used in the YAML file (`optimizer: { name: lion }`).
    pub name: &'static str,
    /// The function that builds the component; its variant is the component's kind.
    pub factory: Factory,
    /// `CARGO_PKG_NAME` at the registration site.
    pub package: &'static str,
    /// `module_path!()` at the registration site.
    pub module: &'static str,
}

impl ComponentDescriptor {
    /// A descriptor; use the `register_*!` macros rather than calling this.
    pub const fn new(
        name: &'static str,
        factory: Factory,
        package: &'static str,
        module: &'static str,
    ) -> Self {
        ComponentDescriptor {
            name,
            factory,
            package,
            module,
        }
    }

    /// Built-in when registered inside VoltTrain, otherwise the registering host crate.
    pub fn origin(&self) -> Origin {
        let krate = self.module.split("::").next().unwrap_or(self.module);
        if krate == "volttrain" {
            Origin::BuiltIn
        } else if self.package != "volttrain" {
            Origin::Host(self.package.to_string())
        } else {
            // An example, test or bench of the volttrain package itself.
            Origin::Host(krate.to_string())
        }
    }
}

inventory::collect!(ComponentDescriptor);

/// One registered component, as [`list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RegistryEntry {
    /// The extension point it is registered for.
    pub kind: ComponentKind,
    /// The name the YAML file selects it by.
    pub name: String,
    /// Who registered it: VoltTrain, the host program, or a plugin library (with its path).
    pub origin: Origin,
}

type OptimizerBuilder =
    dyn Fn(Vec<ParamGroup>, &Value) -> Result<Box<dyn DynOptimizer>> + Send + Sync;
type SchedulerBuilder = dyn Fn(&Value, &SchedulerCtx) -> Result<Box<dyn Scheduler>> + Send + Sync;
type QuantizerBuilder = dyn Fn(&Value) -> Result<Arc<dyn Quantizer>> + Send + Sync;
type AdapterBuilder = dyn Fn(&Value) -> Result<Box<dyn AdapterInjector>> + Send + Sync;
type GrouperBuilder = dyn Fn(&Value) -> Result<Box<dyn ParamGrouper>> + Send + Sync;
type CallbackBuilder = dyn Fn(&Value, &CallbackCtx) -> Result<Box<dyn Callback>> + Send + Sync;

/// A factory wrapped so that a panic inside it comes back as an error.
#[derive(Clone)]
pub(crate) enum Builder {
    Adapter(Arc<AdapterBuilder>),
    Callback(Arc<CallbackBuilder>),
    Grouper(Arc<GrouperBuilder>),
    Optimizer(Arc<OptimizerBuilder>),
    Quantizer(Arc<QuantizerBuilder>),
    Scheduler(Arc<SchedulerBuilder>),
}

impl Builder {
    /// Wraps `factory`, and the component it builds, with panic guards ([`super::guard`]). The
    /// wrappers are compiled where this function is compiled: for a dylib plugin that is the
    /// plugin's own copy of VoltTrain and of `std`, which is the copy that can catch the
    /// plugin's panics (a panic may not cross from one copy of `std` into another).
    pub(crate) fn guarded(name: &str, origin: Origin, factory: Factory) -> Builder {
        let what = format!("{} `{name}`", factory.kind());
        let context = format!("the factory of {what}");
        match factory {
            Factory::Adapter(f) => Builder::Adapter(Arc::new(move |cfg| {
                let inner = catch(&context, &origin, || f(cfg))?;
                Ok(Box::new(Guarded::new(&what, &origin, inner)))
            })),
            Factory::Callback(f) => Builder::Callback(Arc::new(move |cfg, ctx| {
                let inner = catch(&context, &origin, || f(cfg, ctx))?;
                Ok(Box::new(Guarded::new(&what, &origin, inner)))
            })),
            Factory::Grouper(f) => Builder::Grouper(Arc::new(move |cfg| {
                let inner = catch(&context, &origin, || f(cfg))?;
                Ok(Box::new(Guarded::new(&what, &origin, inner)))
            })),
            Factory::Optimizer(f) => Builder::Optimizer(Arc::new(move |groups, cfg| {
                let inner = catch(&context, &origin, || f(groups, cfg))?;
                Ok(Box::new(Guarded::new(&what, &origin, inner)))
            })),
            Factory::Quantizer(f) => Builder::Quantizer(Arc::new(move |cfg| {
                let inner = catch(&context, &origin, || f(cfg))?;
                Ok(Arc::new(GuardedQuantizer {
                    what: what.clone(),
                    origin: origin.clone(),
                    inner,
                }))
            })),
            // `Scheduler::factor` cannot report an error: only the factory is guarded.
            Factory::Scheduler(f) => Builder::Scheduler(Arc::new(move |cfg, ctx| {
                catch(&context, &origin, || f(cfg, ctx))
            })),
        }
    }
}

/// A component ready to be put into the registry.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) kind: ComponentKind,
    pub(crate) name: String,
    pub(crate) origin: Origin,
    pub(crate) builder: Builder,
}

type Key = (ComponentKind, String);

#[derive(Default)]
struct Registry {
    entries: BTreeMap<Key, Entry>,
    /// Every origin of a name registered more than once (sorted).
    duplicates: BTreeMap<Key, Vec<Origin>>,
}

impl Registry {
    fn from_inventory() -> Registry {
        let mut statics: Vec<(ComponentKind, &'static str, Origin, Factory)> =
            inventory::iter::<ComponentDescriptor>
                .into_iter()
                .map(|d| (d.factory.kind(), d.name, d.origin(), d.factory))
                .collect();
        // Registration order is unspecified: sort so that everything below is deterministic.
        statics.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        let mut reg = Registry::default();
        for (kind, name, origin, factory) in statics {
            let key = (kind, name.to_string());
            if let Some(first) = reg.entries.get(&key) {
                let first = first.origin.clone();
                let origins = reg.duplicates.entry(key).or_insert_with(|| vec![first]);
                origins.push(origin);
                continue;
            }
            let builder = Builder::guarded(name, origin.clone(), factory);
            reg.entries.insert(
                key,
                Entry {
                    kind,
                    name: name.to_string(),
                    origin,
                    builder,
                },
            );
        }
        reg
    }

    fn names(&self, kind: ComponentKind) -> Vec<&str> {
        self.entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
            .collect()
    }
}

fn registry() -> &'static RwLock<Registry> {
    static REGISTRY: OnceLock<RwLock<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(Registry::from_inventory()))
}

// The registry's invariants hold between statements (no code that can panic runs under the
// lock), so a poisoned lock still holds a consistent table.
fn read() -> RwLockReadGuard<'static, Registry> {
    registry().read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Registry> {
    registry().write().unwrap_or_else(|e| e.into_inner())
}

fn duplicate_error(kind: ComponentKind, name: &str, origins: &[Origin]) -> Error {
    let first = origins.first().map(Origin::to_string).unwrap_or_default();
    let second = origins
        .iter()
        .skip(1)
        .map(Origin::to_string)
        .collect::<Vec<_>>()
        .join(" and by ");
    Error::DuplicateComponent {
        kind: kind.as_str(),
        name: name.to_string(),
        first,
        second,
    }
}

/// Adds the components of a dylib plugin, all or none: a name that is already registered is an
/// error naming both origins, and nothing is added.
pub(crate) fn insert_all(entries: Vec<Entry>) -> Result<()> {
    let mut reg = write();
    let mut seen: BTreeMap<Key, &Origin> = BTreeMap::new();
    for e in &entries {
        let key = (e.kind, e.name.clone());
        let existing = reg
            .entries
            .get(&key)
            .map(|x| &x.origin)
            .or_else(|| seen.get(&key).copied());
        if let Some(first) = existing {
            return Err(Error::DuplicateComponent {
                kind: e.kind.as_str(),
                name: e.name.clone(),
                first: first.to_string(),
                second: e.origin.to_string(),
            });
        }
        seen.insert(key, &e.origin);
    }
    for e in entries {
        reg.entries.insert((e.kind, e.name.clone()), e);
    }
    Ok(())
}

fn lookup(kind: ComponentKind, name: &str) -> Result<Builder> {
    let reg = read();
    let key = (kind, name.to_string());
    if let Some(origins) = reg.duplicates.get(&key) {
        return Err(duplicate_error(kind, name, origins));
    }
    match reg.entries.get(&key) {
        Some(e) => Ok(e.builder.clone()),
        None => {
            let names = reg.names(kind);
            let known = if names.is_empty() {
                "none (register one, or load a plugin that does)".to_string()
            } else {
                names.join(", ")
            };
            Err(Error::UnknownComponent {
                kind: kind.as_str(),
                name: name.to_string(),
                known,
            })
        }
    }
}

fn kind_mismatch(kind: ComponentKind, name: &str) -> Error {
    Error::Internal(format!(
        "registry entry {kind} `{name}` holds a factory of another kind"
    ))
}

/// Builds the optimizer registered as `name` over `groups`, from its config section.
pub fn build_optimizer(
    name: &str,
    groups: Vec<ParamGroup>,
    cfg: &Value,
) -> Result<Box<dyn DynOptimizer>> {
    match lookup(ComponentKind::Optimizer, name)? {
        Builder::Optimizer(f) => f(groups, cfg),
        _ => Err(kind_mismatch(ComponentKind::Optimizer, name)),
    }
}

/// Builds the schedule registered as `name` from its config section.
pub fn build_scheduler(name: &str, cfg: &Value, ctx: &SchedulerCtx) -> Result<Box<dyn Scheduler>> {
    match lookup(ComponentKind::Scheduler, name)? {
        Builder::Scheduler(f) => f(cfg, ctx),
        _ => Err(kind_mismatch(ComponentKind::Scheduler, name)),
    }
}

/// Builds the quantizer registered as `name` from its config section.
pub fn build_quantizer(name: &str, cfg: &Value) -> Result<Arc<dyn Quantizer>> {
    match lookup(ComponentKind::Quantizer, name)? {
        Builder::Quantizer(f) => f(cfg),
        _ => Err(kind_mismatch(ComponentKind::Quantizer, name)),
    }
}

/// Builds the adapter injector registered as `name` from its config section.
pub fn build_adapter(name: &str, cfg: &Value) -> Result<Box<dyn AdapterInjector>> {
    match lookup(ComponentKind::Adapter, name)? {
        Builder::Adapter(f) => f(cfg),
        _ => Err(kind_mismatch(ComponentKind::Adapter, name)),
    }
}

/// Builds the parameter grouper registered as `name` from its config section.
pub fn build_grouper(name: &str, cfg: &Value) -> Result<Box<dyn ParamGrouper>> {
    match lookup(ComponentKind::Grouper, name)? {
        Builder::Grouper(f) => f(cfg),
        _ => Err(kind_mismatch(ComponentKind::Grouper, name)),
    }
}

/// Builds the callback registered as `name` from its config section.
pub fn build_callback(name: &str, cfg: &Value, ctx: &CallbackCtx) -> Result<Box<dyn Callback>> {
    match lookup(ComponentKind::Callback, name)? {
        Builder::Callback(f) => f(cfg, ctx),
        _ => Err(kind_mismatch(ComponentKind::Callback, name)),
    }
}

/// Everything registered, sorted by kind, then name, then origin. A duplicated name appears
/// once per registration.
pub fn list() -> Vec<RegistryEntry> {
    let reg = read();
    let mut out: Vec<RegistryEntry> = reg
        .entries
        .values()
        .map(|e| RegistryEntry {
            kind: e.kind,
            name: e.name.clone(),
            origin: e.origin.clone(),
        })
        .collect();
    for ((kind, name), origins) in &reg.duplicates {
        // The first origin is the entry already listed above.
        for origin in origins.iter().skip(1) {
            out.push(RegistryEntry {
                kind: *kind,
                name: name.clone(),
                origin: origin.clone(),
            });
        }
    }
    out.sort();
    out
}

/// Names registered for `kind`, sorted.
pub fn names(kind: ComponentKind) -> Vec<String> {
    read().names(kind).into_iter().map(str::to_string).collect()
}

/// Fails on the first (in sort order) name registered more than once, naming both origins.
pub fn check_registry() -> Result<()> {
    let reg = read();
    match reg.duplicates.iter().next() {
        Some(((kind, name), origins)) => Err(duplicate_error(*kind, name, origins)),
        None => Ok(()),
    }
}

/// What `volttrain plugins list` prints: every kind, and under it each component with its
/// origin.
pub fn format_list() -> String {
    let entries = list();
    let width = entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for kind in ComponentKind::ALL {
        out.push_str(kind.as_str());
        out.push_str(":\n");
        let mut any = false;
        for e in entries.iter().filter(|e| e.kind == kind) {
            out.push_str(&format!("  {:width$}  {}\n", e.name, e.origin));
            any = true;
        }
        if !any {
            out.push_str("  (none)\n");
        }
    }
    out
}

/// Deserializes a component's config section into `C`. A null section gives `C::default()`; a
/// `name` key (the section's selector, `optimizer: { name: lion, ... }`) is ignored. `key` names
/// the section in errors (`optimizer`).
pub fn parse_config<C>(key: &str, cfg: &Value) -> Result<C>
where
    C: Default + serde::de::DeserializeOwned,
{
    match cfg {
        Value::Null => Ok(C::default()),
        Value::Mapping(map) => {
            let mut map = map.clone();
            map.remove("name");
            serde_yaml::from_value(Value::Mapping(map))
                .map_err(|e| Error::config(key, e.to_string()))
        }
        other => Err(Error::config(
            key,
            format!(
                "expected a mapping of settings, found {}",
                serde_yaml::to_string(other).unwrap_or_default().trim_end()
            ),
        )),
    }
}

/// A factory for any typed [`Optimizer`]: parses `O::Config` from the section and builds it.
/// `register_optimizer!("lion", volttrain::plugin::optimizer_factory::<Lion>)`.
pub fn optimizer_factory<O: Optimizer>(
    groups: Vec<ParamGroup>,
    cfg: &Value,
) -> Result<Box<dyn DynOptimizer>> {
    let config: O::Config = parse_config("optimizer", cfg)?;
    Ok(Box::new(O::new(groups, config)?))
}

#[doc(hidden)]
#[macro_export]
macro_rules! __register_component {
    ($variant:ident, $name:expr, $factory:expr) => {
        $crate::plugin::__private::inventory::submit! {
            $crate::plugin::ComponentDescriptor::new(
                $name,
                $crate::plugin::Factory::$variant($factory),
                env!("CARGO_PKG_NAME"),
                module_path!(),
            )
        }
    };
}

/// Registers an optimizer factory ([`OptimizerFactory`]) under a name, at item level:
/// `volttrain::register_optimizer!("lion", my_factory);`.
#[macro_export]
macro_rules! register_optimizer {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Optimizer, $name, $factory);
    };
}

/// Registers a scheduler factory ([`SchedulerFactory`]) under a name, at item level.
#[macro_export]
macro_rules! register_scheduler {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Scheduler, $name, $factory);
    };
}

/// Registers a quantizer factory ([`QuantizerFactory`]) under a name, at item level.
#[macro_export]
macro_rules! register_quantizer {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Quantizer, $name, $factory);
    };
}

/// Registers an adapter-injector factory ([`AdapterFactory`]) under a name, at item level.
#[macro_export]
macro_rules! register_adapter {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Adapter, $name, $factory);
    };
}

/// Registers a parameter-grouper factory ([`GrouperFactory`]) under a name, at item level.
#[macro_export]
macro_rules! register_grouper {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Grouper, $name, $factory);
    };
}

/// Registers a callback factory ([`CallbackFactory`]) under a name, at item level.
#[macro_export]
macro_rules! register_callback {
    ($name:expr, $factory:expr $(,)?) => {
        $crate::__register_component!(Callback, $name, $factory);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_display() {
        assert_eq!(Origin::BuiltIn.to_string(), "built-in");
        assert_eq!(Origin::Host("myapp".into()).to_string(), "host (myapp)");
        assert_eq!(
            Origin::Library("/x/libp.so".into()).to_string(),
            "/x/libp.so"
        );
    }

    #[test]
    fn descriptor_origin_from_registration_site() {
        fn f(_: &Value) -> Result<Box<dyn ParamGrouper>> {
            Err(Error::invalid("unused"))
        }
        let d =
            |package, module| ComponentDescriptor::new("x", Factory::Grouper(f), package, module);
        assert_eq!(
            d("volttrain", "volttrain::optim::adamw").origin(),
            Origin::BuiltIn
        );
        assert_eq!(
            d("my-app", "my_app::opt").origin(),
            Origin::Host("my-app".into())
        );
        assert_eq!(
            d("volttrain", "custom_optimizer").origin(),
            Origin::Host("custom_optimizer".into())
        );
    }

    #[test]
    fn duplicate_error_names_every_origin() {
        let e = duplicate_error(
            ComponentKind::Optimizer,
            "lion",
            &[
                Origin::BuiltIn,
                Origin::Host("a".into()),
                Origin::Library("/p.so".into()),
            ],
        );
        assert_eq!(
            e.to_string(),
            "duplicate optimizer `lion`: registered by built-in and by host (a) and by /p.so"
        );
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        beta: f64,
        steps: u32,
    }

    #[test]
    fn parse_config_ignores_name_and_rejects_unknown_keys() {
        let v: Value = serde_yaml::from_str("{name: lion, beta: 0.5}").unwrap();
        assert_eq!(
            parse_config::<Cfg>("optimizer", &v).unwrap(),
            Cfg {
                beta: 0.5,
                steps: 0
            }
        );
        assert_eq!(
            parse_config::<Cfg>("optimizer", &Value::Null).unwrap(),
            Cfg::default()
        );
        let bad: Value = serde_yaml::from_str("{bta: 0.5}").unwrap();
        let msg = parse_config::<Cfg>("optimizer", &bad)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`optimizer`") && msg.contains("bta"), "{msg}");
        let scalar: Value = serde_yaml::from_str("3").unwrap();
        assert!(parse_config::<Cfg>("optimizer", &scalar).is_err());
    }
}
