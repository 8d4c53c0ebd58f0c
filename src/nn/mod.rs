//! Building blocks shared by the model architectures.

mod linear;

pub use linear::{Linear, LinearAdapter, LinearWeight};
