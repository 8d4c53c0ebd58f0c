//! The key/value cache of incremental decoding: each attention layer keeps the rotated keys and
//! the values of every position seen so far, so that a new token costs one position's work
//! instead of the whole sequence's (transformers' `DynamicCache`).
//!
//! Each layer's buffer grows by doubling and is written in place, so appending one position is
//! a copy of that position only (transformers concatenates the whole cache each step).

use tch::Tensor;

use crate::error::{Error, Result, TchResultExt};

/// The cached keys and values of one attention layer, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Default)]
pub struct LayerKv {
    /// `(keys, values)` buffers with room for `capacity` positions along dimension 2.
    buf: Option<(Tensor, Tensor)>,
    len: i64,
}

impl LayerKv {
    /// Positions cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k` and `v` (`[batch, kv_heads, new, head_dim]`) and returns the keys and values
    /// of every position cached so far, the new ones last.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = k.size();
        if size.len() != 4 || v.size() != size {
            return Err(Error::Shape {
                op: "kv cache".into(),
                msg: format!(
                    "keys and values must be [batch, heads, seq, head_dim] alike, got {size:?} and {:?}",
                    v.size()
                ),
            });
        }
        let t = size[2];
        let need = self.len + t;
        let grow = match &self.buf {
            None => true,
            Some((bk, _)) => {
                let bs = bk.size();
                let fits = bs[0] == size[0] && bs[1] == size[1] && bs[3] == size[3];
                if !fits && self.len == 0 {
                    true
                } else if !fits {
                    return Err(Error::Shape {
                        op: "kv cache".into(),
                        msg: format!(
                            "new keys {size:?} do not fit the cached {bs:?}; clear the cache for another batch"
                        ),
                    });
                } else {
                    bs[2] < need
                }
            }
        };
        if grow {
            let cap = (need.max(16) as u64).next_power_of_two() as i64;
            let shape = [size[0], size[1], cap, size[3]];
            let opts = (k.kind(), k.device());
            let nk = Tensor::f_empty(shape, opts).ctx("kv cache alloc")?;
            let nv = Tensor::f_empty(shape, opts).ctx("kv cache alloc")?;
            if let Some((bk, bv)) = &self.buf
                && self.len > 0
            {
                nk.f_narrow(2, 0, self.len)
                    .ctx("kv cache grow")?
                    .f_copy_(&bk.f_narrow(2, 0, self.len).ctx("kv cache grow")?)
                    .ctx("kv cache grow")?;
                nv.f_narrow(2, 0, self.len)
                    .ctx("kv cache grow")?
                    .f_copy_(&bv.f_narrow(2, 0, self.len).ctx("kv cache grow")?)
                    .ctx("kv cache grow")?;
            }
            self.buf = Some((nk, nv));
        }
        let Some((bk, bv)) = &self.buf else {
            return Err(Error::Internal("kv cache: no buffer after growing".into()));
        };
        let _g = tch::no_grad_guard();
        bk.f_narrow(2, self.len, t)
            .ctx("kv cache write")?
            .f_copy_(k)
            .ctx("kv cache write keys")?;
        bv.f_narrow(2, self.len, t)
            .ctx("kv cache write")?
            .f_copy_(v)
            .ctx("kv cache write values")?;
        self.len = need;
        Ok((
            bk.f_narrow(2, 0, need).ctx("kv cache read")?,
            bv.f_narrow(2, 0, need).ctx("kv cache read")?,
        ))
    }
}

/// The key/value cache of a whole model: one [`LayerKv`] per decoder layer.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
        }
    }

    /// Positions cached (those of the first layer; all layers agree after a forward pass).
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, LayerKv::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`'s cache.
    pub fn layer_mut(&mut self, i: usize) -> Result<&mut LayerKv> {
        let n = self.layers.len();
        self.layers
            .get_mut(i)
            .ok_or_else(|| Error::invalid(format!("kv cache: layer {i} out of range ({n} layers)")))
    }

    /// Forgets every cached position (keeps the buffers' memory for reuse).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.len = 0;
        }
    }
}
