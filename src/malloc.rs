//! glibc allocator settings: keeping freed memory between training steps, and handing it back
//! while a quantizing load runs. No-ops where glibc is not the C library.
//!
//! ## Keeping freed memory between training steps
//!
//! libtorch allocates CPU tensors with `malloc`. A training step allocates and frees the same
//! few gigabytes of activations every step, and glibc's defaults hand large blocks back to the
//! kernel (`mmap` for blocks above its threshold, trimming of the heap top), so the next step
//! takes them again page by page: the kernel zeroes every page on first touch. Measured on the
//! SmolLM2-135M LoRA step (2 threads), page faults and page zeroing took 10-15% of the step.
//! PyTorch's CPU performance guide recommends an allocator that keeps memory (jemalloc,
//! tcmalloc) for the same reason.
//!
//! [`keep_freed_memory`] sets glibc's `M_MMAP_MAX = 0` (large blocks come from the heap) and
//! `M_TRIM_THRESHOLD = -1` (the heap is never trimmed), both documented in `mallopt(3)`. The
//! resident size then stays at its peak instead of shrinking between steps, and the peak itself
//! grows: with every large block on the heap, fragmentation costs memory. Measured with
//! `./dev bench --quick --only sft`, then the same with `VOLTTRAIN_BENCH_KEEP_FREED_MEMORY=0`
//! (8 layers, batch 4x256, with the fused CPU ops), peak RSS with / without: LoRA 1289 /
//! 1163 MB, full fine-tuning 1943 / 1717 MB, NF4 QLoRA 1445 / 1336 MB, LoRA with gradient
//! checkpointing 1066 / 948 MB (+8-13%), for 9% more tokens/s on the LoRA step and none on full
//! fine-tuning. (Before the fused ops, which keep far fewer intermediates, the cost was +25-33%
//! for about 8%.) It is process-wide; an embedding
//! application turns it off with `TrainerBuilder::keep_freed_memory(false)`, a YAML run with
//! `training.keep_freed_memory: false` (do so when memory is the point, as with QLoRA).

/// Applies the settings once per process; a no-op where glibc is not the C library.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; both values are documented.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
            };
            if !ok {
                tracing::warn!("mallopt refused the training allocator settings; continuing");
            }
        });
    }
}

/// Hands the allocator's free pages back to the system (glibc `malloc_trim`).
///
/// Freed tensors do not leave the process by themselves: glibc raises its mmap threshold to
/// the size of each freed mmapped block (up to 32 MiB), so from the first freed weight on, the
/// full-precision tensors and the quantizer's temporaries come from the heap, and the small
/// quantized tensors allocated in between pin the freed space. Measured on a 16-layer model,
/// that kept more than the whole fp32 model resident after an int8 load
/// (`tests/quant_load_memory.rs`). `malloc_trim(0)` releases every free page in every arena
/// (`MADV_DONTNEED`), which keeps a quantizing load at the quantized size plus the tensors in
/// flight. A no-op elsewhere.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers and only returns free memory to the kernel;
        // glibc serializes it with the allocator's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
