//! Dylib plugins: the declaration a plugin exports, the registrar it fills, and the loader.
//!
//! A plugin is a `cdylib` crate that depends on `volttrain` and ends with
//! `volttrain::declare_plugin!(register);`. The macro exports one C symbol,
//! [`DECLARATION_SYMBOL`], returning a `#[repr(C)]` [`PluginDeclaration`]. [`load_plugin`] opens
//! the library, reads the declaration, checks the ABI version, then the rustc, VoltTrain and
//! libtorch versions against the host's, and only then calls the register function, which runs
//! the plugin's `fn register(&mut PluginRegistrar) -> Result<()>` inside `catch_unwind` on the
//! plugin's side. The registered factories are added to the host's registry all at once.
//!
//! Rust values (`Box<dyn DynOptimizer>`, `serde_yaml::Value`, `tch::Tensor`, [`Error`]) cross
//! the boundary, which is sound only when both sides were built by the same rustc from the same
//! VoltTrain (and so the same `tch`, `serde_yaml` and allocator) against the same libtorch: that
//! is what the version check enforces.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::guard::panic_message;
use super::registry::{
    AdapterFactory, Builder, CallbackFactory, ComponentKind, Entry, Factory, GrouperFactory,
    OptimizerFactory, Origin, QuantizerFactory, SchedulerFactory, insert_all,
};
use crate::error::{Error, Result};

/// Version of the declaration layout, of the registrar protocol, and of the trait objects that
/// cross the boundary. Bumped on any change to [`PluginDeclaration`], to the register calling
/// convention, or to the methods of a trait whose objects a plugin hands the host
/// (`DynOptimizer`, `Scheduler`, `Callback`, `AdapterInjector`, `ParamGrouper`, `Quantizer`,
/// `QuantizedTensor`): a vtable laid out by another version of the trait would call the wrong
/// method, and two development builds can share a VoltTrain version. It is the first field of
/// the declaration so that it can be read before trusting anything else.
///
/// History: 1, the first; 2, `Callback::state_dict` and `Callback::load_state_dict`.
pub const PLUGIN_ABI_VERSION: u32 = 2;

/// The compiler that built this copy of VoltTrain (`rustc --version`).
pub const RUSTC_VERSION: &str = env!("VOLTTRAIN_RUSTC_VERSION");

/// This VoltTrain's version.
pub const VOLTTRAIN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The symbol every plugin exports (without the trailing NUL: `volttrain_plugin_declaration`).
pub const DECLARATION_SYMBOL: &str = "volttrain_plugin_declaration";

/// The plugin's register function as the host calls it: fills the registrar, returns null on
/// success or an error message made with `CString::into_raw` that the host takes back.
pub type RegisterFn = unsafe extern "C" fn(*mut PluginRegistrar) -> *mut c_char;

/// What a plugin declares about itself. Made by [`declare_plugin!`](crate::declare_plugin).
#[repr(C)]
pub struct PluginDeclaration {
    /// [`PLUGIN_ABI_VERSION`] of the VoltTrain the plugin was built with. First, and read alone
    /// before the other fields.
    pub abi_version: u32,
    /// NUL-terminated `rustc --version` of the plugin's compiler.
    pub rustc_version: *const c_char,
    /// NUL-terminated VoltTrain version the plugin was built against.
    pub volttrain_version: *const c_char,
    /// NUL-terminated libtorch version the plugin was built against.
    pub libtorch_version: *const c_char,
    /// NUL-terminated crate name of the plugin.
    pub plugin_name: *const c_char,
    /// NUL-terminated crate version of the plugin.
    pub plugin_version: *const c_char,
    /// Registers the plugin's components.
    pub register: RegisterFn,
}

// Every pointer in a declaration points to immutable 'static data.
unsafe impl Sync for PluginDeclaration {}
unsafe impl Send for PluginDeclaration {}

const fn c_ptr(s: &'static str) -> *const c_char {
    let b = s.as_bytes();
    assert!(
        !b.is_empty() && b[b.len() - 1] == 0,
        "declaration strings end with NUL"
    );
    b.as_ptr().cast()
}

const RUSTC_VERSION_NUL: &str = concat!(env!("VOLTTRAIN_RUSTC_VERSION"), "\0");
const VOLTTRAIN_VERSION_NUL: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
const LIBTORCH_VERSION_NUL: &str = "2.11.0\0";
const _: () = {
    // LIBTORCH_VERSION_NUL must spell crate::LIBTORCH_VERSION.
    let a = crate::LIBTORCH_VERSION.as_bytes();
    let b = LIBTORCH_VERSION_NUL.as_bytes();
    assert!(a.len() + 1 == b.len());
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == b[i]);
        i += 1;
    }
};

impl PluginDeclaration {
    /// The declaration of a plugin built with this VoltTrain: this crate's ABI, rustc, VoltTrain
    /// and libtorch versions. `name` and `version` end with NUL. Used by
    /// [`declare_plugin!`](crate::declare_plugin).
    pub const fn new(name: &'static str, version: &'static str, register: RegisterFn) -> Self {
        PluginDeclaration {
            abi_version: PLUGIN_ABI_VERSION,
            rustc_version: c_ptr(RUSTC_VERSION_NUL),
            volttrain_version: c_ptr(VOLTTRAIN_VERSION_NUL),
            libtorch_version: c_ptr(LIBTORCH_VERSION_NUL),
            plugin_name: c_ptr(name),
            plugin_version: c_ptr(version),
            register,
        }
    }
}

/// What a plugin's register function fills. Its methods run in the plugin (its own copy of
/// VoltTrain), so the panic guards they put around factories are the plugin's.
pub struct PluginRegistrar {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl PluginRegistrar {
    fn new(path: PathBuf) -> Self {
        PluginRegistrar {
            path,
            entries: Vec::new(),
        }
    }

    /// The library being loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers `factory` under `name`.
    pub fn register(&mut self, name: &str, factory: Factory) {
        let origin = Origin::Library(self.path.clone());
        self.entries.push(Entry {
            kind: factory.kind(),
            name: name.to_string(),
            builder: Builder::guarded(name, origin.clone(), factory),
            origin,
        });
    }

    /// Registers an optimizer factory under `name` (the YAML `optimizer` section's name).
    pub fn register_optimizer(&mut self, name: &str, factory: OptimizerFactory) {
        self.register(name, Factory::Optimizer(factory));
    }

    /// Registers a learning-rate schedule factory under `name` (the YAML `scheduler` section).
    pub fn register_scheduler(&mut self, name: &str, factory: SchedulerFactory) {
        self.register(name, Factory::Scheduler(factory));
    }

    /// Registers a quantized weight format under `name`: the YAML `quantization` section
    /// selects it, and saved tensors of that format reload through it.
    pub fn register_quantizer(&mut self, name: &str, factory: QuantizerFactory) {
        self.register(name, Factory::Quantizer(factory));
    }

    /// Registers an adapter injector factory under `name` (the YAML `adapter` section).
    pub fn register_adapter(&mut self, name: &str, factory: AdapterFactory) {
        self.register(name, Factory::Adapter(factory));
    }

    /// Registers a parameter grouper factory under `name` (the YAML `grouper` section).
    pub fn register_grouper(&mut self, name: &str, factory: GrouperFactory) {
        self.register(name, Factory::Grouper(factory));
    }

    /// Registers a callback factory under `name` (an entry of the YAML `callbacks` list).
    pub fn register_callback(&mut self, name: &str, factory: CallbackFactory) {
        self.register(name, Factory::Callback(factory));
    }
}

/// Runs a plugin's register function for the host; the body of the function that
/// [`declare_plugin!`](crate::declare_plugin) exports. A panic is caught here, on the plugin's
/// side, and returned as an error message: it never unwinds into the host.
///
/// # Safety
/// `registrar` is null or points to a live [`PluginRegistrar`] made by the host.
#[doc(hidden)]
pub unsafe fn run_register(
    registrar: *mut PluginRegistrar,
    register: fn(&mut PluginRegistrar) -> Result<()>,
) -> *mut c_char {
    let message = match unsafe { registrar.as_mut() } {
        None => "the host passed a null registrar".to_string(),
        Some(reg) => match catch_unwind(AssertUnwindSafe(|| register(reg))) {
            Ok(Ok(())) => return std::ptr::null_mut(),
            Ok(Err(e)) => format!("register failed: {e}"),
            Err(payload) => format!("register panicked: {}", panic_message(payload.as_ref())),
        },
    };
    let message = message.replace('\0', " ");
    CString::new(message).map_or(std::ptr::null_mut(), CString::into_raw)
}

/// Declares a dylib plugin: `volttrain::declare_plugin!(register);` at the root of a `cdylib`
/// crate, with `fn register(r: &mut volttrain::plugin::PluginRegistrar) -> volttrain::Result<()>`.
///
/// Exports `volttrain_plugin_declaration`, returning the plugin's [`PluginDeclaration`]: the ABI,
/// rustc, VoltTrain and libtorch versions it was built with, its crate name and version, and a
/// register function that runs `register` without ever unwinding into the host.
#[macro_export]
macro_rules! declare_plugin {
    ($register:path $(,)?) => {
        #[doc(hidden)]
        unsafe extern "C" fn __volttrain_plugin_register(
            registrar: *mut $crate::plugin::PluginRegistrar,
        ) -> *mut ::std::ffi::c_char {
            // SAFETY: the host passes a live registrar (see `load_plugin`).
            unsafe { $crate::plugin::__private::run_register(registrar, $register) }
        }

        #[doc(hidden)]
        static __VOLTTRAIN_PLUGIN_DECLARATION: $crate::plugin::PluginDeclaration =
            $crate::plugin::PluginDeclaration::new(
                concat!(env!("CARGO_PKG_NAME"), "\0"),
                concat!(env!("CARGO_PKG_VERSION"), "\0"),
                __volttrain_plugin_register,
            );

        /// The VoltTrain plugin entry point.
        #[unsafe(no_mangle)]
        pub extern "C" fn volttrain_plugin_declaration() -> *const $crate::plugin::PluginDeclaration
        {
            &__VOLTTRAIN_PLUGIN_DECLARATION
        }
    };
}

/// A loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Canonical path of the library.
    pub path: PathBuf,
    /// The plugin crate's name and version.
    pub name: String,
    /// The plugin crate's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// What it registered, sorted.
    pub components: Vec<(ComponentKind, String)>,
}

/// The versions a declaration states, read after its ABI version matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredVersions {
    pub(crate) rustc: String,
    pub(crate) volttrain: String,
    pub(crate) libtorch: String,
    pub(crate) name: String,
    pub(crate) version: String,
}

fn plugin_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Plugin {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a NUL-terminated string of a declaration.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that outlives the call.
unsafe fn read_str(path: &Path, field: &str, ptr: *const c_char) -> Result<String> {
    if ptr.is_null() {
        return Err(plugin_error(
            path,
            format!("the plugin declaration has a null `{field}`"),
        ));
    }
    Ok(unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned())
}

/// Checks a declaration against this host: the ABI version first (nothing else is read when it
/// differs), then the rustc, VoltTrain and libtorch versions, all reported at once.
///
/// # Safety
/// `decl` points to a declaration whose first field is a `u32`; when that field equals
/// [`PLUGIN_ABI_VERSION`], to a whole [`PluginDeclaration`] with valid string pointers.
pub(crate) unsafe fn check_declaration(
    path: &Path,
    decl: *const PluginDeclaration,
) -> Result<DeclaredVersions> {
    if decl.is_null() {
        return Err(plugin_error(
            path,
            format!("`{DECLARATION_SYMBOL}` returned a null declaration"),
        ));
    }
    // Only the first field is trusted before the ABI matches.
    let abi = unsafe { decl.cast::<u32>().read() };
    if abi != PLUGIN_ABI_VERSION {
        return Err(plugin_error(
            path,
            format!(
                "plugin ABI version {abi} does not match the host's ABI version \
                 {PLUGIN_ABI_VERSION}; rebuild the plugin against VoltTrain {VOLTTRAIN_VERSION}"
            ),
        ));
    }
    let d = unsafe { &*decl };
    let got = unsafe {
        DeclaredVersions {
            rustc: read_str(path, "rustc_version", d.rustc_version)?,
            volttrain: read_str(path, "volttrain_version", d.volttrain_version)?,
            libtorch: read_str(path, "libtorch_version", d.libtorch_version)?,
            name: read_str(path, "plugin_name", d.plugin_name)?,
            version: read_str(path, "plugin_version", d.plugin_version)?,
        }
    };
    let mut mismatches = Vec::new();
    if got.rustc != RUSTC_VERSION {
        mismatches.push(format!(
            "it was built with `{}` but the host with `{RUSTC_VERSION}`",
            got.rustc
        ));
    }
    if got.volttrain != VOLTTRAIN_VERSION {
        mismatches.push(format!(
            "it was built against VoltTrain {} but the host is VoltTrain {VOLTTRAIN_VERSION}",
            got.volttrain
        ));
    }
    if got.libtorch != crate::LIBTORCH_VERSION {
        mismatches.push(format!(
            "it was built for libtorch {} but the host uses libtorch {}",
            got.libtorch,
            crate::LIBTORCH_VERSION
        ));
    }
    if !mismatches.is_empty() {
        return Err(plugin_error(
            path,
            format!(
                "plugin `{}` {} does not match the host: {}. Rebuild the plugin with \
                 `{RUSTC_VERSION}` against VoltTrain {VOLTTRAIN_VERSION} and libtorch {} \
                 (or rebuild the host with the plugin's versions)",
                got.name,
                got.version,
                mismatches.join("; "),
                crate::LIBTORCH_VERSION
            ),
        ));
    }
    Ok(got)
}

#[derive(Default)]
struct Loader {
    /// Every library ever opened. Never dropped: code and vtables of the plugins are referenced
    /// from the registry, and unloading libraries with C++ static state is unsafe.
    libraries: Vec<libloading::Library>,
    loaded: BTreeMap<PathBuf, PluginInfo>,
}

fn loader() -> &'static Mutex<Loader> {
    static LOADER: Mutex<Loader> = Mutex::new(Loader {
        libraries: Vec::new(),
        loaded: BTreeMap::new(),
    });
    &LOADER
}

type DeclarationFn = unsafe extern "C" fn() -> *const PluginDeclaration;

/// Loads the plugin at `path` and registers its components into the host's registry.
/// Idempotent per canonical path: loading the same library again returns its first
/// [`PluginInfo`]. The library stays loaded for the life of the process, whatever happens.
///
/// Errors (all [`Error::Plugin`] naming the path unless said otherwise): the file is missing or
/// not a loadable library; it has no `volttrain_plugin_declaration` symbol (not a VoltTrain
/// plugin); its ABI, rustc, VoltTrain or libtorch version differs from the host's (both versions
/// and what to rebuild are named); its register function fails or panics; it registers a name
/// that is already registered ([`Error::DuplicateComponent`], nothing of the plugin is added).
pub fn load_plugin(path: &Path) -> Result<PluginInfo> {
    let canonical = path.canonicalize().map_err(|e| {
        plugin_error(
            path,
            format!("cannot find the plugin library: {e}; check the `plugins:` path"),
        )
    })?;
    let mut loader = loader().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(info) = loader.loaded.get(&canonical) {
        return Ok(info.clone());
    }

    // SAFETY: loading runs the library's initializers; a VoltTrain plugin's are those of Rust
    // and libtorch code built like the host's. The declaration check below guards the rest.
    let library = unsafe { libloading::Library::new(&canonical) }.map_err(|e| {
        plugin_error(
            &canonical,
            format!("cannot load it as a shared library: {e}"),
        )
    })?;
    let symbol = format!("{DECLARATION_SYMBOL}\0");
    // SAFETY: the symbol, when present, is the function `declare_plugin!` exports.
    let declaration_fn: Result<DeclarationFn> =
        unsafe { library.get::<DeclarationFn>(symbol.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| {
                plugin_error(
                    &canonical,
                    format!(
                        "not a VoltTrain plugin: it has no `{DECLARATION_SYMBOL}` symbol ({e}); \
                         a plugin is a cdylib crate that calls `volttrain::declare_plugin!`"
                    ),
                )
            });
    // Kept loaded from here on: nothing is ever unloaded.
    loader.libraries.push(library);
    let declaration_fn = declaration_fn?;

    // SAFETY: the function takes no arguments and returns a pointer to a static declaration.
    let decl = unsafe { declaration_fn() };
    // SAFETY: the first field is a u32 in every ABI version; the rest is read only when the ABI
    // version matches.
    let declared = unsafe { check_declaration(&canonical, decl) }?;

    let mut registrar = PluginRegistrar::new(canonical.clone());
    // SAFETY: versions checked, so the declaration has this layout and `register` this
    // signature; the registrar outlives the call.
    let err = unsafe { ((*decl).register)(&mut registrar) };
    if !err.is_null() {
        // SAFETY: made by `CString::into_raw` in `run_register`, in a plugin that shares the
        // host's allocator (same rustc and VoltTrain, checked above).
        let msg = unsafe { CString::from_raw(err) }
            .to_string_lossy()
            .into_owned();
        return Err(plugin_error(&canonical, msg));
    }

    let mut components: Vec<(ComponentKind, String)> = registrar
        .entries
        .iter()
        .map(|e| (e.kind, e.name.clone()))
        .collect();
    components.sort();
    insert_all(registrar.entries)?;

    let info = PluginInfo {
        path: canonical.clone(),
        name: declared.name,
        version: declared.version,
        components,
    };
    loader.loaded.insert(canonical, info.clone());
    tracing::info!(
        plugin = %info.name,
        version = %info.version,
        path = %info.path.display(),
        "loaded plugin"
    );
    Ok(info)
}

/// Loads several plugins in order (the YAML `plugins:` list); relative paths are taken from
/// `base_dir` (the config file's directory).
pub fn load_plugins(paths: &[PathBuf], base_dir: &Path) -> Result<Vec<PluginInfo>> {
    paths
        .iter()
        .map(|p| {
            if p.is_absolute() {
                load_plugin(p)
            } else {
                load_plugin(&base_dir.join(p))
            }
        })
        .collect()
}

/// Plugins loaded so far, sorted by path.
pub fn loaded_plugins() -> Vec<PluginInfo> {
    let loader = loader().lock().unwrap_or_else(|e| e.into_inner());
    loader.loaded.values().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn never_called(_: *mut PluginRegistrar) -> *mut c_char {
        std::process::abort()
    }

    fn decl(
        rustc: &'static str,
        volttrain: &'static str,
        libtorch: &'static str,
    ) -> PluginDeclaration {
        let mut d = PluginDeclaration::new("fake\0", "0.1.0\0", never_called);
        d.rustc_version = c_ptr(rustc);
        d.volttrain_version = c_ptr(volttrain);
        d.libtorch_version = c_ptr(libtorch);
        d
    }

    #[test]
    fn matching_declaration_passes() {
        let d = PluginDeclaration::new("fake\0", "0.1.0\0", never_called);
        let got = unsafe { check_declaration(Path::new("/p.so"), &d) }.unwrap();
        assert_eq!(got.rustc, RUSTC_VERSION);
        assert_eq!(got.volttrain, VOLTTRAIN_VERSION);
        assert_eq!(got.libtorch, crate::LIBTORCH_VERSION);
        assert_eq!((got.name.as_str(), got.version.as_str()), ("fake", "0.1.0"));
        assert!(RUSTC_VERSION.starts_with("rustc "), "{RUSTC_VERSION}");
    }

    #[test]
    fn abi_mismatch_is_checked_before_anything_else() {
        // Only the first u32 is valid: a declaration of a future layout.
        let future: [u32; 1] = [PLUGIN_ABI_VERSION + 1];
        let e = unsafe { check_declaration(Path::new("/p.so"), future.as_ptr().cast()) }
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("plugin /p.so: "), "{e}");
        assert!(
            e.contains(&format!("plugin ABI version {}", PLUGIN_ABI_VERSION + 1))
                && e.contains(&format!("host's ABI version {PLUGIN_ABI_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn each_version_mismatch_names_both_versions() {
        let d = decl("rustc 1.0.0 (old)\0", "0.0.1\0", "1.13.0\0");
        let e = unsafe { check_declaration(Path::new("/p.so"), &d) }
            .unwrap_err()
            .to_string();
        for needle in [
            "`rustc 1.0.0 (old)`",
            &format!("`{RUSTC_VERSION}`"),
            "VoltTrain 0.0.1",
            &format!("VoltTrain {VOLTTRAIN_VERSION}"),
            "libtorch 1.13.0",
            &format!("libtorch {}", crate::LIBTORCH_VERSION),
            "Rebuild the plugin",
        ] {
            assert!(e.contains(needle), "`{needle}` missing from: {e}");
        }
        // Only the libtorch version differs: only it is reported.
        let mut d = PluginDeclaration::new("fake\0", "0.1.0\0", never_called);
        d.libtorch_version = c_ptr("2.10.0\0");
        let e = unsafe { check_declaration(Path::new("/p.so"), &d) }
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("libtorch 2.10.0") && !e.contains("built with `"),
            "{e}"
        );
    }

    #[test]
    fn null_fields_are_errors() {
        let mut d = PluginDeclaration::new("fake\0", "0.1.0\0", never_called);
        d.volttrain_version = std::ptr::null();
        let e = unsafe { check_declaration(Path::new("/p.so"), &d) }
            .unwrap_err()
            .to_string();
        assert!(e.contains("null `volttrain_version`"), "{e}");
        let e = unsafe { check_declaration(Path::new("/p.so"), std::ptr::null()) }.unwrap_err();
        assert!(e.to_string().contains("null declaration"));
    }

    fn panics(_: &mut PluginRegistrar) -> Result<()> {
        panic!("boom in register")
    }

    fn fails(_: &mut PluginRegistrar) -> Result<()> {
        Err(Error::invalid("bad setting"))
    }

    #[test]
    fn run_register_turns_panics_and_errors_into_messages() {
        let mut reg = PluginRegistrar::new("/p.so".into());
        for (f, want) in [
            (
                panics as fn(&mut PluginRegistrar) -> Result<()>,
                "register panicked: boom in register",
            ),
            (fails, "register failed: bad setting"),
        ] {
            let p = unsafe { run_register(&mut reg, f) };
            assert!(!p.is_null());
            let msg = unsafe { CString::from_raw(p) }.into_string().unwrap();
            assert_eq!(msg, want);
        }
        let p = unsafe { run_register(std::ptr::null_mut(), fails) };
        let msg = unsafe { CString::from_raw(p) }.into_string().unwrap();
        assert!(msg.contains("null registrar"));
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load_plugin(Path::new("/nonexistent/libnothing.so")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("plugin /nonexistent/libnothing.so: cannot find"),
            "{s}"
        );
    }
}
