//! The `volttrain` command line.
//!
//! ```text
//! volttrain sft  --config config/sft.yaml [--set key.path=value]... [--resume] [--nproc N]
//! volttrain eval --config config/sft.yaml [--adapter DIR] [--set ...]
//! volttrain dpo  --config config/dpo.yaml [--set key.path=value]... [--resume]
//! volttrain plugins list [--plugin path/to/libplugin.so]...
//! volttrain env [--json]
//! volttrain merge --config C --adapter DIR --out DIR [--dtype fp32|bf16|fp16]
//! volttrain generate --model DIR [--adapter DIR] [--chat] --prompt TEXT [--max-new-tokens N] ...
//! volttrain export --model DIR [--adapter DIR] --format gguf --type f32|f16|bf16|q8_0 --out FILE
//! ```

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volttrain::config::SftConfig;
use volttrain::dist::DistEnv;
use volttrain::dist::launch::spawn_self;
use volttrain::run::StopSignals;
use volttrain::sft::{RunOptions, run_eval, run_sft};
use volttrain::{Error, Result};

#[derive(Parser)]
#[command(name = "volttrain", version, about = "LLM fine-tuning on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Supervised fine-tuning from a YAML config.
    Sft {
        /// The YAML config (see config/sft.yaml).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `--set training.lr=1e-3` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Continue from `<output_dir>/last/`.
        #[arg(long)]
        resume: bool,
        /// Data-parallel processes on CPU (Gloo); `training.gpu_devices` does the same on GPUs.
        #[arg(long)]
        nproc: Option<usize>,
    },
    /// Preference tuning (DPO, IPO, hinge, robust, ORPO) on {prompt, chosen, rejected} pairs.
    Dpo {
        /// The YAML config (see config/dpo.yaml): the SFT sections plus `preference:`.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: `--set preference.beta=0.2` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Continue from `<output_dir>/last/`.
        #[arg(long)]
        resume: bool,
    },
    /// Prints `{"eval_loss": ..., "tokens": ...}` on the config's eval set.
    Eval {
        #[arg(long)]
        config: PathBuf,
        /// A PEFT adapter directory (e.g. runs/sft/epoch-3).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// The environment: versions, libtorch path, GPUs, bf16/FP8, distributed backends, threads.
    Env {
        /// Machine-readable JSON (with a "distributed_backends" list).
        #[arg(long)]
        json: bool,
    },
    /// Merges a PEFT adapter into the config's base model and writes a Hugging Face directory.
    Merge {
        #[arg(long)]
        config: PathBuf,
        /// The PEFT adapter directory (e.g. runs/sft/epoch-3).
        #[arg(long)]
        adapter: PathBuf,
        /// The new model directory (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype of the merged model.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Largest safetensors shard in bytes (transformers' default, 5 GB).
        #[arg(long, default_value_t = volttrain::export::DEFAULT_MAX_SHARD_BYTES)]
        max_shard_bytes: u64,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Generates text with a KV cache, streaming it to stdout.
    Generate(volttrain::generate::cli::GenerateArgs),
    /// Exports a model (optionally with a PEFT adapter merged in) to another format.
    Export(volttrain::export::cli::ExportArgs),
    /// Registered components.
    Plugins {
        #[command(subcommand)]
        command: PluginsCmd,
    },
}

#[derive(Subcommand)]
enum PluginsCmd {
    /// Lists optimizers, schedulers, quantizers, adapters, groupers and callbacks by kind, with
    /// where each comes from.
    List {
        /// Load these dylib plugins first.
        #[arg(long = "plugin")]
        plugins: Vec<PathBuf>,
        /// Load the `plugins:` of this config first.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn base_dir(config: &Path) -> PathBuf {
    config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn sft(config: PathBuf, sets: Vec<String>, resume: bool, nproc: Option<usize>) -> Result<()> {
    let cfg = SftConfig::load(&config, &sets)?;
    // training needs `training.lr` (eval and merge do not): say so before spawning ranks
    cfg.training.required_lr()?;
    let worker = DistEnv::from_env()?;
    let in_worker = worker.is_some();
    // Only rank 0 prints the summary (every rank's stdout is the launcher's).
    let is_main = worker.as_ref().is_none_or(|w| w.rank == 0);
    let procs = match (nproc, cfg.training.gpu_devices.len()) {
        (Some(n), _) => n,
        (None, g) if g > 1 => g,
        _ => 1,
    };
    if procs > 1 && !in_worker {
        // Relaunch this command once per rank, without --nproc.
        let mut args: Vec<OsString> = vec!["sft".into(), "--config".into(), config.into()];
        for s in sets {
            args.push("--set".into());
            args.push(s.into());
        }
        if resume {
            args.push("--resume".into());
        }
        tracing::info!("starting {procs} data-parallel processes");
        // A stop signal (Ctrl-C, SIGTERM, SIGUSR1) is forwarded to every rank; they agree on
        // the step to stop after and rank 0 writes `last/`. The launcher waits for them instead
        // of dying first.
        if let Err(e) = StopSignals::install_launcher() {
            tracing::warn!("no stop-signal handlers: {e}");
        }
        return spawn_self(procs, &args, &[]);
    }
    let signals = StopSignals::install()
        .inspect_err(|e| tracing::warn!("no stop-signal handlers: {e}"))
        .ok();
    let opts = RunOptions {
        resume,
        interrupt: signals.as_ref().map(StopSignals::flag),
        base_dir: Some(base_dir(&config)),
    };
    match run_sft(&cfg, opts) {
        Ok(summary) => {
            if is_main {
                let out = serde_json::to_string(&summary)
                    .map_err(|e| Error::Internal(format!("serialize the summary: {e}")))?;
                println!("{out}");
            }
            Ok(())
        }
        Err(Error::Interrupted { step, dir }) => {
            let nproc = worker
                .as_ref()
                .map(|w| format!(" --nproc {}", w.world_size))
                .unwrap_or_default();
            if signals.as_ref().is_some_and(StopSignals::preempted) {
                // A preemption notice (SIGTERM, SIGUSR1): the checkpoint is written, the job
                // did what it could; exit 0 so the scheduler requeues rather than reports.
                if is_main {
                    eprintln!(
                        "preempted at step {step}; resume with --resume\nresume checkpoint in {}; command: volttrain sft --config {}{nproc} --resume",
                        dir.display(),
                        config.display()
                    );
                }
                return Ok(());
            }
            if is_main {
                eprintln!(
                    "interrupted at step {step}; resume checkpoint in {}.\nresume with: volttrain sft --config {}{nproc} --resume",
                    dir.display(),
                    config.display()
                );
            }
            Err(Error::Interrupted { step, dir })
        }
        Err(e) => Err(e),
    }
}

fn dpo(config: PathBuf, sets: Vec<String>, resume: bool) -> Result<()> {
    let cfg = SftConfig::load(&config, &sets)?;
    // Ctrl-C, SIGTERM and SIGUSR1 as for `volttrain sft`: finish the step, write `last/`.
    let signals = StopSignals::install()
        .inspect_err(|e| tracing::warn!("no stop-signal handlers: {e}"))
        .ok();
    let opts = RunOptions {
        resume,
        interrupt: signals.as_ref().map(StopSignals::flag),
        base_dir: Some(base_dir(&config)),
    };
    match volttrain::dpo::run_dpo(&cfg, opts) {
        Ok(summary) => {
            let out = serde_json::to_string(&summary)
                .map_err(|e| Error::Internal(format!("serialize the summary: {e}")))?;
            println!("{out}");
            Ok(())
        }
        Err(Error::Interrupted { step, dir }) => {
            let what = if signals.as_ref().is_some_and(StopSignals::preempted) {
                "preempted"
            } else {
                "interrupted"
            };
            eprintln!(
                "{what} at step {step}; resume with --resume\nresume checkpoint in {}; command: volttrain dpo --config {} --resume",
                dir.display(),
                config.display()
            );
            if what == "preempted" {
                return Ok(());
            }
            Err(Error::Interrupted { step, dir })
        }
        Err(e) => Err(e),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Sft {
            config,
            sets,
            resume,
            nproc,
        } => sft(config, sets, resume, nproc),
        Cmd::Dpo {
            config,
            sets,
            resume,
        } => dpo(config, sets, resume),
        Cmd::Eval {
            config,
            adapter,
            sets,
        } => {
            let cfg = SftConfig::load(&config, &sets)?;
            volttrain::plugin::load_plugins(&cfg.plugins, &base_dir(&config))?;
            let m = run_eval(&cfg, adapter.as_deref())?;
            println!(
                "{}",
                serde_json::json!({"eval_loss": m.eval_loss, "tokens": m.tokens})
            );
            Ok(())
        }
        Cmd::Env { json } => {
            let r = volttrain::env_report::EnvReport::collect();
            if json {
                println!("{}", r.to_json()?);
            } else {
                print!("{}", r.to_text());
            }
            Ok(())
        }
        Cmd::Merge {
            config,
            adapter,
            out,
            dtype,
            max_shard_bytes,
            sets,
        } => {
            let cfg = SftConfig::load(&config, &sets)?;
            // a registered quantizer of the base may come from a plugin
            volttrain::plugin::load_plugins(&cfg.plugins, &base_dir(&config))?;
            let dtype = dtype.parse()?;
            let r =
                volttrain::export::merge_from_config(&cfg, &adapter, &out, dtype, max_shard_bytes)?;
            if !r.dequantized.is_empty() {
                eprintln!(
                    "note: the base was quantized ({}); its weights were dequantized, merged with the adapter and written in {} (as PEFT's merge_and_unload)",
                    r.dequantized.join(", "),
                    r.dtype
                );
            }
            println!(
                "{}",
                serde_json::to_string(&r)
                    .map_err(|e| Error::Internal(format!("serialize the summary: {e}")))?
            );
            Ok(())
        }
        Cmd::Generate(args) => volttrain::generate::cli::run(&args),
        Cmd::Export(args) => volttrain::export::cli::run(&args),
        Cmd::Plugins {
            command: PluginsCmd::List { plugins, config },
        } => {
            if let Some(c) = &config {
                let cfg = SftConfig::load(c, &[])?;
                volttrain::plugin::load_plugins(&cfg.plugins, &base_dir(c))?;
            }
            volttrain::plugin::load_plugins(&plugins, Path::new("."))?;
            print!("{}", volttrain::plugin::format_list());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
