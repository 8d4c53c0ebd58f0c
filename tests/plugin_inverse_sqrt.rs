//! The inverse-sqrt scheduler plugin (`plugins/inverse-sqrt`): built, loaded as a dylib, built
//! by name from YAML, and checked against transformers' `get_inverse_sqrt_schedule` run live.

mod plugin_support;

use volttrain::plugin::{self, SchedulerCtx};

/// The lr factors transformers' `get_inverse_sqrt_schedule` gives (base lr 1.0) for the first
/// `steps` optimizer steps, for each `(warmup, timescale)`: the lr each update uses, read before
/// `scheduler.step()`. One Python process for all cases (importing transformers is slow).
fn transformers_factors(cases: &[(u64, Option<u64>)], steps: u64) -> Vec<Vec<f64>> {
    let cases: Vec<String> = cases
        .iter()
        .map(|(w, t)| format!("({w}, {})", t.map_or("None".to_string(), |t| t.to_string())))
        .collect();
    let code = format!(
        "import json, torch\n\
         from transformers import get_inverse_sqrt_schedule\n\
         res = []\n\
         for warmup, timescale in [{}]:\n\
         \x20   p = torch.nn.Parameter(torch.zeros(1))\n\
         \x20   opt = torch.optim.SGD([p], lr=1.0)\n\
         \x20   s = get_inverse_sqrt_schedule(opt, num_warmup_steps=warmup, timescale=timescale)\n\
         \x20   out = []\n\
         \x20   for _ in range({steps}):\n\
         \x20       out.append(opt.param_groups[0]['lr'])\n\
         \x20       opt.step()\n\
         \x20       s.step()\n\
         \x20   res.append(out)\n\
         print(json.dumps(res))\n",
        cases.join(", ")
    );
    let out = std::process::Command::new(plugin_support::python())
        .args(["-c", &code])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "transformers reference failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json lists of lrs")
}

fn load() {
    let lib = plugin_support::plugin_library("volttrain-inverse-sqrt");
    let info = plugin::load_plugin(&lib).unwrap();
    assert_eq!(
        info.components,
        vec![(plugin::ComponentKind::Scheduler, "inverse_sqrt".to_string())]
    );
}

#[test]
fn inverse_sqrt_matches_transformers() {
    load();
    let ctx = SchedulerCtx { total_steps: 300 };
    let cases = [
        ("{name: inverse_sqrt, warmup_steps: 10}", 10, None),
        ("{warmup_steps: 7, timescale: 50}", 7, Some(50)),
        ("{}", 0, None),
    ];
    let reference = transformers_factors(
        &cases.map(|(_, warmup, timescale)| (warmup, timescale)),
        300,
    );
    for ((yaml, warmup, _), want) in cases.into_iter().zip(reference) {
        let cfg: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let s = plugin::build_scheduler("inverse_sqrt", &cfg, &ctx).unwrap();
        assert_eq!(s.name(), "inverse_sqrt");
        assert_eq!(want.len(), 300);
        let got: Vec<f64> = (0..300).map(|t| s.factor(t)).collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("inverse_sqrt {yaml}: max |diff| vs transformers over 300 steps: {worst:e}");
        assert!(worst <= 1e-12, "{yaml}: max |diff| {worst:e}");
        // Not a constant: warms up (when it does) and decays.
        assert!(got[299] < got[warmup as usize].max(got[1]));
    }
}

#[test]
fn inverse_sqrt_rejects_bad_config() {
    load();
    let ctx = SchedulerCtx::default();
    let cfg: serde_yaml::Value = serde_yaml::from_str("{timescale: 0}").unwrap();
    let e = plugin::build_scheduler("inverse_sqrt", &cfg, &ctx).unwrap_err();
    assert!(e.to_string().contains("scheduler.timescale"), "{e}");
    let cfg: serde_yaml::Value = serde_yaml::from_str("{warmup: 10}").unwrap();
    let e = plugin::build_scheduler("inverse_sqrt", &cfg, &ctx).unwrap_err();
    assert!(e.to_string().contains("warmup"), "{e}");
}
