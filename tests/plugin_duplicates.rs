//! Two static registrations of one name: an error naming both origins, whatever the order.

use serde_yaml::Value;
use volttrain::Error;
use volttrain::plugin::{self, ComponentKind, Origin, SchedulerCtx};
use volttrain::sched::Scheduler;

#[derive(Debug)]
struct Constant(f64);

impl Scheduler for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn factor(&self, _: u64) -> f64 {
        self.0
    }
}

fn one(_: &Value, _: &SchedulerCtx) -> volttrain::Result<Box<dyn Scheduler>> {
    Ok(Box::new(Constant(1.0)))
}

fn half(_: &Value, _: &SchedulerCtx) -> volttrain::Result<Box<dyn Scheduler>> {
    Ok(Box::new(Constant(0.5)))
}

volttrain::register_scheduler!("dup_sched", one);

mod other {
    volttrain::register_scheduler!("dup_sched", super::half);
    volttrain::register_scheduler!("unique_sched", super::half);
}

#[test]
fn duplicate_names_both_origins_and_blocks_only_that_name() {
    let e = plugin::check_registry().unwrap_err();
    match &e {
        Error::DuplicateComponent {
            kind,
            name,
            first,
            second,
        } => {
            assert_eq!((*kind, name.as_str()), ("scheduler", "dup_sched"));
            assert_eq!(first, "host (plugin_duplicates)");
            assert_eq!(second, "host (plugin_duplicates)");
        }
        other => panic!("expected DuplicateComponent, got {other}"),
    }
    // Building the ambiguous name fails the same way; other names still build.
    let ctx = SchedulerCtx::default();
    let e2 = plugin::build_scheduler("dup_sched", &Value::Null, &ctx).unwrap_err();
    assert_eq!(e2.to_string(), e.to_string());
    let s = plugin::build_scheduler("unique_sched", &Value::Null, &ctx).unwrap();
    assert_eq!(s.factor(7), 0.5);
    // Both registrations are listed.
    let dups: Vec<_> = plugin::list()
        .into_iter()
        .filter(|e| e.kind == ComponentKind::Scheduler && e.name == "dup_sched")
        .collect();
    assert_eq!(dups.len(), 2);
    assert!(
        dups.iter()
            .all(|e| e.origin == Origin::Host("plugin_duplicates".into()))
    );
}
