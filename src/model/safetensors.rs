//! Reading and writing `.safetensors` files as tch tensors.
//!
//! Files are memory-mapped; each tensor is copied once, straight into the requested kind and
//! device, so reading a checkpoint holds at most one converted tensor beyond what is kept.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TchResultExt, write_atomic};

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8 + header length).
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafetensorsFile({}, {} tensors)",
            self.path.display(),
            self.infos.len()
        )
    }
}

/// The tch kind of a safetensors dtype, for the dtypes checkpoints use.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype of a tch kind.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint changed on disk while loading is a user
        // error that can give wrong values but not unsafety in our code (we copy out of it).
        let mmap = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| Error::io(path, e))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
        let infos = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            infos,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors in the file (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(String::as_str)
    }

    /// Shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.infos
            .get(name)
            .map(|i| i.shape.iter().map(|&d| d as i64).collect())
    }

    /// Reads tensor `name` converted to `kind` on `device` (`kind: None` keeps the stored kind).
    pub fn tensor(&self, name: &str, kind: Option<Kind>, device: Device) -> Result<Tensor> {
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor `{name}` not found")))?;
        let src_kind = kind_of(info.dtype).ok_or_else(|| {
            Error::checkpoint(
                &self.path,
                format!("tensor `{name}` has unsupported dtype {:?}", info.dtype),
            )
        })?;
        let (a, b) = info.data_offsets;
        let bytes = self
            .mmap
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| {
                Error::checkpoint(&self.path, format!("tensor `{name}`: data out of range"))
            })?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let numel: i64 = shape.iter().product();
        if bytes.len() != numel as usize * src_kind.elt_size_in_bytes() {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes for shape {shape:?} of {:?}",
                    bytes.len(),
                    info.dtype
                ),
            ));
        }
        let kind = kind.unwrap_or(src_kind);
        let ctx = || {
            format!(
                "{}: tensor `{name}` to {kind:?} on {device:?}",
                self.path.display()
            )
        };
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(src_kind.elt_size_in_bytes());
        if aligned && (kind != src_kind || device != Device::Cpu) {
            // One copy: view the mapped bytes, convert into a fresh tensor.
            // SAFETY: `bytes` has exactly `numel` elements of `src_kind` (checked above), is
            // aligned for it, and outlives the view, which `f_to_device_` with copy = true
            // leaves behind before this function returns.
            let view =
                unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], src_kind, Device::Cpu) }
                    .ctx(ctx())?;
            return view.f_to_device_(device, kind, false, true).ctx(ctx());
        }
        let t = Tensor::f_from_data_size(bytes, &shape, src_kind).ctx(ctx())?;
        if kind == src_kind && device == Device::Cpu {
            Ok(t)
        } else {
            t.f_to_device_(device, kind, false, false).ctx(ctx())
        }
    }
}

/// Bytes of one tensor for serialization.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serializes named tensors to safetensors bytes (each tensor copied to CPU, contiguous).
pub fn to_safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut blobs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| Error::Shape {
            op: "safetensors".into(),
            msg: format!("tensor `{name}`: kind {:?} cannot be saved", t.kind()),
        })?;
        let t = t
            .f_detach()
            .ctx(format!("save `{name}`"))?
            .f_to_device(Device::Cpu)
            .ctx(format!("save `{name}` to cpu"))?
            .f_contiguous()
            .ctx(format!("save `{name}`"))?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .ctx(format!("save `{name}` copy"))?;
        blobs.push((
            name.clone(),
            Blob {
                dtype,
                shape: t.size().iter().map(|&d| d as usize).collect(),
                data,
            },
        ));
    }
    safetensors::serialize(blobs, metadata).map_err(|e| Error::Shape {
        op: "safetensors serialization".into(),
        msg: format!("{e}"),
    })
}

/// Writes named tensors to `path` atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = to_safetensors_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a file in its stored kind on the CPU, by name.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let f = SafetensorsFile::open(path)?;
    let names: Vec<String> = f.names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n, None, Device::Cpu)?;
            Ok((n, t))
        })
        .collect()
}
