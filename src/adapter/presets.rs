//! Named LoRA target sets (the reference system's presets).
//!
//! Attention and MLP projections use the Llama names; the Mamba presets name the Mamba mixer's
//! projections (`in_proj`, `x_proj`, `dt_proj`, `out_proj`, as in transformers' `MambaMixer`), so
//! they apply once such architectures load. Names are module-name suffixes (PEFT list semantics).
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
    fn unknown_preset_lists_known_ones() {
        let msg = get_targets("attention").unwrap_err().to_string();
        for p in PRESETS {
            assert!(msg.contains(p), "{msg}");
        }
        assert!(msg.contains("attention"));
    }
}
