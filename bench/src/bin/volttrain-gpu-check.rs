//! `volttrain-gpu-check`: the measurements of the GPU acceptance run, one per process, each
//! printing one JSON line on stdout. `tools/gpu_check.py` (`./dev gpu-check`) drives it.
//!
//! ```text
//! volttrain-gpu-check write-model --shape llama-3.2-1b --batch 8 --seq 1024 DIR
//! volttrain-gpu-check steps --mode lora|qlora|full --shape S --batch B --seq T [--cpu] DIR
//! volttrain-gpu-check collectives [--cpu] [--model DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volttrain_bench::gpu;

#[derive(Parser)]
#[command(name = "volttrain-gpu-check", about = "GPU acceptance measurements")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a random-weight checkpoint and its token batch.
    WriteModel {
        #[arg(long)]
        shape: String,
        #[arg(long)]
        batch: i64,
        #[arg(long)]
        seq: i64,
        dir: PathBuf,
    },
    /// Training steps of one mode; prints step seconds and peak memory.
    Steps {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        shape: String,
        #[arg(long)]
        batch: i64,
        #[arg(long)]
        seq: i64,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Run on the CPU (the smoke run) instead of cuda:0.
        #[arg(long)]
        cpu: bool,
        dir: PathBuf,
    },
    /// A world-size-1 process group through every collective the trainer uses.
    Collectives {
        #[arg(long)]
        cpu: bool,
        /// A `tiny` checkpoint for a short training run with the collective.
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn device(cpu: bool) -> volttrain::Result<tch::Device> {
    if cpu {
        return Ok(tch::Device::Cpu);
    }
    if !tch::Cuda::is_available() {
        return Err(volttrain::Error::invalid(
            "no CUDA device visible to libtorch (pass --cpu for the CPU smoke run)",
        ));
    }
    Ok(tch::Device::Cuda(0))
}

fn run(cli: Cli) -> volttrain::Result<serde_json::Value> {
    match cli.command {
        Cmd::WriteModel {
            shape,
            batch,
            seq,
            dir,
        } => {
            let s = gpu::shape(&shape, batch, seq)?;
            std::fs::create_dir_all(&dir).map_err(|e| volttrain::Error::io(&dir, e))?;
            gpu::write_model(&dir, &s)?;
            Ok(serde_json::json!({"written": dir}))
        }
        Cmd::Steps {
            mode,
            shape,
            batch,
            seq,
            warmup,
            steps,
            cpu,
            dir,
        } => {
            let s = gpu::shape(&shape, batch, seq)?;
            gpu::run_steps(
                &dir,
                &s,
                gpu::Mode::parse(&mode)?,
                device(cpu)?,
                warmup,
                steps,
            )
        }
        Cmd::Collectives { cpu, model } => gpu::collectives(device(cpu)?, model.as_deref()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
