//! Row-wise absmax int8 weights (LLM.int8()'s vector-wise quantization without outliers).
//!
//! Matches `bitsandbytes.functional.int8_vectorwise_quant(A, threshold=0)`:
//! `stats[r] = max_c |W[r, c]|` (fp32), `codes = round(W * (127 / stats))` as int8 (round half to
//! even), and `int8_vectorwise_dequant`: `codes * stats * (1 / 127)`. One byte per parameter plus
//! one fp32 scale per row; the rounding error of each element is at most `stats[r] / 254`
//! (half a quantization step of `stats[r] / 127`).

use tch::{Kind, Tensor};

use super::{QuantParts, QuantizedTensor, Quantizer, check_weight, tensor_bytes};
use crate::error::{Error, Result, TchResultExt};

/// `1 / 127` as bitsandbytes writes it (`7.874015718698502e-3`).
const INV_127: f64 = 7.874_015_718_698_502e-3;

/// Produces [`Int8Tensor`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8Quantizer;

impl Quantizer for Int8Quantizer {
    fn name(&self) -> &str {
        "int8"
    }

    fn quantize(&self, weight: &Tensor) -> Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(Int8Tensor::quantize(weight)?))
    }

    /// Parts `codes` and `stats` ([`Int8Tensor::from_parts`]).
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        let mut p = QuantParts::new(self.name(), shape, parts);
        Ok(Box::new(Int8Tensor::from_parts(
            p.take("codes")?,
            p.take("stats")?,
        )?))
    }
}

/// A weight as int8 codes with one fp32 absmax per row.
#[derive(Debug)]
pub struct Int8Tensor {
    codes: Tensor,
    stats: Tensor,
}

impl Int8Tensor {
    /// Quantizes a 2-D weight row-wise. An all-zero row gets scale 0 and codes 0.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (rows, cols) = check_weight("int8", weight)?;
        if rows == 0 || cols == 0 {
            return Err(Error::Shape {
                op: "int8 quantization".into(),
                msg: format!("int8 quantization of an empty weight [{rows}, {cols}]"),
            });
        }
        let ctx = |what: &str| format!("int8 quantize [{rows}, {cols}]: {what}");
        let _g = tch::no_grad_guard();
        let w = weight.f_to_kind(Kind::Float).ctx(ctx("to fp32"))?;
        let stats = w
            .f_abs()
            .ctx(ctx("abs"))?
            .f_amax([1], false)
            .ctx(ctx("row absmax"))?;
        super::check_finite("int8", (rows, cols), &stats)?;
        // bitsandbytes: A * (127.0 / row_stats), i.e. reciprocal(row_stats) * 127; zero rows
        // (where it would produce 0 * inf = NaN) get a factor of 0
        let factor = stats
            .f_reciprocal()
            .ctx(ctx("scale"))?
            .f_mul_scalar(127.0)
            .ctx(ctx("scale"))?;
        let factor = factor
            .f_where_self(
                &stats.f_gt(0.0).ctx(ctx("scale"))?,
                &factor.f_zeros_like().ctx(ctx("scale"))?,
            )
            .ctx(ctx("scale"))?;
        let codes = w
            .f_mul(&factor.f_unsqueeze(-1).ctx(ctx("scale"))?)
            .ctx(ctx("scale"))?
            .f_round()
            .ctx(ctx("round"))?
            .f_to_kind(Kind::Int8)
            .ctx(ctx("to int8"))?;
        Ok(Int8Tensor { codes, stats })
    }

    /// Rebuilds a tensor from int8 `codes [rows, cols]` and fp32 row `stats [rows]`.
    pub fn from_parts(codes: Tensor, stats: Tensor) -> Result<Self> {
        let size = codes.size();
        if codes.kind() != Kind::Int8 || size.len() != 2 {
            return Err(Error::Shape {
                op: "int8 tensor".into(),
                msg: format!("codes must be 2-D int8, got {:?} {size:?}", codes.kind()),
            });
        }
        if stats.kind() != Kind::Float || stats.numel() as i64 != size[0] {
            return Err(Error::Shape {
                op: "int8 tensor".into(),
                msg: format!(
                    "stats must be {} fp32 values, got {:?} {:?}",
                    size[0],
                    stats.kind(),
                    stats.size()
                ),
            });
        }
        let stats = stats.f_reshape([size[0]]).ctx("int8 stats")?;
        Ok(Int8Tensor { codes, stats })
    }

    /// The int8 codes `[rows, cols]`.
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// The fp32 absmax of each row `[rows]` (the scale is `stats / 127`).
    pub fn stats(&self) -> &Tensor {
        &self.stats
    }
}

impl QuantizedTensor for Int8Tensor {
    fn format(&self) -> &str {
        "int8"
    }

    fn shape(&self) -> (i64, i64) {
        let s = self.codes.size();
        (s[0], s[1])
    }

    fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let ctx = || format!("int8 dequantize {:?}", self.shape());
        let out = self
            .codes
            .f_mul(&self.stats.f_view([-1, 1]).ctx(ctx())?)
            .ctx(ctx())?
            .f_mul_scalar(INV_127)
            .ctx(ctx())?;
        if kind == Kind::Float {
            Ok(out)
        } else {
            out.f_to_kind(kind).ctx(ctx())
        }
    }

    fn storage_bytes(&self) -> usize {
        tensor_bytes(&self.codes) + tensor_bytes(&self.stats)
    }

    /// `x W^T`; with a gradient to record, through the shim's autograd function, which
    /// dequantizes in forward and again in backward and keeps no dense weight
    /// ([`super::qlinear`]).
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        if x.requires_grad() {
            let (rows, cols) = self.shape();
            let parts = super::qlinear::Parts {
                format: super::qlinear::Format::Int8,
                tensors: vec![&self.codes, &self.stats],
                rows,
                cols,
                block_size: 0,
                offset: 0.0,
            };
            return super::qlinear::linear(&parts, x, None);
        }
        let w = self.dequantize(x.kind())?;
        x.f_linear::<&Tensor>(&w, None).ctx("int8 linear")
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("codes".to_string(), self.codes.shallow_clone()),
            ("stats".to_string(), self.stats.shallow_clone()),
        ]
    }
}
