//! Local launcher: one child process per rank, `torchrun --standalone`-style.
//!
//! Each child gets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`
//! (`127.0.0.1`) and `MASTER_PORT` (a free port), which [`super::DistEnv::from_env`] reads. The
//! launcher waits for all of them; when one fails it kills the others and reports which rank
//! failed and how, so no rank is left waiting on a dead peer.
//!
//! How the command line uses it: `volttrain sft --nproc N` (CPU, Gloo) or a config with
//! `training.gpu_devices: [d0, d1, ...]` (one process per listed device) calls [`spawn_self`]
//! with its own arguments minus `--nproc`, when [`super::DistEnv::from_env`] says it is not
//! already a worker. Each worker then builds its [`super::ProcessGroup`] from the environment
//! and picks its GPU with [`super::DistEnv::cuda_device`]. Under `torchrun` or SLURM the
//! launcher is theirs and this module is not used.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::error::{Error, Result};

/// Signals waiting to be forwarded to the ranks of the running [`spawn_workers`].
static FORWARD: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Asks the launcher to send `sig` to every live rank (within 20 ms). The command line's
/// launcher forwards its stop signals this way (`run::StopSignals::install_launcher`), so a
/// `SIGTERM` sent only to the launcher (Kubernetes) reaches the ranks.
pub fn forward_signal(sig: i32) {
    if let Ok(mut q) = FORWARD.lock() {
        q.push(sig);
    }
}

fn send_forwarded(children: &[Option<Child>]) {
    let pending: Vec<i32> = match FORWARD.lock() {
        Ok(mut q) => std::mem::take(&mut *q),
        Err(_) => return,
    };
    for sig in pending {
        for c in children.iter().flatten() {
            // SAFETY: `kill` takes plain integers. The pid is that of a child this process has
            // not reaped yet (reaped children are set to `None`), so it names that child.
            #[cfg(unix)]
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }
}

/// A TCP port on `127.0.0.1` that was free a moment ago (the OS picks it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Dist(format!("cannot find a free port on 127.0.0.1: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::Dist(format!("cannot read the bound port: {e}")))?
        .port();
    Ok(port)
}

/// [`spawn_workers`] on this very executable (`std::env::current_exe`) with `args`.
pub fn spawn_self(nproc: usize, args: &[OsString], env: &[(String, String)]) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::Dist(format!(
            "cannot find this program's path to relaunch it: {e}"
        ))
    })?;
    spawn_workers(nproc, &exe, args, env)
}

/// Starts `nproc` copies of `exe args...` with the rendezvous environment (plus `env`), waits
/// for all, and returns `Ok` when every rank exits with status 0. When a rank fails (non-zero
/// exit or a signal) the remaining ranks are killed and the error names the rank and its exit
/// status.
pub fn spawn_workers(
    nproc: usize,
    exe: &Path,
    args: &[OsString],
    env: &[(String, String)],
) -> Result<()> {
    if nproc == 0 {
        return Err(Error::invalid("--nproc must be at least 1"));
    }
    let port = free_port()?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::Dist(format!(
                    "cannot start rank {rank} ({}): {e}",
                    exe.display()
                )));
            }
        }
    }
    wait_all(&mut children)
}

fn kill_all(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        // Ignore errors: the child may have exited on its own in the meantime.
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => status.to_string(),
    }
}

fn wait_all(children: &mut [Option<Child>]) -> Result<()> {
    let n = children.len();
    let mut left = n;
    while left > 0 {
        send_forwarded(children);
        let mut progressed = false;
        for rank in 0..n {
            let Some(child) = children[rank].as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    kill_all(children);
                    return Err(Error::Dist(format!("cannot wait for rank {rank}: {e}")));
                }
            };
            children[rank] = None;
            left -= 1;
            progressed = true;
            if !status.success() {
                kill_all(children);
                return Err(Error::Dist(format!(
                    "rank {rank} of {n} failed ({}); stopped the other ranks",
                    describe(status)
                )));
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The worker side of a launch: the [`super::ProcessGroup`] this process joins when the
/// environment says it is one rank of several ([`super::DistEnv::from_env`]: this launcher,
/// `torchrun`, SLURM), and the device it trains on.
///
/// `device` is the configured device (`model.device`, `explicit` when the file sets it) and
/// `gpu_devices` the listed GPUs (`training.gpu_devices`); see [`super::select_device`]. One
/// process without `gpu_devices` trains on `device`. A rank's group uses NCCL for CUDA and Gloo
/// for the CPU unless `cfg.backend` says otherwise.
pub fn init_from_env(
    cfg: &super::DistConfig,
    device: tch::Device,
    explicit: bool,
    gpu_devices: &[usize],
) -> Result<(Option<super::ProcessGroup>, tch::Device)> {
    cfg.validate()?;
    let env = super::DistEnv::from_env()?;
    if env.is_none() && gpu_devices.is_empty() {
        return Ok((None, device));
    }
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let device = super::select_device(device, explicit, gpu_devices, env.as_ref(), gpus)?;
    match env {
        None => Ok((None, device)),
        Some(env) => Ok((
            Some(super::ProcessGroup::on_device(&env, cfg, device)?),
            device,
        )),
    }
}
