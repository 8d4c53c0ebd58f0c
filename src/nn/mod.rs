//! Building blocks shared by the model architectures.

mod linear;
mod norm;
mod rope;

pub use linear::{Linear, LinearAdapter, LinearWeight, LowRank};
pub use norm::{rms_norm, rms_norm_composite, rms_norm_plus_one};
pub use rope::{RopeConfig, RopeScaling, apply_rope, rope_tables, rope_tables_scaled};
