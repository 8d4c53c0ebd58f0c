//! The `quantization` section of the configuration, and the legacy `model.train_4bit` /
//! `model.train_8bit` switches.
//!
//! ```yaml
//! quantization:
//!   name: nf4            # nf4 | fp4 | int8 | fp8_e4m3 | fp8_e5m2, or a registered quantizer
//!                        # (`type:` is accepted as the old spelling)
//!   block_size: 64       # 4-bit only: values per absmax block (bitsandbytes default 64)
//!   double_quant: true   # 4-bit only: quantize the absmax to 8 bits (bitsandbytes compress_statistics)
//!   compute_dtype: bfloat16   # optional: float32 | bfloat16 | float16; default: the input's dtype
//!   scaling: per_tensor  # FP8 only: per_tensor | per_row (torchao's default is per tensor)
//! ```

use std::fmt;
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::fp8::{Fp8Format, Fp8Quantizer, Fp8Scaling};
use super::int8::Int8Quantizer;
use super::nf4::{FourBitQuantizer, FourBitType, VALID_BLOCK_SIZES};
use super::{QuantizedTensor, Quantizer};
use crate::error::{Error, Result, TchResultExt};

/// The storage formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuantType {
    /// 4-bit NormalFloat in blocks with an absmax each (bitsandbytes `nf4`, QLoRA).
    #[serde(rename = "nf4")]
    Nf4,
    /// 4-bit float in blocks with an absmax each (bitsandbytes `fp4`).
    #[serde(rename = "fp4")]
    Fp4,
    /// 8-bit integers with one absmax per row (LLM.int8()'s vector-wise quantization).
    #[serde(rename = "int8")]
    Int8,
    /// FP8 with 4 exponent and 3 mantissa bits (max 448).
    #[serde(rename = "fp8_e4m3")]
    Fp8E4m3,
    /// FP8 with 5 exponent and 2 mantissa bits (max 57344).
    #[serde(rename = "fp8_e5m2")]
    Fp8E5m2,
}

impl QuantType {
    /// The YAML and registry name (`nf4`, `fp8_e4m3`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int8 => "int8",
            QuantType::Fp8E4m3 => "fp8_e4m3",
            QuantType::Fp8E5m2 => "fp8_e5m2",
        }
    }

    fn is_4bit(self) -> bool {
        matches!(self, QuantType::Nf4 | QuantType::Fp4)
    }

    fn is_fp8(self) -> bool {
        matches!(self, QuantType::Fp8E4m3 | QuantType::Fp8E5m2)
    }
}

/// The dtype the quantized linear layers multiply in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// fp32 (`float32`): the fast choice on CPUs without bf16 instructions.
    Float32,
    /// bf16 (`bfloat16`), as QLoRA on GPUs.
    Bfloat16,
    /// fp16 (`float16`).
    Float16,
}

impl ComputeDtype {
    /// The tch kind of this dtype.
    pub fn kind(self) -> Kind {
        match self {
            ComputeDtype::Float32 => Kind::Float,
            ComputeDtype::Bfloat16 => Kind::BFloat16,
            ComputeDtype::Float16 => Kind::Half,
        }
    }
}

fn default_block_size() -> i64 {
    64
}

/// The `quantization` section of a built-in format (a registered quantizer of a host or plugin
/// takes its own options, see [`crate::config::QuantizationSection`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// The format: the selector `name:` (`type:` is accepted too).
    #[serde(rename = "name", alias = "type")]
    pub quant_type: QuantType,
    /// Values per absmax block for NF4/FP4; default 64 (bitsandbytes `quantize_4bit`).
    #[serde(default = "default_block_size")]
    pub block_size: i64,
    /// Double quantization of the 4-bit absmax; default false (bitsandbytes'
    /// `compress_statistics` default). `model.train_4bit` turns it on, as QLoRA does.
    #[serde(default)]
    pub double_quant: bool,
    /// Dtype of the quantized products; default: the input's dtype (fp32 on CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<ComputeDtype>,
    /// FP8 scale granularity; default per tensor (torchao Float8Linear's tensorwise recipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Fp8Scaling>,
}

impl QuantConfig {
    /// A config of `quant_type` with the defaults.
    pub fn new(quant_type: QuantType) -> Self {
        QuantConfig {
            quant_type,
            block_size: default_block_size(),
            double_quant: false,
            compute_dtype: None,
            scaling: None,
        }
    }

    /// The quantization the legacy switches ask for: `model.train_4bit` is NF4 with block size
    /// 64 and double quantization (the QLoRA setting of transformers' `BitsAndBytesConfig`
    /// as the reference used it: `bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`),
    /// `model.train_8bit` is row-wise int8. Both at once is an error.
    pub fn from_legacy(train_4bit: bool, train_8bit: bool) -> Result<Option<QuantConfig>> {
        match (train_4bit, train_8bit) {
            (true, true) => Err(Error::config(
                "model.train_4bit",
                "`train_4bit` and `train_8bit` are both true; choose one (or a `quantization` section)",
            )),
            (true, false) => Ok(Some(QuantConfig {
                double_quant: true,
                ..QuantConfig::new(QuantType::Nf4)
            })),
            (false, true) => Ok(Some(QuantConfig::new(QuantType::Int8))),
            (false, false) => Ok(None),
        }
    }

    /// Merges the legacy switches with an explicit section: the section wins when the switches
    /// agree with it or are off; a switch that contradicts the section is an error.
    pub fn resolve(
        section: Option<QuantConfig>,
        train_4bit: bool,
        train_8bit: bool,
    ) -> Result<Option<QuantConfig>> {
        let legacy = Self::from_legacy(train_4bit, train_8bit)?;
        match (section, legacy) {
            (Some(s), Some(l)) => {
                let agrees = (l.quant_type == QuantType::Int8 && s.quant_type == QuantType::Int8)
                    || (l.quant_type == QuantType::Nf4 && s.quant_type.is_4bit());
                if agrees {
                    s.validate()?;
                    Ok(Some(s))
                } else {
                    let key = if train_4bit {
                        "model.train_4bit"
                    } else {
                        "model.train_8bit"
                    };
                    Err(Error::config(
                        key,
                        format!(
                            "contradicts `quantization.name: {}`; remove the switch or the section",
                            s.quant_type.name()
                        ),
                    ))
                }
            }
            (Some(s), None) => {
                s.validate()?;
                Ok(Some(s))
            }
            (None, l) => Ok(l),
        }
    }

    /// Checks the combination of fields; messages name the config key.
    pub fn validate(&self) -> Result<()> {
        let t = self.quant_type;
        if t.is_4bit() && !VALID_BLOCK_SIZES.contains(&self.block_size) {
            return Err(Error::config(
                "quantization.block_size",
                format!(
                    "{} needs one of {VALID_BLOCK_SIZES:?}, got {}",
                    t.name(),
                    self.block_size
                ),
            ));
        }
        if !t.is_4bit() && self.block_size != default_block_size() {
            return Err(Error::config(
                "quantization.block_size",
                format!(
                    "only nf4/fp4 use a block size; {} is scaled per row or tensor",
                    t.name()
                ),
            ));
        }
        if self.double_quant && !t.is_4bit() {
            return Err(Error::config(
                "quantization.double_quant",
                format!("only nf4/fp4 have double quantization, not {}", t.name()),
            ));
        }
        if self.scaling.is_some() && !t.is_fp8() {
            return Err(Error::config(
                "quantization.scaling",
                format!("only fp8_e4m3/fp8_e5m2 take a scaling, not {}", t.name()),
            ));
        }
        Ok(())
    }

    /// The quantizer this section describes (wrapped to cast to `compute_dtype` when set).
    pub fn quantizer(&self) -> Result<Arc<dyn Quantizer>> {
        self.validate()?;
        let inner: Arc<dyn Quantizer> = match self.quant_type {
            QuantType::Nf4 => Arc::new(FourBitQuantizer::new(
                FourBitType::Nf4,
                self.block_size,
                self.double_quant,
            )?),
            QuantType::Fp4 => Arc::new(FourBitQuantizer::new(
                FourBitType::Fp4,
                self.block_size,
                self.double_quant,
            )?),
            QuantType::Int8 => Arc::new(Int8Quantizer),
            QuantType::Fp8E4m3 | QuantType::Fp8E5m2 => Arc::new(Fp8Quantizer {
                format: if self.quant_type == QuantType::Fp8E4m3 {
                    Fp8Format::E4m3
                } else {
                    Fp8Format::E5m2
                },
                scaling: self.scaling.unwrap_or_default(),
            }),
        };
        Ok(match self.compute_dtype {
            None => inner,
            Some(d) => Arc::new(ComputeKindQuantizer {
                inner,
                kind: d.kind(),
            }),
        })
    }
}

/// Wraps a quantizer so its tensors multiply in a fixed dtype.
#[derive(Debug)]
struct ComputeKindQuantizer {
    inner: Arc<dyn Quantizer>,
    kind: Kind,
}

impl Quantizer for ComputeKindQuantizer {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn quantize(&self, weight: &Tensor) -> Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(ComputeKindTensor {
            inner: self.inner.quantize(weight)?,
            kind: self.kind,
        }))
    }

    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(ComputeKindTensor {
            inner: self.inner.load(shape, parts)?,
            kind: self.kind,
        }))
    }
}

/// A quantized tensor whose `linear` casts the input to `kind`, multiplies, and casts back.
struct ComputeKindTensor {
    inner: Box<dyn QuantizedTensor>,
    kind: Kind,
}

impl fmt::Debug for ComputeKindTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} computing in {:?}", self.inner, self.kind)
    }
}

impl QuantizedTensor for ComputeKindTensor {
    fn format(&self) -> &str {
        self.inner.format()
    }

    fn shape(&self) -> (i64, i64) {
        self.inner.shape()
    }

    fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        self.inner.dequantize(kind)
    }

    fn storage_bytes(&self) -> usize {
        self.inner.storage_bytes()
    }

    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        if x.kind() == self.kind {
            return self.inner.linear(x);
        }
        let y = self.inner.linear(
            &x.f_to_kind(self.kind)
                .ctx("quantized linear: input to compute dtype")?,
        )?;
        y.f_to_kind(x.kind())
            .ctx("quantized linear: output to input dtype")
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.inner.named_tensors()
    }
}
