//! Named LoRA target sets (the reference system's presets).
//!
//! Attention and MLP projections use the Llama names; the Mamba presets name the Mamba mixer's
//! projections (`in_proj`, `x_proj`, `dt_proj`, `out_proj`, as in transformers' `MambaMixer`,
//! Falcon-Mamba's and Jamba's). Names are module-name suffixes (PEFT list semantics).
//!
//! | Preset | Attention | MLP | Mamba mixer |
//! |---|---|---|---|
//! | `llama` | yes | yes | |
//! | `mlp_only` | | yes | |
//! | `mamba_only` | | | yes |
//! | `mlp_mamba` | | yes | yes |
//! | `attn_mlp_ssm` | yes | yes | yes |
//!
//! A preset must fit the model: every kind of module it names has to exist in it
//! ([`check_model_kinds`]), so `attn_mlp_ssm` or `mlp_mamba` on a pure transformer, or `llama` on
//! a pure Mamba model, is an error rather than a silent subset.
//!
//! A preset means the same projections on every architecture: where a family fuses them (Phi-3's
//! `qkv_proj` for q/k/v and `gate_up_proj` for gate/up), [`module_targets`] adds the fused names,
//! so `llama` adapts every attention and MLP projection whatever they are called.

use crate::error::{Error, Result};

const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
const MAMBA: [&str; 4] = ["in_proj", "x_proj", "dt_proj", "out_proj"];
/// Fused projections and the separate ones each stands for.
const FUSED: [(&str, &[&str]); 2] = [
    ("qkv_proj", &["q_proj", "k_proj", "v_proj"]),
    ("gate_up_proj", &["gate_proj", "up_proj"]),
];

/// The known preset names.
pub const PRESETS: [&str; 5] = [
    "llama",
    "mlp_only",
    "mamba_only",
    "mlp_mamba",
    "attn_mlp_ssm",
];

/// The module-name suffixes a preset targets. An unknown name is an error listing the known ones.
pub fn get_targets(preset: &str) -> Result<Vec<&'static str>> {
    let parts: &[&[&'static str]] = match preset {
        "llama" => &[&ATTN, &MLP],
        "mlp_only" => &[&MLP],
        "mamba_only" => &[&MAMBA],
        "mlp_mamba" => &[&MLP, &MAMBA],
        "attn_mlp_ssm" => &[&ATTN, &MLP, &MAMBA],
        other => {
            return Err(Error::UnknownComponent {
                kind: "LoRA target preset",
                name: other.to_string(),
                known: PRESETS.join(", "),
            });
        }
    };
    Ok(parts.iter().flat_map(|p| p.iter().copied()).collect())
}

/// The module-name suffixes a preset adapts on any architecture: [`get_targets`] plus the fused
/// projections (`qkv_proj`, `gate_up_proj`) whose parts the preset names.
pub fn module_targets(preset: &str) -> Result<Vec<&'static str>> {
    let mut out = get_targets(preset)?;
    for (fused, parts) in FUSED {
        if parts.iter().any(|p| out.contains(p)) {
            out.push(fused);
        }
    }
    Ok(out)
}

/// The kinds of module a preset names: `(kind, its module-name suffixes with fused forms)`.
fn preset_kinds(preset: &str) -> Result<Vec<(&'static str, Vec<&'static str>)>> {
    let targets = get_targets(preset)?;
    let mut out = Vec::new();
    for (kind, names, fused) in [
        ("attention", &ATTN[..], &["qkv_proj"][..]),
        ("MLP", &MLP[..], &["gate_up_proj"][..]),
        ("Mamba mixer", &MAMBA[..], &[][..]),
    ] {
        if names.iter().any(|n| targets.contains(n)) {
            let mut all: Vec<&'static str> = names.to_vec();
            all.extend_from_slice(fused);
            out.push((kind, all));
        }
    }
    Ok(out)
}

/// Checks that `model` (its architecture name and linear module names) has every kind of module
/// the preset names; the error names the preset, the missing kind and its module names.
pub fn check_model_kinds(preset: &str, architecture: &str, modules: &[String]) -> Result<()> {
    let matches = |m: &str, t: &str| {
        m == t
            || (m.len() > t.len() && m.ends_with(t) && m.as_bytes()[m.len() - t.len() - 1] == b'.')
    };
    for (kind, names) in preset_kinds(preset)? {
        let found = modules.iter().any(|m| names.iter().any(|t| matches(m, t)));
        if !found {
            return Err(Error::config(
                "lora.target_modules",
                format!(
                    "preset `{preset}` names {kind} projections ({}), but {architecture} has none; \
                     pick a preset whose module kinds the model has (`llama`/`mlp_only` for \
                     transformers, `mamba_only` for Mamba, `mlp_mamba`/`attn_mlp_ssm` for hybrids \
                     such as Jamba) or list the modules",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_list_their_modules() {
        assert_eq!(
            get_targets("llama").unwrap(),
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
        );
        assert_eq!(
            get_targets("mlp_only").unwrap(),
            ["gate_proj", "up_proj", "down_proj"]
        );
        assert_eq!(
            get_targets("mamba_only").unwrap(),
            ["in_proj", "x_proj", "dt_proj", "out_proj"]
        );
        assert_eq!(get_targets("mlp_mamba").unwrap().len(), 7);
        assert_eq!(get_targets("attn_mlp_ssm").unwrap().len(), 11);
        for p in PRESETS {
            assert!(get_targets(p).is_ok());
        }
    }

    #[test]
    fn presets_cover_fused_projections() {
        let l = module_targets("llama").unwrap();
        assert_eq!(&l[..7], get_targets("llama").unwrap().as_slice());
        assert_eq!(&l[7..], ["qkv_proj", "gate_up_proj"]);
        assert_eq!(
            module_targets("mlp_only").unwrap(),
            ["gate_proj", "up_proj", "down_proj", "gate_up_proj"]
        );
        assert_eq!(
            module_targets("mamba_only").unwrap(),
            get_targets("mamba_only").unwrap()
        );
        assert!(module_targets("nope").is_err());
    }

    #[test]
    fn presets_must_fit_the_model() {
        let llama: Vec<String> = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
        ]
        .map(String::from)
        .to_vec();
        let mamba: Vec<String> = ["backbone.layers.0.mixer.in_proj"]
            .map(String::from)
            .to_vec();
        let jamba: Vec<String> = [
            "model.layers.0.mamba.in_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.feed_forward.up_proj",
        ]
        .map(String::from)
        .to_vec();
        assert!(check_model_kinds("llama", "Llama", &llama).is_ok());
        assert!(check_model_kinds("mlp_only", "Llama", &llama).is_ok());
        for p in ["mamba_only", "mlp_mamba", "attn_mlp_ssm"] {
            let e = check_model_kinds(p, "LlamaForCausalLM", &llama)
                .unwrap_err()
                .to_string();
            assert!(e.contains("Mamba mixer") && e.contains(p), "{e}");
        }
        assert!(check_model_kinds("mamba_only", "Mamba", &mamba).is_ok());
        let e = check_model_kinds("llama", "MambaForCausalLM", &mamba)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention"), "{e}");
        assert!(check_model_kinds("mlp_mamba", "Mamba", &mamba).is_err());
        for p in PRESETS {
            assert!(check_model_kinds(p, "Jamba", &jamba).is_ok(), "{p}");
        }
        let phi3: Vec<String> = [
            "model.layers.0.self_attn.qkv_proj",
            "model.layers.0.mlp.gate_up_proj",
        ]
        .map(String::from)
        .to_vec();
        assert!(check_model_kinds("llama", "Phi3", &phi3).is_ok());
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let msg = get_targets("attention").unwrap_err().to_string();
        for p in PRESETS {
            assert!(msg.contains(p), "{msg}");
        }
        assert!(msg.contains("attention"));
    }
}
