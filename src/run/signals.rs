//! Stop signals: Ctrl-C (`SIGINT`), and `SIGTERM` / `SIGUSR1`, which Slurm, Kubernetes and spot
//! instances send some time before they kill a job.
//!
//! The first one sets the trainer's interrupt flag: the current step finishes, `last/` is
//! written, and the run ends (after Ctrl-C with an error, after `SIGTERM`/`SIGUSR1` with exit
//! status 0 and "preempted at step N; resume with --resume"). A second one exits at once with
//! status 128 + the signal number; checkpoints are written under a temporary name and renamed
//! into place, so what it leaves behind is either complete or not named like a checkpoint.
//!
//! Under the local launcher (`--nproc N`) a stop signal can reach a rank twice for one event: from
//! the scheduler or the terminal directly (Slurm and a terminal signal every process) and once
//! more forwarded by the launcher (Kubernetes signals only the container's first process). A rank
//! therefore counts the signals sent by its parent apart from all others, and exits at once only
//! when one of the two counts reaches two.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;

use crate::error::{Error, Result};

/// The signals that stop a run.
pub const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGUSR1];

/// `SIGINT`, `SIGTERM`, `SIGUSR1` (or the number).
pub fn signal_name(sig: i32) -> String {
    match sig {
        SIGINT => "SIGINT (Ctrl-C)".into(),
        SIGTERM => "SIGTERM".into(),
        SIGUSR1 => "SIGUSR1".into(),
        n => format!("signal {n}"),
    }
}

/// What the stop handlers saw, shared with the trainer through [`StopSignals::flag`].
#[derive(Debug, Clone)]
pub struct StopSignals {
    flag: Arc<AtomicBool>,
    first: Arc<AtomicI32>,
}

/// Counts stop signals by sender (the parent process apart from everyone else) and says what
/// to do with the next one. Kept apart from the handler thread so it can be tested.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SignalCounter {
    from_parent: u32,
    direct: u32,
}

/// What a stop signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// The first: finish the step, write `last/`, stop.
    Stop,
    /// The same event delivered again by the other sender: nothing more to do.
    Duplicate,
    /// A second signal from the same sender: exit now.
    ExitNow,
}

impl SignalCounter {
    /// Records one signal; `by_parent` when the sender is this process's parent (the launcher).
    pub fn record(&mut self, by_parent: bool) -> SignalAction {
        let n = if by_parent {
            self.from_parent += 1;
            self.from_parent
        } else {
            self.direct += 1;
            self.direct
        };
        if n >= 2 {
            SignalAction::ExitNow
        } else if self.from_parent + self.direct > 1 {
            SignalAction::Duplicate
        } else {
            SignalAction::Stop
        }
    }
}

impl StopSignals {
    /// Installs the handlers of a training process (the only process, or one rank). Call once,
    /// before training starts.
    pub fn install() -> Result<StopSignals> {
        let me = StopSignals {
            flag: Arc::new(AtomicBool::new(false)),
            first: Arc::new(AtomicI32::new(0)),
        };
        let mut signals =
            SignalsInfo::<WithOrigin>::new(STOP_SIGNALS).map_err(|source| Error::Os {
                what: "cannot install the stop-signal handlers".into(),
                source,
            })?;
        let parent = std::os::unix::process::parent_id() as i32;
        let (flag, first) = (me.flag.clone(), me.first.clone());
        std::thread::Builder::new()
            .name("volttrain-signals".into())
            .spawn(move || {
                let mut counter = SignalCounter::default();
                for info in signals.forever() {
                    let sig = info.signal;
                    let by_parent = info.process.is_some_and(|p| p.pid == parent);
                    match counter.record(by_parent) {
                        SignalAction::Stop => {
                            first.store(sig, Ordering::SeqCst);
                            flag.store(true, Ordering::SeqCst);
                            eprintln!(
                                "{}: finishing the current step and writing a resume checkpoint \
                                 (a second signal exits at once)...",
                                signal_name(sig)
                            );
                        }
                        SignalAction::Duplicate => {}
                        SignalAction::ExitNow => {
                            eprintln!(
                                "second stop signal ({}): exiting at once; only complete \
                                 checkpoints are kept",
                                signal_name(sig)
                            );
                            // SAFETY: `_exit` ends the process without running exit handlers or
                            // destructors (the main thread may be inside libtorch); it takes
                            // no pointer and is always sound to call.
                            unsafe { libc::_exit(128 + sig) };
                        }
                    }
                }
            })
            .map_err(|source| Error::Os {
                what: "cannot start the signal thread".into(),
                source,
            })?;
        Ok(me)
    }

    /// Handlers for the local launcher (`--nproc N`): it never stops by itself; every stop
    /// signal is forwarded to the ranks (see [`crate::dist::launch::forward_signal`]), which
    /// stop together after the same step. The launcher exits when they have.
    pub fn install_launcher() -> Result<()> {
        let mut signals =
            SignalsInfo::<WithOrigin>::new(STOP_SIGNALS).map_err(|source| Error::Os {
                what: "cannot install the stop-signal handlers".into(),
                source,
            })?;
        std::thread::Builder::new()
            .name("volttrain-signals".into())
            .spawn(move || {
                for info in signals.forever() {
                    eprintln!(
                        "{}: the ranks finish their step and write a resume checkpoint...",
                        signal_name(info.signal)
                    );
                    crate::dist::launch::forward_signal(info.signal);
                }
            })
            .map_err(|source| Error::Os {
                what: "cannot start the signal thread".into(),
                source,
            })?;
        Ok(())
    }

    /// The trainer's interrupt flag ([`crate::trainer::TrainerBuilder::interrupt_flag`]).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// The first stop signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.first.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Whether the run was stopped by `SIGTERM` or `SIGUSR1` (a preemption notice), which ends
    /// with exit status 0, rather than by Ctrl-C.
    pub fn preempted(&self) -> bool {
        matches!(self.received(), Some(s) if s == SIGTERM || s == SIGUSR1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_senders_apart() {
        // Slurm or a terminal signals every process, and the launcher forwards: one event.
        let mut c = SignalCounter::default();
        assert_eq!(c.record(false), SignalAction::Stop);
        assert_eq!(c.record(true), SignalAction::Duplicate);
        // a second event: direct again -> exit now
        assert_eq!(c.record(false), SignalAction::ExitNow);

        // Kubernetes: only the launcher is signalled; its second forward exits.
        let mut c = SignalCounter::default();
        assert_eq!(c.record(true), SignalAction::Stop);
        assert_eq!(c.record(true), SignalAction::ExitNow);

        // a single process signalled twice
        let mut c = SignalCounter::default();
        assert_eq!(c.record(false), SignalAction::Stop);
        assert_eq!(c.record(false), SignalAction::ExitNow);
    }
}
