//! Loading dylib plugins: registration with the library as origin, idempotence, the version
//! check (before anything else is called), non-plugin libraries, panics in register and in
//! factories, duplicates between libraries.

mod plugin_support;

use std::path::{Path, PathBuf};

use volttrain::Error;
use volttrain::plugin::{self, ComponentKind, Origin, SchedulerCtx};

/// A copy of `lib` named `name` in a fresh directory (kept for the life of the process, as the
/// library loaded from it is).
fn copy_as(lib: &Path, name: &str) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let to = dir.join(name);
    std::fs::copy(lib, &to).unwrap();
    to
}

#[test]
fn lion_plugin_registers_with_its_path_and_loads_once() {
    let lib = plugin_support::plugin_library("volttrain-lion");
    let canonical = lib.canonicalize().unwrap();
    let info = plugin::load_plugin(&lib).unwrap();
    assert_eq!(info.path, canonical);
    assert_eq!(info.name, "volttrain-lion");
    assert_eq!(info.version, plugin::VOLTTRAIN_VERSION);
    assert_eq!(
        info.components,
        vec![(ComponentKind::Optimizer, "lion".to_string())]
    );

    let entry = plugin::list()
        .into_iter()
        .find(|e| e.kind == ComponentKind::Optimizer && e.name == "lion")
        .expect("lion listed");
    assert_eq!(entry.origin, Origin::Library(canonical.clone()));
    let text = plugin::format_list();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("lion "))
        .expect("lion in format_list");
    assert!(line.ends_with(&canonical.display().to_string()), "{line}");

    // Loading again (through another spelling of the path) is a no-op returning the same info.
    let again = lib
        .parent()
        .unwrap()
        .join(".")
        .join(lib.file_name().unwrap());
    assert_eq!(plugin::load_plugin(&again).unwrap(), info);
    assert_eq!(
        plugin::list().iter().filter(|e| e.name == "lion").count(),
        1
    );
    assert!(plugin::loaded_plugins().contains(&info));
}

#[test]
fn second_library_with_the_same_name_is_a_duplicate_naming_both_paths() {
    let lib = plugin_support::plugin_library("volttrain-lion");
    let first = plugin::load_plugin(&lib).unwrap();
    let copy = copy_as(&lib, "libvolttrain_lion_copy.so");
    let e = plugin::load_plugin(&copy).unwrap_err();
    match &e {
        Error::DuplicateComponent {
            kind,
            name,
            first: a,
            second: b,
        } => {
            assert_eq!((*kind, name.as_str()), ("optimizer", "lion"));
            assert_eq!(a, &first.path.display().to_string());
            assert_eq!(b, &copy.canonicalize().unwrap().display().to_string());
        }
        other => panic!("expected a duplicate, got {other}"),
    }
    // The first registration is untouched.
    let entry = plugin::list()
        .into_iter()
        .find(|e| e.name == "lion")
        .unwrap();
    assert_eq!(entry.origin, Origin::Library(first.path));
    plugin::check_registry().unwrap();
}

#[test]
fn version_mismatch_names_both_versions_and_never_calls_register() {
    // The fixture's register function aborts the process if it is ever called.
    let lib = plugin_support::plugin_library("volttrain-test-bad-version");
    let e = plugin::load_plugin(&lib).unwrap_err();
    assert!(matches!(e, Error::Plugin { .. }), "{e:?}");
    let msg = e.to_string();
    let host_rustc = format!("`{}`", plugin::RUSTC_VERSION);
    let host_volttrain = format!("VoltTrain {}", plugin::VOLTTRAIN_VERSION);
    let host_libtorch = format!("libtorch {}", volttrain::LIBTORCH_VERSION);
    for needle in [
        lib.canonicalize().unwrap().display().to_string().as_str(),
        "`rustc 1.0.0 (a59807616 2015-05-15)`",
        &host_rustc,
        "VoltTrain 0.0.1-fixture",
        &host_volttrain,
        "libtorch 1.13.1",
        &host_libtorch,
        "Rebuild the plugin",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    // Nothing was registered, and trying again gives the same error (the library stays loaded).
    assert_eq!(plugin::load_plugin(&lib).unwrap_err().to_string(), msg);
    assert!(
        !plugin::loaded_plugins()
            .iter()
            .any(|p| p.path == lib.canonicalize().unwrap())
    );
}

/// libc10 (part of libtorch, already loaded by this process): a shared library that is not a
/// VoltTrain plugin.
fn libc10() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc10.so"))
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var("LIBTORCH")
                .ok()
                .map(|lt| Path::new(&lt).join("lib/libc10.so"))
        })
        .expect("libc10.so is loaded or LIBTORCH is set")
}

#[test]
fn shared_library_without_the_entry_point_is_rejected_with_its_path() {
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)); // libtorch in use
    let lib = libc10();
    let msg = plugin::load_plugin(&lib).unwrap_err().to_string();
    let path = lib.canonicalize().unwrap().display().to_string();
    assert!(
        msg.starts_with(&format!("plugin {path}: not a VoltTrain plugin")),
        "{msg}"
    );
    assert!(msg.contains("volttrain_plugin_declaration"), "{msg}");
}

#[test]
fn file_that_is_not_a_library_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnot_a_plugin.so");
    std::fs::write(&fake, "just text\n").unwrap();
    let msg = plugin::load_plugin(&fake).unwrap_err().to_string();
    let path = fake.canonicalize().unwrap().display().to_string();
    assert!(
        msg.starts_with(&format!("plugin {path}: cannot load it")),
        "{msg}"
    );
    let missing = dir.path().join("libmissing.so");
    let msg = plugin::load_plugin(&missing).unwrap_err().to_string();
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("cannot find"),
        "{msg}"
    );
}

#[test]
fn panicking_register_is_an_error_and_registers_nothing() {
    let lib = plugin_support::plugin_library("volttrain-test-panic");
    let copy = copy_as(&lib, "libfixture_register_panics.so");
    let e = plugin::load_plugin(&copy).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Plugin { .. }), "{e:?}");
    assert!(
        msg.contains("register panicked: fixture register panicked on purpose"),
        "{msg}"
    );
    assert!(msg.contains("libfixture_register_panics.so"), "{msg}");
    // What it registered before panicking was not added.
    assert!(!plugin::names(ComponentKind::Scheduler).contains(&"fixture_never".to_string()));
    let e = plugin::build_scheduler(
        "fixture_never",
        &serde_yaml::Value::Null,
        &SchedulerCtx::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnknownComponent { .. }), "{e}");
}

#[test]
fn panics_in_factories_and_methods_are_errors_not_crashes() {
    let lib = plugin_support::plugin_library("volttrain-test-panic");
    let copy = copy_as(&lib, "libfixture_factory.so");
    plugin::load_plugin(&copy).unwrap();
    let ctx = SchedulerCtx { total_steps: 10 };
    for _ in 0..2 {
        let e =
            plugin::build_scheduler("fixture_panicking_factory", &serde_yaml::Value::Null, &ctx)
                .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Plugin { .. }), "{e:?}");
        assert!(
            msg.contains("the factory of scheduler `fixture_panicking_factory` panicked: fixture factory panicked on purpose"),
            "{msg}"
        );
        assert!(msg.contains("libfixture_factory.so"), "{msg}");
    }

    // A panic inside a built component's method is an error too.
    let mut opt = plugin::build_optimizer(
        "fixture_panicking_step",
        Vec::new(),
        &serde_yaml::Value::Null,
    )
    .unwrap();
    for _ in 0..2 {
        let e = opt.step().unwrap_err();
        assert!(matches!(e, Error::Plugin { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("optimizer `fixture_panicking_step` in `step` panicked: fixture step panicked on purpose"),
            "{msg}"
        );
    }
    assert!(opt.state_dict().is_ok());

    let dir = tempfile::tempdir().unwrap();
    let ctx = plugin::CallbackCtx {
        output_dir: dir.path().into(),
    };
    let mut cb =
        plugin::build_callback("fixture_panicking_hook", &serde_yaml::Value::Null, &ctx).unwrap();
    let metrics = [volttrain::callback::StepMetrics {
        step: 4,
        ..Default::default()
    }];
    let e = plugin_support::drive_steps(cb.as_mut(), dir.path(), &metrics).unwrap_err();
    assert!(
        e.to_string()
            .contains("callback `fixture_panicking_hook` in `on_step_end` panicked: fixture hook panicked on purpose at step 4"),
        "{e}"
    );
}

#[test]
fn plugins_list_paths_are_relative_to_the_config_directory() {
    let lib = plugin_support::plugin_library("volttrain-lion");
    let dir = lib.parent().unwrap();
    let infos = plugin::load_plugins(&[PathBuf::from(lib.file_name().unwrap())], dir).unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].path, lib.canonicalize().unwrap());
    let e = plugin::load_plugins(&[PathBuf::from("libabsent.so")], dir).unwrap_err();
    assert!(
        e.to_string()
            .contains(&dir.join("libabsent.so").display().to_string()),
        "{e}"
    );
}
