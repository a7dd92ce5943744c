//! The `duet` command: reads the configuration, sets up logging, and serves.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// An OpenAI-compatible chat server on your own machine.
#[derive(Parser)]
#[command(name = "duet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to bind (server.host).
    #[arg(long, global = true)]
    host: Option<String>,
    /// Port to listen on (server.port).
    #[arg(long, global = true)]
    port: Option<u16>,
    /// A TOML configuration file (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Who answers: student, teacher or hybrid (mode).
    #[arg(long, global = true, value_name = "MODE")]
    mode: Option<String>,
    /// The student model: a GGUF path or a Hugging Face owner/repo/file.gguf (student.model).
    #[arg(long, global = true, value_name = "PATH_OR_REPO")]
    model: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API (the default).
    Serve,
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    // A missing .env is normal; real environment variables win over it.
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let (Some(Command::Serve) | None) = cli.command;
    let mut overrides = Vec::new();
    overrides.extend(cli.host.map(|h| ("server.host", h)));
    overrides.extend(cli.port.map(|p| ("server.port", p.to_string())));
    overrides.extend(cli.model.map(|m| ("student.model", m)));
    overrides.extend(cli.mode.map(|m| ("mode", m)));
    let file = cli.config.or_else(duet::config::Config::file_from_env);
    let config = match duet::config::load(file.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let running = match duet::start(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "duet: cannot listen on {}:{}: {e}",
                config.server.host, config.server.port
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        address = %running.addr,
        mode = ?config.mode,
        "duet is serving the OpenAI API at http://{}/v1",
        running.addr
    );
    match running.server.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
