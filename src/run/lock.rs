//! One writer per output directory: an advisory `flock` on `<output_dir>/.volttrain.lock`.
//!
//! The lock file holds who took it (pid, host, start time) so a second run can name the holder.
//! The kernel drops a `flock` when its holder dies (kill -9 included), so a lock file left by a
//! killed run never blocks: only a live holder does. The file itself is never removed (removing
//! it while another process waits on it would let two processes hold "the" lock).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Name of the lock file inside an output directory.
pub const LOCK_FILE: &str = ".volttrain.lock";

/// Who holds (or held) a lock.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LockHolder {
    /// Process id of the holder.
    pub pid: u32,
    /// Host name of the holder's machine.
    pub host: String,
    /// Seconds since the Unix epoch when the holder took the lock.
    pub started_unix: u64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = unix_now();
        write!(
            f,
            "pid {} on host {}, started {} s ago (unix time {})",
            self.pid,
            self.host,
            now.saturating_sub(self.started_unix),
            self.started_unix
        )
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// An exclusive lock on an output directory, held until dropped (or the process dies).
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    // The open file holds the flock; closing it releases the lock.
    _file: File,
}

impl OutputLock {
    /// Creates `dir` if needed and takes its lock, without waiting. When another live process
    /// holds it, the error names the lock file and the holder.
    pub fn acquire(dir: &Path) -> Result<OutputLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file)
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| "a process that has not written its name yet".into());
                return Err(Error::Locked {
                    path,
                    holder,
                    dir: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let me = LockHolder {
            pid: std::process::id(),
            host: host_name(),
            started_unix: unix_now(),
        };
        let text = serde_json::to_string(&me).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(format!("{text}\n").as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(OutputLock { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder_and_drop_releases() {
        let dir = tempfile::tempdir().unwrap();
        let a = OutputLock::acquire(dir.path()).unwrap();
        // flock is per open file description: a second open in this process conflicts too.
        let e = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains(LOCK_FILE), "{e}");
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains(&host_name()),
            "{e}"
        );
        drop(a);
        let b = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(b.path(), dir.path().join(LOCK_FILE));
    }
}
