//! Per-rank index sharding, the same as `torch.utils.data.DistributedSampler`.
//!
//! torch shuffles with `torch.randperm(n, generator=g)` where `g.manual_seed(seed + epoch)`;
//! that permutation comes from libtorch's CPU generator, an MT19937 seeded with the low 32 bits
//! of the seed, and `randperm_cpu`'s Fisher-Yates loop (`aten/src/ATen/native/TensorFactories.cpp`).
//! Both are reproduced here in plain Rust, so the shard does not touch tch's global generator.

/// The 32-bit Mersenne Twister (Matsumoto & Nishimura 1998) as libtorch's `at::mt19937`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// Seeds like `at::mt19937(seed)`: the low 32 bits, standard `init_genrand`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    /// The next 32-bit output (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Two outputs as one 64-bit value, high word first (`CPUGeneratorImpl::random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut g = Mt19937::new(seed);
    if n < (u32::MAX / 20) as usize {
        let mut r: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let z = (g.next_u32() as u64 % (n - i) as u64) as usize;
            r.swap(i, z + i);
        }
        r
    } else {
        // torch's "inside-out" variant for very large n (not cross-checked against torch: it
        // needs a permutation of more than 214 million indices).
        let mut r = vec![0usize; n];
        for i in 0..n {
            let z = (g.next_u64() % (i as u64 + 1)) as usize;
            r[i] = r[z];
            r[z] = i;
        }
        r
    }
}

/// The indices rank `rank` of `world` reads in `epoch`, as `DistributedSampler(dataset of n,
/// num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)` after
/// `set_epoch(epoch)`: the (optionally shuffled) index list is padded by repeating its start to
/// a multiple of `world`, and rank `r` takes every `world`-th index from position `r`. Every
/// rank gets `ceil(n / world)` indices; the ranks' shards are disjoint except for the padding.
/// Empty when `n == 0`, `world == 0` or `rank >= world`.
pub fn shard_indices(
    n: usize,
    rank: usize,
    world: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
) -> Vec<usize> {
    if n == 0 || world == 0 || rank >= world {
        return Vec::new();
    }
    let mut idx = if shuffle {
        torch_randperm(n, seed.wrapping_add(epoch))
    } else {
        (0..n).collect()
    };
    let total = n.div_ceil(world) * world;
    let mut k = 0;
    while idx.len() < total {
        idx.push(idx[k % n]);
        k += 1;
    }
    idx.into_iter().skip(rank).step_by(world).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_published_sequence() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995
        // (C++ standard, [rand.predef]).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn shards_cover_and_pad() {
        let n = 10;
        let shards: Vec<Vec<usize>> = (0..3).map(|r| shard_indices(n, r, 3, 7, 1, true)).collect();
        assert!(shards.iter().all(|s| s.len() == 4));
        let mut all: Vec<usize> = shards.concat();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert_ne!(
            shard_indices(n, 0, 3, 7, 1, true),
            shard_indices(n, 0, 3, 7, 2, true)
        );
        assert_eq!(shard_indices(5, 1, 2, 0, 0, false), vec![1, 3, 0]); // padded with index 0
        assert_eq!(shard_indices(5, 0, 2, 0, 0, false), vec![0, 2, 4]);
    }
}
