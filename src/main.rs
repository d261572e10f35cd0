//! The `shardgate` command line: `check`, `demo` (and, as they land, `serve`, `route`, `migrate`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardgate::config::{Config, LoadError};

#[derive(Parser)]
#[command(name = "shardgate", version, about = "A PostgreSQL sharding proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a shard map: exit 0 with a summary, or 1 with every error (file:line:column).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start N local Postgres clusters with an example sharded schema and print how to connect.
    Demo {
        #[arg(long, default_value_t = 3)]
        shards: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Demo { shards } => match shardgate::demo::run(shards) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("shardgate demo: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(path: &PathBuf) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}", shardgate::check::summary(&config));
            ExitCode::SUCCESS
        }
        Err(LoadError::Invalid(errors)) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), path.display());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
