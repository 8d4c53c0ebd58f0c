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

/// Runs `fill`, the first writes to the `len` fresh bytes at `ptr` (a new CPU allocation not
/// yet touched), with as much of the range as the kernel has free huge pages for advised for
/// transparent huge pages (`madvise(MADV_HUGEPAGE)`). Advice only: nothing is allocated,
/// resident memory does not change, and a kernel without THP ignores it. Calls are serialized
/// (process-wide), so that each sees the free huge pages the previous one did not take; below
/// two huge pages, and off Linux, `fill` just runs.
///
/// Why: filling a fresh multi-gigabyte tensor (a checkpoint read into fp32) takes one page
/// fault per 4 KiB page, and with THP in its usual `madvise` mode those faults, not the
/// conversion, are most of the time. Measured on the Gemma-2-2B-shaped load (4 layers, bf16
/// safetensors into fp32, 3.6 GB, 2 threads): 910k minor faults per load, the kernel's fault
/// path (trap, locks, memory-cgroup charge, zeroing) about 3/4 of its CPU time. With 2 MiB
/// pages the faults are 512 times fewer: repeated loads in one process took 0.9-1.0 s instead
/// of 2.2-2.5 s, and first loads in fresh processes (5 alternating pairs on a busy 2-core VM)
/// 3.5-6.0 s instead of 4.0-7.4 s, less system time in every pair.
///
/// Why only what is free: on an advised range the kernel compacts memory to make huge pages
/// when it has none free (THP `defrag: madvise`); on a machine whose memory was full of page
/// cache that stalled the same load for 11 s. So the advice covers at most half of the memory
/// the kernel holds in free blocks of huge-page size or more (`/proc/buddyinfo`), read under
/// the lock; the rest of the range takes ordinary pages.
pub(crate) fn fill_fresh<R>(ptr: *const u8, len: usize, fill: impl FnOnce() -> R) -> R {
    #[cfg(target_os = "linux")]
    {
        let huge = huge_page_size();
        if len >= 2 * huge {
            static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _serial = LOCK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let start = (ptr as usize).next_multiple_of(huge);
            let budget = free_huge_bytes(huge) / 2 / huge * huge;
            let end = ((ptr as usize + len) / huge * huge).min(start + budget);
            if end > start {
                // SAFETY: advice on whole pages inside one live allocation; it changes no
                // memory and no mapping's contents (an error, e.g. EINVAL, is ignored).
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
            return fill();
        }
    }
    let _ = (ptr, len);
    fill()
}

/// The kernel's transparent huge page size (`hpage_pmd_size`), 2 MiB where it is not readable.
#[cfg(target_os = "linux")]
fn huge_page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n.is_power_of_two() && n >= 4096)
            .unwrap_or(2 << 20)
    })
}

/// Bytes the kernel holds in free blocks of at least `huge` bytes, over every zone of
/// `/proc/buddyinfo` (0 where it is not readable).
#[cfg(target_os = "linux")]
fn free_huge_bytes(huge: usize) -> usize {
    // SAFETY: sysconf reads a constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let text = std::fs::read_to_string("/proc/buddyinfo").unwrap_or_default();
    buddy_free_bytes(&text, page, huge)
}

/// [`free_huge_bytes`] of a `/proc/buddyinfo` text: lines `Node N, zone NAME c0 c1 ...`, where
/// `c_k` is the number of free blocks of `2^k` pages.
#[cfg(any(target_os = "linux", test))]
fn buddy_free_bytes(text: &str, page: usize, huge: usize) -> usize {
    let mut total = 0usize;
    for line in text.lines() {
        let Some((_, counts)) = line.split_once("zone") else {
            continue;
        };
        let mut fields = counts.split_whitespace();
        fields.next(); // the zone's name
        for (order, c) in fields.enumerate() {
            let block = page.checked_shl(order as u32).unwrap_or(0);
            if block >= huge
                && let Ok(n) = c.parse::<usize>()
            {
                total = total.saturating_add(n.saturating_mul(block));
            }
        }
    }
    total
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
    fn free_huge_page_bytes_are_read_from_buddyinfo() {
        let text = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 \n\
                    Node 0, zone    DMA32   3729   2149   1035    387    156     72     40     30     25    210    176 \n\
                    Node 0, zone   Normal  36118  33341  16659   7715   2790   1421    587    261     54    685    169 \n";
        let mib = 1usize << 20;
        // blocks of order 9 (2 MiB) and 10 (4 MiB) of 4 KiB pages
        let want = (1 + 210 + 685) * 2 * mib + (3 + 176 + 169) * 4 * mib;
        assert_eq!(super::buddy_free_bytes(text, 4096, 2 * mib), want);
        assert_eq!(super::buddy_free_bytes("garbage\n", 4096, 2 * mib), 0);
    }

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
