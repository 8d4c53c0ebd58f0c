//! Grouping rules, the exactly-one-group check, `build_optimizer`, the composite optimizer and
//! exact resume through the state dict.

use tch::{Device, Kind, Tensor};
use volttrain::optim::{
    AdamW, AdamWConfig, Composite, DynOptimizer, GroupSpec, Muon, MuonConfig, NamedParam,
    Optimizer, OptimizerConfigs, ParamGroup, ParamGrouper, ParamInfo, ParamRole, ReferenceGrouper,
    ReferenceGrouperConfig, build_optimizer, validate_groups,
};
use volttrain::sched::{self, SchedulerConfig};

fn info(name: &str, shape: &[i64], role: ParamRole) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        shape: shape.to_vec(),
        role,
    }
}

/// A tiny untied Llama-shaped parameter list with a LoRA adapter and a bias.
fn untied() -> Vec<ParamInfo> {
    vec![
        info(
            "model.embed_tokens.weight",
            &[100, 16],
            ParamRole::Embedding,
        ),
        info(
            "model.layers.0.input_layernorm.weight",
            &[16],
            ParamRole::Other,
        ),
        info(
            "model.layers.0.self_attn.q_proj.weight",
            &[16, 16],
            ParamRole::Other,
        ),
        info(
            "model.layers.0.self_attn.q_proj.bias",
            &[16],
            ParamRole::Other,
        ),
        info(
            "model.layers.0.self_attn.k_proj.lora_A.weight",
            &[4, 16],
            ParamRole::Other,
        ),
        info(
            "model.layers.0.mlp.up_proj.weight",
            &[32, 16],
            ParamRole::Other,
        ),
        info("model.layers.0.conv.weight", &[8, 4, 2], ParamRole::Other),
        info("model.norm.weight", &[16], ParamRole::Other),
        info("lm_head.weight", &[100, 16], ParamRole::LmHead),
    ]
}

fn find<'a>(groups: &'a [GroupSpec], name: &str) -> &'a GroupSpec {
    groups
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no group `{name}` in {groups:?}"))
}

#[test]
fn reference_grouper_follows_the_reference_rules() {
    let groups = ReferenceGrouper::default().group(&untied()).unwrap();
    let muon = find(&groups, "muon");
    assert_eq!(
        (muon.optimizer.as_str(), muon.lr_mult, muon.weight_decay),
        ("muon", 1.0, None)
    );
    assert_eq!(
        muon.params,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.lora_A.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.conv.weight",
        ]
    );
    let embed = find(&groups, "adamw_embed");
    assert_eq!((embed.optimizer.as_str(), embed.lr_mult), ("adamw", 2.0));
    assert_eq!(embed.params, ["model.embed_tokens.weight"]);
    let head = find(&groups, "adamw_head");
    assert_eq!((head.optimizer.as_str(), head.lr_mult), ("adamw", 0.1));
    assert_eq!(head.params, ["lm_head.weight"]);
    let nd = find(&groups, "adamw_no_decay");
    assert_eq!(
        (nd.optimizer.as_str(), nd.lr_mult, nd.weight_decay),
        ("adamw", 1.0, Some(0.0))
    );
    assert_eq!(
        nd.params,
        [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.norm.weight",
        ]
    );
    assert_eq!(groups.len(), 4);
}

#[test]
fn tied_embedding_is_one_parameter_in_one_group() {
    let params: Vec<ParamInfo> = untied()
        .into_iter()
        .filter(|p| p.role != ParamRole::LmHead)
        .collect();
    let groups = ReferenceGrouper::default().group(&params).unwrap();
    let homes: Vec<&str> = groups
        .iter()
        .filter(|g| g.params.iter().any(|p| p == "model.embed_tokens.weight"))
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(homes, ["adamw_embed"]);
    assert!(groups.iter().all(|g| g.name != "adamw_head"));
    assert_eq!(
        groups.iter().map(|g| g.params.len()).sum::<usize>(),
        params.len()
    );
}

#[test]
fn use_muon_false_sends_matrices_to_adamw_with_same_multipliers() {
    let grouper = ReferenceGrouper::new(ReferenceGrouperConfig {
        use_muon: false,
        ..Default::default()
    });
    let groups = grouper.group(&untied()).unwrap();
    assert!(groups.iter().all(|g| g.optimizer == "adamw"), "{groups:?}");
    let hidden = find(&groups, "adamw");
    assert_eq!(
        (hidden.lr_mult, hidden.weight_decay, hidden.params.len()),
        (1.0, None, 4)
    );
    assert_eq!(find(&groups, "adamw_embed").lr_mult, 2.0);
    assert_eq!(find(&groups, "adamw_head").lr_mult, 0.1);
    assert_eq!(find(&groups, "adamw_no_decay").weight_decay, Some(0.0));
}

fn spec(name: &str, optimizer: &str, params: &[&str]) -> GroupSpec {
    GroupSpec {
        name: name.into(),
        optimizer: optimizer.into(),
        lr_mult: 1.0,
        weight_decay: None,
        params: params.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn parameter_in_no_group_or_two_groups_is_an_error_naming_it() {
    let params = ["a.weight", "b.weight", "c.bias"];
    let err = validate_groups(
        &params,
        &[
            spec("muon", "muon", &["a.weight"]),
            spec("adamw", "adamw", &["c.bias"]),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("in no group") && err.contains("`b.weight`"),
        "{err}"
    );

    let err = validate_groups(
        &params,
        &[
            spec("muon", "muon", &["a.weight", "b.weight"]),
            spec("adamw", "adamw", &["b.weight", "c.bias"]),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("more than one group") && err.contains("`b.weight` (groups muon, adamw)"),
        "{err}"
    );

    let err = validate_groups(
        &params,
        &[spec(
            "all",
            "adamw",
            &["a.weight", "b.weight", "c.bias", "ghost"],
        )],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`ghost`"), "{err}");

    validate_groups(&params, &[spec("all", "adamw", &params)]).unwrap();
}

fn tensors_for(infos: &[ParamInfo], seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(seed);
    infos
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                (Tensor::randn(p.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.1)
                    .set_requires_grad(true),
            )
        })
        .collect()
}

#[test]
fn build_optimizer_makes_one_composite_with_group_lrs_and_decays() {
    let infos = untied();
    let params = tensors_for(&infos, 1);
    let groups = ReferenceGrouper::default().group(&infos).unwrap();
    let configs = OptimizerConfigs::default();
    let opt = build_optimizer(groups, &params, 1e-3, &configs).unwrap();
    assert_eq!(opt.name(), "composite(muon+adamw)");
    let g = |n: &str| opt.groups().iter().find(|g| g.name == n).unwrap();
    assert_eq!(
        (g("muon").lr, g("muon").weight_decay),
        (1e-3, configs.muon.weight_decay)
    );
    assert_eq!(
        (g("adamw_embed").lr, g("adamw_embed").weight_decay),
        (2e-3, configs.adamw.weight_decay)
    );
    assert!((g("adamw_head").lr - 1e-4).abs() < 1e-18);
    assert_eq!(g("adamw_no_decay").weight_decay, 0.0);
    let total: usize = opt.groups().iter().map(|g| g.params.len()).sum();
    assert_eq!(total, infos.len());

    // a scheduler keeps the multipliers
    let cosine = SchedulerConfig::Cosine {
        warmup_steps: 10,
        total_steps: 100,
        min_lr_ratio: 0.1,
        num_cycles: 0.5,
    }
    .build()
    .unwrap();
    let mut opt = opt;
    sched::apply(cosine.as_ref(), opt.as_mut(), 1e-3, 5);
    for g in opt.groups() {
        let want = 1e-3 * g.lr_mult * 0.5;
        assert!(
            (g.lr - want).abs() < 1e-15,
            "{}: {} vs {want}",
            g.name,
            g.lr
        );
    }

    // without Muon groups a plain AdamW comes back
    let groups = ReferenceGrouper::new(ReferenceGrouperConfig {
        use_muon: false,
        ..Default::default()
    })
    .group(&infos)
    .unwrap();
    let opt = build_optimizer(groups, &params, 1e-3, &configs).unwrap();
    assert_eq!(opt.name(), "adamw");
}

#[test]
fn build_optimizer_rejects_unknown_optimizer_and_1d_muon_params() {
    let params = vec![
        (
            "w".to_string(),
            Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
        ),
        (
            "b".to_string(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        ),
    ];
    let err = build_optimizer(
        vec![spec("x", "lion", &["w", "b"])],
        &params,
        1e-3,
        &OptimizerConfigs::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lion") && err.contains("adamw, muon"), "{err}");
    let err = build_optimizer(
        vec![spec("m", "muon", &["w", "b"])],
        &params,
        1e-3,
        &OptimizerConfigs::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`b`") && err.contains("AdamW"), "{err}");
}

/// Deterministic gradients for step `t` (no global RNG: tests run in parallel).
fn set_grads(params: &mut [(String, Tensor)], t: i64) {
    for (i, (_, p)) in params.iter_mut().enumerate() {
        let n = p.numel() as i64;
        let x = Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + 0.013 * t as f64)
            + (i as f64 + 0.5 * t as f64);
        let g = x.sin().view(p.size().as_slice());
        p.zero_grad();
        (&*p * &g).sum(Kind::Float).backward();
    }
}

fn snapshot(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true)))
        .collect()
}

fn build(params: &[(String, Tensor)], infos: &[ParamInfo], amsgrad: bool) -> Box<dyn DynOptimizer> {
    let groups = ReferenceGrouper::default().group(infos).unwrap();
    let configs = OptimizerConfigs {
        adamw: AdamWConfig {
            amsgrad,
            block_size: 100,
            ..Default::default()
        },
        muon: MuonConfig::default(),
    };
    build_optimizer(groups, params, 1e-2, &configs).unwrap()
}

#[test]
fn state_dict_round_trip_resumes_exactly() {
    for amsgrad in [false, true] {
        let infos = untied();
        let mut run = tensors_for(&infos, 2);
        let mut opt = build(&run, &infos, amsgrad);
        for t in 0..5 {
            set_grads(&mut run, t);
            opt.step().unwrap();
        }
        let state = opt.state_dict().unwrap();
        let mut resumed = snapshot(&run);
        for t in 5..10 {
            set_grads(&mut run, t);
            opt.step().unwrap();
        }

        let mut opt2 = build(&resumed, &infos, amsgrad);
        opt2.load_state_dict(&state).unwrap();
        for t in 5..10 {
            set_grads(&mut resumed, t);
            opt2.step().unwrap();
        }
        for ((n, a), (_, b)) in run.iter().zip(&resumed) {
            assert!(
                a.detach().equal(&b.detach()),
                "`{n}` differs after resume (amsgrad {amsgrad})"
            );
        }
        // the state after resume equals the uninterrupted one, entry for entry
        let (s1, s2) = (opt.state_dict().unwrap(), opt2.state_dict().unwrap());
        assert_eq!(s1.scalars, s2.scalars);
        assert_eq!(
            s1.tensors.keys().collect::<Vec<_>>(),
            s2.tensors.keys().collect::<Vec<_>>()
        );
        for (k, t) in &s1.tensors {
            assert!(t.equal(&s2.tensors[k]), "state `{k}` differs");
        }
        // and the state is complete: moments for AdamW, momentum for Muon
        assert!(
            s1.tensors
                .contains_key("model.embed_tokens.weight.exp_avg_sq")
        );
        assert!(
            s1.tensors
                .contains_key("model.layers.0.conv.weight.momentum_buffer")
        );
        assert_eq!(
            s1.tensors.contains_key("lm_head.weight.max_exp_avg_sq"),
            amsgrad
        );
    }
}

#[test]
fn loading_a_foreign_state_is_an_error_naming_the_key() {
    let w = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mk = || {
        AdamW::new(
            vec![ParamGroup::new(
                "g",
                vec![NamedParam::new("w", &w)],
                1e-3,
                1.0,
                0.0,
            )],
            AdamWConfig::default(),
        )
        .unwrap()
    };
    let mut state = Optimizer::state_dict(&mk()).unwrap();
    state.tensors.insert(
        "other.exp_avg".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    );
    let err = Optimizer::load_state_dict(&mut mk(), &state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other.exp_avg"), "{err}");

    let mut state = Optimizer::state_dict(&mk()).unwrap();
    state.tensors.insert(
        "w.exp_avg".into(),
        Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)),
    );
    let err = Optimizer::load_state_dict(&mut mk(), &state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.exp_avg") && err.contains("[3, 4]"), "{err}");
}

#[test]
fn composite_rejects_a_parameter_held_twice() {
    let w = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let g = || {
        vec![ParamGroup::new(
            "g",
            vec![NamedParam::new("w", &w)],
            1e-3,
            1.0,
            0.0,
        )]
    };
    let a: Box<dyn DynOptimizer> = Box::new(AdamW::new(g(), AdamWConfig::default()).unwrap());
    let m: Box<dyn DynOptimizer> = Box::new(Muon::new(g(), MuonConfig::default()).unwrap());
    let err = Composite::new(vec![a, m]).unwrap_err().to_string();
    assert!(
        err.contains("`w`") && err.contains("adamw") && err.contains("muon"),
        "{err}"
    );
}

#[test]
fn composite_steps_like_its_parts_with_scheduled_lrs() {
    // composite(muon over w, adamw over b) == muon over w and adamw over b stepped apart
    let infos = vec![
        info("w", &[8, 6], ParamRole::Other),
        info("b", &[6], ParamRole::Other),
    ];
    let mut p1 = tensors_for(&infos, 3);
    let mut p2 = snapshot(&p1);
    let mut comp = build(&p1, &infos, false);
    let cfg = AdamWConfig {
        block_size: 100,
        ..Default::default()
    };
    let mut muon = Muon::new(
        vec![ParamGroup::new(
            "muon",
            vec![NamedParam::new("w", &p2[0].1)],
            1e-2,
            1.0,
            0.1,
        )],
        MuonConfig::default(),
    )
    .unwrap();
    let mut adamw = AdamW::new(
        vec![ParamGroup::new(
            "adamw_no_decay",
            vec![NamedParam::new("b", &p2[1].1)],
            1e-2,
            1.0,
            0.0,
        )],
        cfg,
    )
    .unwrap();
    let s = SchedulerConfig::Linear {
        warmup_steps: 2,
        total_steps: 6,
    }
    .build()
    .unwrap();
    for t in 0..6 {
        sched::apply(s.as_ref(), comp.as_mut(), 1e-2, t as u64);
        sched::apply(s.as_ref(), &mut muon, 1e-2, t as u64);
        sched::apply(s.as_ref(), &mut adamw, 1e-2, t as u64);
        set_grads(&mut p1, t);
        set_grads(&mut p2, t);
        comp.step().unwrap();
        Optimizer::step(&mut muon).unwrap();
        Optimizer::step(&mut adamw).unwrap();
    }
    for ((n, a), (_, b)) in p1.iter().zip(&p2) {
        assert!(a.detach().equal(&b.detach()), "`{n}` differs: {a} vs {b}");
    }
}

/// Mamba's tensors (issue 17): `A_log` (2-D) and `D`, the dt bias to AdamW without decay,
/// the 3-D `conv1d.weight` to AdamW with decay, only true matrices to Muon.
#[test]
fn mamba_tensors_have_their_groups() {
    let p = |name: &str, shape: &[i64]| ParamInfo {
        name: name.to_string(),
        shape: shape.to_vec(),
        role: ParamRole::Other,
    };
    let m = "backbone.layers.0.mixer";
    let params = vec![
        p(&format!("{m}.A_log"), &[64, 16]),
        p(&format!("{m}.D"), &[64]),
        p(&format!("{m}.dt_proj.bias"), &[64]),
        p(&format!("{m}.dt_proj.weight"), &[64, 2]),
        p(&format!("{m}.conv1d.weight"), &[64, 1, 4]),
        p(&format!("{m}.conv1d.bias"), &[64]),
        p(&format!("{m}.in_proj.weight"), &[128, 32]),
    ];
    for use_muon in [true, false] {
        let groups = ReferenceGrouper::new(ReferenceGrouperConfig {
            use_muon,
            ..Default::default()
        })
        .group(&params)
        .unwrap();
        let home = |n: &str| -> Vec<&str> {
            groups
                .iter()
                .filter(|g| g.params.iter().any(|x| x == &format!("{m}.{n}")))
                .map(|g| g.name.as_str())
                .collect()
        };
        for n in ["A_log", "D", "dt_proj.bias", "conv1d.bias"] {
            assert_eq!(home(n), ["adamw_no_decay"], "{n}");
        }
        assert_eq!(home("conv1d.weight"), ["adamw"]);
        let matrix = if use_muon { "muon" } else { "adamw" };
        assert_eq!(home("in_proj.weight"), [matrix]);
        assert_eq!(home("dt_proj.weight"), [matrix]);
        let adamw = groups.iter().find(|g| g.name == "adamw").unwrap();
        assert_eq!(adamw.optimizer, "adamw");
        assert_eq!(adamw.weight_decay, None);
    }
}

/// A part that keys its state by the bare parameter name (as the custom-optimizer template once
/// did), or by another part's parameter, breaks the `<param>.<what>` rule: the composite's
/// `state_dict` says which part and which key, instead of a resume that cannot split it.
#[test]
fn composite_names_a_part_whose_state_keys_break_the_rule() {
    struct Keyed {
        groups: Vec<ParamGroup>,
        key: &'static str,
    }
    impl Optimizer for Keyed {
        type Config = ();
        fn new(groups: Vec<ParamGroup>, _: ()) -> volttrain::Result<Self> {
            Ok(Keyed { groups, key: "" })
        }
        fn name(&self) -> &str {
            "keyed"
        }
        fn groups(&self) -> &[ParamGroup] {
            &self.groups
        }
        fn groups_mut(&mut self) -> &mut [ParamGroup] {
            &mut self.groups
        }
        fn step(&mut self) -> volttrain::Result<()> {
            Ok(())
        }
        fn state_dict(&self) -> volttrain::Result<volttrain::optim::StateDict> {
            let mut s = volttrain::optim::StateDict::default();
            s.scalars.insert(self.key.into(), 1.0);
            Ok(s)
        }
        fn load_state_dict(&mut self, _: &volttrain::optim::StateDict) -> volttrain::Result<()> {
            Ok(())
        }
    }
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::zeros([4, 4], opts).set_requires_grad(true);
    let b = Tensor::zeros([4], opts).set_requires_grad(true);
    let group = |name: &str, t: &Tensor| {
        vec![ParamGroup::new(
            name,
            vec![NamedParam::new(name, t)],
            1e-3,
            1.0,
            0.0,
        )]
    };
    for (key, why) in [
        ("b", "has no `.<what>`"),
        ("c.exp_avg", "`c` is none of its parameters"),
        (
            "w.momentum",
            "`w` is a parameter of `adamw`, not of `keyed`",
        ),
        ("b.momentum_buffer", ""),
    ] {
        let a: Box<dyn DynOptimizer> =
            Box::new(AdamW::new(group("w", &w), AdamWConfig::default()).unwrap());
        let mut k = Keyed::new(group("b", &b), ()).unwrap();
        k.key = key;
        let c = Composite::new(vec![a, Box::new(k)]).unwrap();
        match DynOptimizer::state_dict(&c) {
            Ok(s) => {
                assert_eq!(why, "", "{key}");
                assert_eq!(s.scalars[key], 1.0);
            }
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("`{key}`"))
                        && e.contains(why)
                        && e.contains("<param>.<what>"),
                    "{e}"
                );
            }
        }
    }
}
