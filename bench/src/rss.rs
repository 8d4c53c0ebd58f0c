//! Resident memory of this process, read from `/proc/self/status` (Linux): the one reader every
//! workload measures memory with (`VmRSS`, the kernel's high-water mark `VmHWM`, anonymous
//! pages `RssAnon`), plus a sampler thread for peaks the high-water mark cannot isolate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use volttrain::error::{Error, Result};

const STATUS: &str = "/proc/self/status";

/// Interval of [`PeakSampler`]. Reading `/proc/self/status` takes tens of microseconds; a
/// 1.5 MiB fp32 linear takes longer than this to allocate and fill.
const SAMPLE_EVERY: Duration = Duration::from_micros(200);

/// One `kB` line of `/proc/self/status` (`key` without the colon: `VmRSS`, `VmHWM`, `RssAnon`),
/// in bytes.
pub fn status_bytes(key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(STATUS).map_err(|e| Error::io(STATUS, e))?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        .ok_or_else(|| Error::invalid(format!("{STATUS}: no `{key}` line")))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::invalid(format!("{STATUS}: cannot parse `{line}`")))?;
    Ok(kb * 1024)
}

/// Resident bytes now (`VmRSS`).
pub fn rss_bytes() -> Result<u64> {
    status_bytes("VmRSS")
}

/// Peak resident bytes since the process started or the last [`reset_peak`] (`VmHWM`).
pub fn peak_rss_bytes() -> Result<u64> {
    status_bytes("VmHWM")
}

/// Anonymous resident bytes now (`RssAnon`: the heap and other private memory, without the
/// file-backed pages of an mmapped checkpoint, which the kernel can drop at will).
pub fn rss_anon_bytes() -> Result<u64> {
    status_bytes("RssAnon")
}

/// Restarts the kernel's high-water mark ([`peak_rss_bytes`]) from what is resident now (`5`
/// into `/proc/self/clear_refs`).
pub fn reset_peak() -> Result<()> {
    let path = "/proc/self/clear_refs";
    std::fs::write(path, "5").map_err(|e| Error::io(path, e))
}

/// Samples [`rss_anon_bytes`] every 200 microseconds on a thread and keeps the maximum.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl PeakSampler {
    /// Starts sampling (the first sample is taken here).
    pub fn start() -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_anon_bytes()?));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || -> Result<()> {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_anon_bytes()?, Ordering::Relaxed);
                std::thread::sleep(SAMPLE_EVERY);
            }
            Ok(())
        });
        Ok(PeakSampler { stop, peak, handle })
    }

    /// Stops sampling and returns the peak (including one last sample).
    pub fn finish(self) -> Result<u64> {
        self.peak.fetch_max(rss_anon_bytes()?, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| Error::invalid("RssAnon sampler panicked"))??;
        Ok(self.peak.load(Ordering::Relaxed))
    }
}

/// Hands the allocator's free pages back to the system (glibc `malloc_trim(0)`), so that a
/// measurement starts from the memory actually held, not from what an earlier phase freed; a
/// no-op where glibc is not the C library. The library does the same inside a quantizing load.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers and only returns free memory to the kernel;
        // glibc serializes it with the allocator's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_lines() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 0);
        assert!(peak_rss_bytes().unwrap() >= rss);
        assert!(rss_anon_bytes().unwrap() <= rss);
        // `VmRSS` is not mistaken for a line that merely starts with it
        assert!(status_bytes("Vm").is_err());
    }

    #[test]
    fn sampler_sees_an_allocation() {
        let s = PeakSampler::start().unwrap();
        let before = rss_anon_bytes().unwrap();
        let v = std::hint::black_box(vec![1u8; 64 << 20]);
        std::thread::sleep(Duration::from_millis(5));
        let peak = s.finish().unwrap();
        drop(v);
        assert!(peak >= before + (48 << 20), "peak {peak}, before {before}");
    }
}
