//! Intra-op threads of a data-parallel rank.
//!
//! libtorch gives every process as many intra-op threads as the machine has cores, so N ranks on
//! one machine run N times too many threads and slow each other down (measured on the bundled
//! job, 2 ranks on 2 cores: 1,336 tokens/s with the default vs 12,846 with one thread per rank).
//! `torchrun` sets `OMP_NUM_THREADS=1` per rank unless told otherwise; VoltTrain splits the
//! cores: `cores / local ranks`, at least 1.

/// Where a rank's thread count comes from ([`rank_threads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadSource {
    /// `training.threads`.
    Config,
    /// `OMP_NUM_THREADS` (libtorch reads it itself).
    OmpEnv,
    /// The cores divided by the ranks on this machine.
    SharedCores,
    /// Not a multi-rank run: libtorch's default.
    Default,
}

/// The intra-op thread count to set for this process, and why; `None` leaves libtorch's own
/// (its default, or `OMP_NUM_THREADS`, which libtorch reads at start-up).
///
/// `configured` is `training.threads` (0: unset), `omp` the value of `OMP_NUM_THREADS`,
/// `local_ranks` the processes of this job on this machine (`LOCAL_WORLD_SIZE`), `cores` the
/// cores this process may use.
pub fn rank_threads(
    configured: usize,
    omp: Option<&str>,
    local_ranks: Option<usize>,
    cores: usize,
) -> (Option<usize>, ThreadSource) {
    if configured > 0 {
        return (Some(configured), ThreadSource::Config);
    }
    if omp.is_some_and(|v| v.trim().parse::<usize>().is_ok_and(|n| n > 0)) {
        return (None, ThreadSource::OmpEnv);
    }
    match local_ranks {
        Some(n) if n > 1 => (Some((cores / n).max(1)), ThreadSource::SharedCores),
        _ => (None, ThreadSource::Default),
    }
}

/// The ranks of this job on this machine, from the launcher's environment: `LOCAL_WORLD_SIZE`
/// (torchrun, `volttrain --nproc`), else SLURM's `SLURM_NTASKS_PER_NODE` when it is one number.
pub fn local_ranks_from_env() -> Option<usize> {
    let num = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    num("LOCAL_WORLD_SIZE").or_else(|| num("SLURM_NTASKS_PER_NODE"))
}

/// The cores this process may run on (its CPU affinity and cgroup quota), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets this rank's intra-op threads by [`rank_threads`] from `training.threads` and the
/// environment; returns the count set and why (for the log).
pub fn apply_rank_threads(configured: usize) -> (Option<usize>, ThreadSource) {
    let omp = std::env::var("OMP_NUM_THREADS").ok();
    let r = rank_threads(
        configured,
        omp.as_deref(),
        local_ranks_from_env(),
        available_cores(),
    );
    if let (Some(n), _) = r {
        tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_the_cores_unless_told() {
        assert_eq!(
            rank_threads(0, None, Some(2), 2),
            (Some(1), ThreadSource::SharedCores)
        );
        assert_eq!(
            rank_threads(0, None, Some(4), 16),
            (Some(4), ThreadSource::SharedCores)
        );
        // More ranks than cores: still one thread each.
        assert_eq!(
            rank_threads(0, None, Some(8), 2),
            (Some(1), ThreadSource::SharedCores)
        );
        assert_eq!(
            rank_threads(3, None, Some(2), 2),
            (Some(3), ThreadSource::Config)
        );
        assert_eq!(
            rank_threads(3, Some("5"), Some(2), 2),
            (Some(3), ThreadSource::Config)
        );
        assert_eq!(
            rank_threads(0, Some("5"), Some(2), 2),
            (None, ThreadSource::OmpEnv)
        );
        // An unusable OMP_NUM_THREADS does not count.
        assert_eq!(
            rank_threads(0, Some(""), Some(2), 4),
            (Some(2), ThreadSource::SharedCores)
        );
        assert_eq!(
            rank_threads(0, None, Some(1), 8),
            (None, ThreadSource::Default)
        );
        assert_eq!(
            rank_threads(0, None, None, 8),
            (None, ThreadSource::Default)
        );
    }
}
