//! Deterministic batch iteration: shuffle keyed by `(seed, epoch)`, shard `rank` of `world`,
//! skip to a position (resume).

use std::sync::Arc;

use super::collator::{Batch, Collator};
use super::dataset::{Example, SftDataset};
use crate::error::{Error, Result};

/// SplitMix64 (Steele, Lea, Flood 2014): a small fixed generator, so a `(seed, epoch)` order is
/// the same on every platform and version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias below 2^-32 for our sizes).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// The order of `n` items for `(seed, epoch)`: a Fisher-Yates shuffle, or `0..n` without shuffle.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for i in (1..n).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
    }
    order
}

/// Which items each batch of an epoch holds, for one rank.
///
/// Sharding follows PyTorch's `DistributedSampler(drop_last=False)`: the epoch order is padded
/// by repeating its start until it divides by `world`, and rank `r` takes items `r, r+world, …`,
/// so every rank runs the same number of steps.
#[derive(Debug, Clone)]
pub struct BatchIter {
    items: Vec<usize>,
    batch_size: usize,
    drop_last: bool,
    pos: usize,
}

impl BatchIter {
    /// The batches of `epoch` over `n_items` items with `opts` (batch size, seed, shuffle,
    /// drop_last, rank/world; `packing` is not used here).
    pub fn new(n_items: usize, epoch: u64, opts: &LoaderOptions) -> Result<BatchIter> {
        let LoaderOptions {
            batch_size,
            seed,
            shuffle,
            drop_last,
            rank,
            world,
            ..
        } = *opts;
        if batch_size == 0 {
            return Err(Error::config("training.batch_size", "must be at least 1"));
        }
        if world == 0 || rank >= world {
            return Err(Error::invalid(format!(
                "data shard: rank {rank} of world {world} is out of range"
            )));
        }
        let mut order = epoch_order(n_items, seed, epoch, shuffle);
        if world > 1 && n_items > 0 {
            let total = n_items.div_ceil(world) * world;
            let mut i = 0;
            while order.len() < total {
                order.push(order[i % n_items]);
                i += 1;
            }
        }
        let items = order.into_iter().skip(rank).step_by(world).collect();
        Ok(BatchIter {
            items,
            batch_size,
            drop_last,
            pos: 0,
        })
    }

    /// Number of batches in the epoch (for this rank).
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.items.len() / self.batch_size
        } else {
            self.items.len().div_ceil(self.batch_size)
        }
    }

    /// Batches already taken (the resume position).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Jumps to batch `pos` (resume); past the end means the epoch is done.
    pub fn skip_to(&mut self, pos: usize) {
        self.pos = pos.min(self.num_batches());
    }
}

impl Iterator for BatchIter {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.pos >= self.num_batches() {
            return None;
        }
        let s = self.pos * self.batch_size;
        let e = (s + self.batch_size).min(self.items.len());
        self.pos += 1;
        Some(self.items[s..e].to_vec())
    }
}

/// Settings of a [`DataLoader`].
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Examples per batch.
    pub batch_size: usize,
    /// Seed of the per-epoch shuffle (the order of epoch `e` depends on `seed` and `e` only).
    pub seed: u64,
    /// Shuffle the examples each epoch (training); false keeps file order (eval).
    pub shuffle: bool,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// This process's rank (0-based): it takes every `world`-th example of the epoch's order, from
    /// the `rank`-th on.
    pub rank: usize,
    /// Number of data-parallel processes (1 for a single process).
    pub world: usize,
    /// `Some(max_seq_len)`: pack examples into rows of that many tokens.
    pub packing: Option<usize>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 8,
            seed: 42,
            shuffle: true,
            drop_last: false,
            rank: 0,
            world: 1,
            packing: None,
        }
    }
}

/// Batches of a dataset: the items (examples, or packed rows of examples) in a deterministic
/// order per epoch, collated on demand.
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: Arc<SftDataset>,
    collator: Collator,
    opts: LoaderOptions,
    /// Packed rows (example indices), or one item per example.
    rows: Option<Vec<Vec<usize>>>,
}

impl DataLoader {
    /// A loader over `dataset` that collates with `collator`.
    pub fn new(dataset: Arc<SftDataset>, collator: Collator, opts: LoaderOptions) -> Self {
        let rows = opts.packing.map(|len| dataset.pack(len));
        DataLoader {
            dataset,
            collator,
            opts,
            rows,
        }
    }

    /// The dataset it reads.
    pub fn dataset(&self) -> &SftDataset {
        &self.dataset
    }

    /// Number of items (examples, or packed rows).
    pub fn num_items(&self) -> usize {
        match &self.rows {
            Some(r) => r.len(),
            None => self.dataset.len(),
        }
    }

    /// The index batches of `epoch`, starting at batch `start` (resume).
    pub fn batches(&self, epoch: u64, start: usize) -> Result<BatchIter> {
        let mut it = BatchIter::new(self.num_items(), epoch, &self.opts)?;
        it.skip_to(start);
        Ok(it)
    }

    /// Batches per epoch for this rank.
    pub fn num_batches(&self) -> Result<usize> {
        Ok(self.batches(0, 0)?.num_batches())
    }

    /// Collates the items `idx` (from [`DataLoader::batches`]).
    pub fn collate(&self, idx: &[usize]) -> Result<Batch> {
        let ex = |i: usize| -> Result<&Example> {
            self.dataset.examples.get(i).ok_or_else(|| {
                Error::invalid(format!(
                    "batch index {i} out of range ({})",
                    self.dataset.len()
                ))
            })
        };
        match &self.rows {
            None => {
                let v: Vec<&Example> = idx.iter().map(|&i| ex(i)).collect::<Result<_>>()?;
                self.collator.collate(&v)
            }
            Some(rows) => {
                let mut packed = Vec::with_capacity(idx.len());
                for &i in idx {
                    let row = rows.get(i).ok_or_else(|| {
                        Error::invalid(format!("packed row {i} out of range ({})", rows.len()))
                    })?;
                    packed.push(row.iter().map(|&j| ex(j)).collect::<Result<Vec<_>>>()?);
                }
                self.collator.collate_packed(&packed)
            }
        }
    }

    /// Iterates the collated batches of `epoch` from batch `start`.
    pub fn epoch(
        &self,
        epoch: u64,
        start: usize,
    ) -> Result<impl Iterator<Item = Result<Batch>> + '_> {
        let it = self.batches(epoch, start)?;
        Ok(it.map(move |idx| self.collate(&idx)))
    }
}

/// The padding id of `tok`: its pad token, else its EOS token (as the reference collators do).
pub fn pad_id(tok: &super::Tokenizer) -> Result<i64> {
    Ok(tok
        .pad()
        .or(tok.eos())
        .ok_or_else(|| Error::Tokenizer {
            path: tok.dir().to_path_buf(),
            msg: "no pad and no eos token: set pad_token in tokenizer_config.json".into(),
        })?
        .id as i64)
}

/// A loader with deterministic index batches per epoch, collated on demand: what a
/// [`LoaderSource`] serves. [`DataLoader`] (SFT examples) and
/// [`PreferenceLoader`](super::PreferenceLoader) (preference pairs) are ones.
pub trait EpochBatches: Send {
    /// The index batches of `epoch` from batch `start`, for this rank.
    fn batches(&self, epoch: u64, start: usize) -> Result<BatchIter>;
    /// Collates the items `idx` (one batch of [`EpochBatches::batches`]).
    fn collate(&self, idx: &[usize]) -> Result<Batch>;
}

impl EpochBatches for DataLoader {
    fn batches(&self, epoch: u64, start: usize) -> Result<BatchIter> {
        DataLoader::batches(self, epoch, start)
    }
    fn collate(&self, idx: &[usize]) -> Result<Batch> {
        DataLoader::collate(self, idx)
    }
}

impl EpochBatches for super::PreferenceLoader {
    fn batches(&self, epoch: u64, start: usize) -> Result<BatchIter> {
        super::PreferenceLoader::batches(self, epoch, start)
    }
    fn collate(&self, idx: &[usize]) -> Result<Batch> {
        super::PreferenceLoader::collate(self, idx)
    }
}

/// [`BatchSource`](crate::trainer::BatchSource) over a loader ([`DataLoader`] by default): what
/// the trainer reads its batches from. The index batches of an epoch are computed once.
pub struct LoaderSource<L: EpochBatches = DataLoader> {
    loader: L,
    epoch: Option<(usize, Vec<Vec<usize>>)>,
}

impl<L: EpochBatches> LoaderSource<L> {
    /// Serves the batches of `loader`.
    pub fn new(loader: L) -> Self {
        LoaderSource {
            loader,
            epoch: None,
        }
    }
}

impl<L: EpochBatches> crate::trainer::BatchSource for LoaderSource<L> {
    fn num_batches(&self, _epoch: usize) -> usize {
        self.loader.batches(0, 0).map_or(0, |b| b.num_batches())
    }

    fn batch(&mut self, epoch: usize, index: usize) -> Result<Batch> {
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let batches: Vec<Vec<usize>> = self.loader.batches(epoch as u64, 0)?.collect();
            self.epoch = Some((epoch, batches));
        }
        let idx = self
            .epoch
            .as_ref()
            .and_then(|(_, b)| b.get(index))
            .ok_or_else(|| {
                Error::invalid(format!("batch {index} of epoch {epoch} out of range"))
            })?;
        self.loader.collate(idx)
    }
}
