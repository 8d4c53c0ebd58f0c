//! glibc allocator settings: keeping freed memory between training steps, and handing it back
//! while a quantizing load runs. No-ops where glibc is not the C library.
//!
//! ## Only when asked
//!
//! [`keep_freed_memory`] and [`return_freed_memory`] change process-wide settings of the host's
//! allocator, so nothing in the library calls them unless the caller asked:
//! `TrainerBuilder::keep_freed_memory(true)` applies the first when `fit` starts,
//! `keep_freed_memory(false)` the second, and a builder that was not told leaves the host's
//! settings alone. The command line asks through `training.keep_freed_memory` (default `true`,
//! the CLI's choice for step speed). [`release_freed_memory`] changes no setting: it hands free
//! pages back once (`malloc_trim`) during a quantizing load.
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
//! for about 8%.) It is process-wide; an embedding application opts in with
//! `TrainerBuilder::keep_freed_memory(true)`; a YAML run turns it off with
//! `training.keep_freed_memory: false` (do so when memory is the point, as with QLoRA).

/// Applies the settings (process-wide; a later [`return_freed_memory`] undoes them); a no-op
/// where glibc is not the C library.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are documented.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused the training allocator settings; continuing");
        }
    }
}

/// The opposite settings, for runs where memory is the point (`keep_freed_memory(false)`, as
/// with QLoRA): blocks of [`RETURN_MMAP_THRESHOLD`] bytes or more come from `mmap` and go back
/// to the kernel when freed, and free memory above [`RETURN_TRIM_THRESHOLD`] at the top of a
/// heap is trimmed.
///
/// glibc's defaults are not that: its mmap threshold is dynamic, raised to the size of every
/// freed mmapped block up to 32 MiB, so after the first step every activation, logits chunk,
/// dequantized weight and BLAS packing buffer comes from the heap, where freed space stays
/// resident behind the small blocks allocated after it (a 170 x 576 by 576 x 49152 `mm` alone
/// leaves about 150 MiB of freed heap resident in a plain PyTorch process). Measured on the
/// 8-layer SmolLM2-shaped QLoRA step (debug build, `volttrain-bench --child-qlora`, 2 steps),
/// peak RSS above the process baseline, NF4 / fp32-base LoRA: 534 / 496 MiB with
/// `keep_freed_memory` on, 251 / 345 MiB with these settings, while the live heap
/// (`mallinfo2`) never rose more than about 100 MiB above its level at the start of a step.
/// Setting `M_MMAP_THRESHOLD` explicitly also turns the dynamic threshold off (`mallopt(3)`).
/// The cost is the page faults [`keep_freed_memory`] avoids.
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; all three values are documented.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 65536) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, RETURN_MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, RETURN_TRIM_THRESHOLD) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused the memory-returning allocator settings; continuing");
        }
    }
}

/// Blocks from this size on are mmapped under [`return_freed_memory`] (256 KiB: a row of a few
/// thousand floats stays on the heap, every activation goes back to the kernel when freed).
pub(crate) const RETURN_MMAP_THRESHOLD: i32 = 256 * 1024;
/// Free bytes at a heap's top above which it is trimmed under [`return_freed_memory`].
pub(crate) const RETURN_TRIM_THRESHOLD: i32 = 1024 * 1024;

/// Hands the allocator's free pages back to the system (glibc `malloc_trim`).
///
/// Freed tensors do not leave the process by themselves: glibc raises its mmap threshold to
/// the size of each freed mmapped block (up to 32 MiB), so from the first freed weight on, the
/// full-precision tensors and the quantizer's temporaries come from the heap, and the small
/// quantized tensors allocated in between pin the freed space. Measured on a 16-layer model,
/// that kept more than the whole fp32 model resident after an int8 load
/// (`bench/tests/quant_load_memory.rs`). `malloc_trim(0)` releases every free page in every arena
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

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Resident bytes of this process (`VmRSS`).
    fn rss() -> i64 {
        let text = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: i64 = text
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// 64 blocks of 4 MiB, touched, then freed: the resident growth left behind. A 16 MiB
    /// block freed first raises glibc's dynamic mmap threshold above 4 MiB where it is on.
    fn left_resident() -> i64 {
        drop(std::hint::black_box(vec![1u8; 16 << 20]));
        let before = rss();
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8 | 1; 4 << 20]).collect();
        assert!(rss() - before > 200 << 20, "the blocks were not resident");
        // a small block after them pins the heap top, as a tensor allocated mid-step does
        let pin = std::hint::black_box(vec![1u8; 4096]);
        drop(blocks);
        let left = rss() - before;
        drop(pin);
        left
    }

    /// Both settings do what their docs say: returned memory leaves the process, kept memory
    /// stays resident. The settings are process-wide and other tests of this binary change them
    /// from their own threads, so the check runs alone, in a child process of this test binary.
    #[test]
    fn return_and_keep_freed_memory() {
        const CHILD: &str = "VOLTTRAIN_MALLOC_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "malloc::tests::return_and_keep_freed_memory",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{text}");
            // the child really ran the check (a filter that matched nothing would pass too)
            assert!(text.contains("left resident: returned"), "{text}");
            return;
        }
        super::return_freed_memory();
        let returned = left_resident();
        super::keep_freed_memory();
        let kept = left_resident();
        super::return_freed_memory();
        super::release_freed_memory();
        eprintln!(
            "left resident: returned {} MiB, kept {} MiB",
            returned >> 20,
            kept >> 20
        );
        assert!(
            returned < 32 << 20,
            "return_freed_memory kept {returned} bytes"
        );
        assert!(kept > 200 << 20, "keep_freed_memory gave back {kept} bytes");
    }
}
