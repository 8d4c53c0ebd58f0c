//! Quantized storage of frozen weights.
//!
//! A [`Quantizer`] turns a dense 2-D weight into a [`QuantizedTensor`]: a packed representation
//! that knows its own dequantization. [`crate::nn::Linear`] holds such a tensor in place of its
//! dense weight and calls [`QuantizedTensor::linear`] in its forward pass.
//!
//! | format | module | storage (bytes/param) | reference it equals |
//! |---|---|---|---|
//! | `nf4`, `fp4` | [`nf4`] | 0.5 + 4/64 (0.516 with double quantization) | bitsandbytes 0.50 `quantize_4bit`, bit for bit |
//! | `int8` | [`int8`] | 1 + 4/cols | bitsandbytes `int8_vectorwise_quant` |
//! | `fp8_e4m3`, `fp8_e5m2` | [`fp8`] | 1 (+ 4 per tensor or row) | torchao Float8Linear dynamic scaling |
//!
//! [`QuantConfig`] is the `quantization` config section and maps the legacy `model.train_4bit`
//! / `model.train_8bit` switches. Products that need an input gradient run through one autograd
//! function of the C++ shim ([`qlinear`]) that dequantizes in forward and again in backward, so
//! training keeps no dense copy of a quantized weight; FP8 weights multiply FP8 copies of the
//! input in training, evaluation and recompute alike ([`fp8`]).
//! Every quantizer refuses weights that are not 2-D floating point or hold NaN/infinite values.

use std::fmt;

use tch::{Kind, Tensor};

use crate::error::{Result, TchResultExt};

/// A frozen weight in a packed format (NF4, FP4, int8, FP8, ...).
pub trait QuantizedTensor: Send + fmt::Debug {
    /// Short format name (`nf4`, `int8`, `fp8_e4m3`, ...).
    fn format(&self) -> &str;
    /// The logical `(rows, cols)` of the dense weight.
    fn shape(&self) -> (i64, i64);
    /// The dense weight in `kind`.
    fn dequantize(&self, kind: Kind) -> Result<Tensor>;
    /// Bytes held by the packed representation (codes plus all scales/statistics).
    fn storage_bytes(&self) -> usize;
    /// `x W^T` for `x: [..., cols]`. The default dequantizes to `x`'s kind and multiplies;
    /// formats with a faster kernel on the device override it.
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.dequantize(x.kind())?;
        x.f_linear::<&Tensor>(&w, None).ctx("quantized linear")
    }
    /// The tensors to save, by name (relative to the weight), for serialization;
    /// [`from_named_tensors`] turns them back into this tensor through [`Quantizer::load`].
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
}

/// Turns dense 2-D weights into quantized ones, and saved parts back into quantized tensors.
///
/// A format round-trips when its quantizer is registered under the format's name
/// ([`crate::register_quantizer!`]), its factory accepts an empty section, and it implements
/// [`Quantizer::load`]: [`from_named_tensors`] finds it by the [`QuantizedTensor::format`] the
/// tensor was saved with.
pub trait Quantizer: Send + Sync + fmt::Debug {
    /// Short name of the format this quantizer produces: the [`QuantizedTensor::format`] of its
    /// tensors, and the name it is registered under.
    fn name(&self) -> &str;
    /// Quantizes a 2-D weight `[out, in]`. Errors on other ranks or unsupported shapes.
    fn quantize(&self, weight: &Tensor) -> Result<Box<dyn QuantizedTensor>>;
    /// Rebuilds a tensor of this quantizer's format from its saved parts (what
    /// [`QuantizedTensor::named_tensors`] returned, e.g. read back from safetensors); `shape` is
    /// the dense `(rows, cols)`. The layout (block size, scaling, ...) comes from the parts, not
    /// from the settings this quantizer was built with, since [`from_named_tensors`] calls it on
    /// the quantizer built from an empty section. Errors name the missing or malformed part
    /// ([`QuantParts`]). The default is an error: the format cannot be reloaded.
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        let names: Vec<String> = parts.into_iter().map(|(n, _)| n).collect();
        Err(crate::Error::Unsupported {
            what: format!(
                "{} tensor {shape:?} (parts {})",
                self.name(),
                names.join(", ")
            ),
            msg: format!(
                "the quantizer `{}` cannot reload saved tensors (it does not implement \
                 `Quantizer::load`)",
                self.name()
            ),
        })
    }
}

pub mod config;
pub mod fp8;
pub mod int8;
pub mod nf4;
pub mod qlinear;

pub use config::{ComputeDtype, QuantConfig, QuantType};
pub use fp8::{Fp8Backend, Fp8Format, Fp8Quantizer, Fp8Scaling, Fp8Tensor, fp8_backend_for};
pub use int8::{Int8Quantizer, Int8Tensor};
pub use nf4::{FourBitQuantizer, FourBitTensor, FourBitType};

/// Checks that `weight` is a 2-D floating-point tensor and returns its `(rows, cols)`.
pub(crate) fn check_weight(format: &str, weight: &Tensor) -> Result<(i64, i64)> {
    let size = weight.size();
    if size.len() != 2 {
        return Err(crate::Error::Shape {
            op: format!("{format} quantization"),
            msg: format!("needs a 2-D weight [out, in], got shape {size:?}"),
        });
    }
    if !weight.is_floating_point() {
        return Err(crate::Error::Shape {
            op: format!("{format} quantization"),
            msg: format!("needs a floating-point weight, got {:?}", weight.kind()),
        });
    }
    Ok((size[0], size[1]))
}

/// Errors when `stats` (a reduction of `|W|`: absmax per block, row or tensor) is not finite,
/// that is when the weight holds NaN or infinite values, which no format can represent.
pub(crate) fn check_finite(format: &str, shape: (i64, i64), stats: &Tensor) -> Result<()> {
    let finite = stats
        .f_isfinite()
        .and_then(|t| t.f_all())
        .and_then(|t| t.f_int64_value(&[]))
        .ctx(format!("{format} quantize {shape:?}: finiteness check"))?;
    if finite == 1 {
        Ok(())
    } else {
        Err(crate::Error::invalid(format!(
            "{format} quantization of weight {shape:?}: the weight holds NaN or infinite values"
        )))
    }
}

/// Bytes held by `t` (numel times element size).
pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// A `[65536, width]` fp32 lookup table with one row per pair of bytes: row `r` holds
/// `fill(b0) ++ fill(b1)` where `b0`, `b1` are the two bytes whose in-memory pair reads as `r`
/// when viewed as a native-endian `u16`. Built once per (name, device) and thread, and shared
/// through `shallow_clone` (tensors are not `Sync`, so the cache is thread-local).
pub(crate) fn byte_pair_table(
    name: &'static str,
    device: tch::Device,
    width: usize,
    fill: impl Fn(usize, &mut Vec<f32>),
) -> Tensor {
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static TABLES: RefCell<HashMap<(&'static str, tch::Device), Tensor>> = RefCell::new(HashMap::new());
    }
    TABLES.with(|t| {
        t.borrow_mut()
            .entry((name, device))
            .or_insert_with(|| {
                let mut v = Vec::with_capacity(65536 * width);
                for r in 0..65536usize {
                    let [b0, b1] = (r as u16).to_ne_bytes();
                    fill(b0 as usize, &mut v);
                    fill(b1 as usize, &mut v);
                }
                Tensor::from_slice(&v)
                    .view([65536, width as i64])
                    .to_device(device)
            })
            .shallow_clone()
    })
}

/// Looks up `bytes` (1-D `uint8`, even length) two at a time in a [`byte_pair_table`]:
/// returns `[len / 2, width]` fp32. Vectorised: the bytes are read as `i16`, widened to `i32`,
/// masked to `0..65536` and passed to `index_select`.
pub(crate) fn gather_byte_pairs(table: &Tensor, bytes: &Tensor) -> Result<Tensor> {
    let ctx = || format!("byte-pair lookup of {} bytes", bytes.numel());
    let mut idx = bytes
        .f_view_dtype(Kind::Int16)
        .ctx(ctx())?
        .f_to_kind(Kind::Int)
        .ctx(ctx())?;
    let _ = idx.f_bitwise_and_(0xFFFF).ctx(ctx())?;
    table.f_index_select(0, &idx).ctx(ctx())
}

/// The saved parts of one quantized tensor by name, as [`Quantizer::load`] receives them:
/// [`take`](QuantParts::take) and [`error`](QuantParts::error) give messages that name the
/// format, the dense shape and the part.
#[derive(Debug)]
pub struct QuantParts {
    format: String,
    shape: (i64, i64),
    parts: std::collections::HashMap<String, Tensor>,
}

impl QuantParts {
    /// The parts of a `format` tensor of dense `shape`.
    pub fn new(format: &str, shape: (i64, i64), parts: Vec<(String, Tensor)>) -> Self {
        QuantParts {
            format: format.to_string(),
            shape,
            parts: parts.into_iter().collect(),
        }
    }

    /// Removes and returns part `name`; an error naming it when it is missing.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        match self.parts.remove(name) {
            Some(t) => Ok(t),
            None => Err(self.error(format!("missing part `{name}`"))),
        }
    }

    /// `"<format> tensor <shape>: <msg>"` as an [`crate::Error::Shape`]: the saved parts do
    /// not fit the format.
    pub fn error(&self, msg: impl fmt::Display) -> crate::Error {
        crate::Error::Shape {
            op: format!("{} tensor {:?}", self.format, self.shape),
            msg: msg.to_string(),
        }
    }
}

/// Rebuilds a quantized tensor from what [`QuantizedTensor::named_tensors`] returned (for
/// example after a safetensors round trip): `format` is [`QuantizedTensor::format`], `shape` the
/// dense `(rows, cols)`. The format's loader is the quantizer registered under the format's name
/// ([`crate::register_quantizer!`], a dylib plugin's registrar), built from an empty config
/// section: built-in formats (`nf4`, `fp4`, `int8`, `fp8_e4m3`, `fp8_e5m2`) and plugin formats
/// load alike, through [`Quantizer::load`]. Errors name an unknown format with the known ones,
/// and the missing or malformed part.
pub fn from_named_tensors(
    format: &str,
    shape: (i64, i64),
    named: Vec<(String, Tensor)>,
) -> Result<Box<dyn QuantizedTensor>> {
    let quantizer =
        crate::plugin::build_quantizer(format, &serde_yaml::Value::Null).map_err(|e| match e {
            crate::Error::UnknownComponent { known, .. } => crate::Error::UnknownComponent {
                kind: "quantized format",
                name: format.to_string(),
                known: format!(
                    "{known} (a format is loaded by the quantizer registered under its name)"
                ),
            },
            other => crate::Error::invalid(format!(
                "quantized format `{format}`: building its quantizer to load a {shape:?} \
                 tensor: {other}"
            )),
        })?;
    let t = quantizer.load(shape, named)?;
    if t.format() != format {
        return Err(crate::Error::Shape {
            op: format!("{format} tensor {shape:?}"),
            msg: format!(
                "the quantizer registered as `{format}` loaded a `{}` tensor",
                t.format()
            ),
        });
    }
    if t.shape() != shape {
        return Err(crate::Error::Shape {
            op: format!("{format} tensor"),
            msg: format!("parts have shape {:?}, expected {shape:?}", t.shape()),
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn built_in_formats_load_through_the_registry() {
        tch::manual_seed(5);
        let w = Tensor::randn([32, 64], (Kind::Float, tch::Device::Cpu));
        let quantizers: [Arc<dyn Quantizer>; 4] = [
            Arc::new(Int8Quantizer),
            Arc::new(FourBitQuantizer::new(FourBitType::Fp4, 32, true).unwrap()),
            Arc::new(FourBitQuantizer::nf4_qlora()),
            Arc::new(Fp8Quantizer {
                format: Fp8Format::E5m2,
                scaling: Fp8Scaling::PerRow,
            }),
        ];
        for q in quantizers {
            let t = q.quantize(&w).unwrap();
            let back = from_named_tensors(t.format(), t.shape(), t.named_tensors()).unwrap();
            assert_eq!((back.format(), back.shape()), (q.name(), (32, 64)));
            assert!(
                back.dequantize(Kind::Float)
                    .unwrap()
                    .equal(&t.dequantize(Kind::Float).unwrap()),
                "{}",
                q.name()
            );
        }
        let e = from_named_tensors("int4", (2, 2), vec![])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unknown quantized format `int4`; known: "),
            "{e}"
        );
        for known in ["nf4", "fp4", "int8", "fp8_e4m3", "fp8_e5m2"] {
            assert!(e.contains(known), "{e}");
        }
    }

    #[test]
    fn a_quantizer_without_load_cannot_reload() {
        #[derive(Debug)]
        struct Dense;
        impl Quantizer for Dense {
            fn name(&self) -> &str {
                "dense"
            }
            fn quantize(&self, _: &Tensor) -> Result<Box<dyn QuantizedTensor>> {
                Err(crate::Error::invalid("unused"))
            }
        }
        let e = Dense
            .load(
                (2, 2),
                vec![("w".into(), Tensor::zeros([2, 2], tch::kind::FLOAT_CPU))],
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`dense` cannot reload") && e.contains("parts w"),
            "{e}"
        );
    }
}
