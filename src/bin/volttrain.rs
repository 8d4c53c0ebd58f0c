//! The `volttrain` command line.

use clap::{Parser, Subcommand};

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
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Sft { config } => {
            tracing::error!("sft is not available yet (config {})", config.display());
            std::process::ExitCode::FAILURE
        }
    }
}
