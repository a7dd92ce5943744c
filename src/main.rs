//! The `duet` command: reads the configuration, sets up logging, and serves.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Every setting with its default and meaning, shown by `--help`: config/default.toml.
const SETTINGS: &str = concat!(
    "Every setting, with its default. Set one in a --config FILE, as an environment variable\n",
    "DUET_<SECTION>_<KEY> (e.g. DUET_STUDENT_CONTEXT_LENGTH=8192; .env is read too), or with\n",
    "the flags above:\n\n",
    include_str!("../config/default.toml")
);

/// An OpenAI-compatible chat server on your own machine.
#[derive(Parser)]
#[command(name = "duet", version, about, after_help = SETTINGS)]
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
    /// Serve a non-loopback address without API keys (server.allow_unauthenticated).
    #[arg(long, global = true)]
    allow_unauthenticated: bool,
    /// Who answers: student, teacher or hybrid (mode).
    #[arg(long, global = true, value_name = "MODE")]
    mode: Option<String>,
    /// The student model: a GGUF path, a Hugging Face owner/repo/file.gguf, or a transformers
    /// checkpoint directory or owner/repo id (student.model).
    #[arg(long, global = true, value_name = "PATH_OR_REPO")]
    model: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API and the chat page (the default).
    #[command(after_help = SETTINGS)]
    Serve,
    /// Quantize a transformers checkpoint (a directory or a Hugging Face owner/repo id) into a
    /// GGUF file that duet and llama.cpp load.
    Quantize {
        /// The checkpoint: a directory with config.json and *.safetensors, or owner/repo.
        checkpoint: String,
        /// The GGUF file to write.
        output: PathBuf,
        /// What the weight matrices become (student.quantization).
        #[arg(long = "type", value_enum, default_value_t = duet::config::Quantization::Q4KM)]
        quantization: duet::config::Quantization,
        /// A PEFT LoRA adapter directory merged into the weights before quantizing.
        #[arg(long, value_name = "DIR")]
        lora: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    // A missing .env is normal; real environment variables win over it.
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Quantize {
        checkpoint,
        output,
        quantization,
        lora,
    }) = cli.command
    {
        return quantize(&checkpoint, &output, quantization, lora.as_deref());
    }
    let mut overrides = Vec::new();
    overrides.extend(cli.host.map(|h| ("server.host", h)));
    overrides.extend(cli.port.map(|p| ("server.port", p.to_string())));
    overrides.extend(cli.model.map(|m| ("student.model", m)));
    overrides.extend(cli.mode.map(|m| ("mode", m)));
    if cli.allow_unauthenticated {
        overrides.push(("server.allow_unauthenticated", "true".into()));
    }
    let file = cli.config.or_else(duet::config::Config::file_from_env);
    let config = match duet::config::load(file.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    duet::student::kernels::pool::set_threads(config.student.threads);
    if let Err(e) = duet::student::kernels::select(config.student.kernels) {
        eprintln!("duet: configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    if config.student.threads > 0 {
        // SAFETY: no other thread exists yet (the runtime starts below), so nothing can
        // read the environment while it changes. candle's thread pool, which runs the
        // formats duet has no kernel for, reads this once, when its first product runs.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", config.student.threads.to_string()) };
    }
    // A transformers checkpoint is quantized now, before serving, rather than inside the
    // first request: that can take minutes, once; every later load reads the cached GGUF.
    // (After the environment is set: quantizing starts the model's worker threads.)
    if config.mode != duet::config::Mode::Teacher
        && duet::student::checkpoint::is_checkpoint(&config.student.model)
    {
        duet::memory::configure_allocator();
        let budget = config.memory.budget();
        if let Err(e) = duet::student::checkpoint::prepare(&config.student, budget) {
            eprintln!("duet: {e}");
            return std::process::ExitCode::FAILURE;
        }
        duet::memory::release_free_memory();
    }
    actix_web::rt::System::new().block_on(serve(config))
}

/// `duet quantize`: converts a checkpoint and says what it cost.
fn quantize(
    checkpoint: &str,
    output: &std::path::Path,
    quantization: duet::config::Quantization,
    lora: Option<&std::path::Path>,
) -> std::process::ExitCode {
    let result = duet::student::checkpoint::source::resolve(checkpoint).and_then(|dir| {
        duet::student::checkpoint::convert::convert(&dir, lora, quantization, output, &|_| Ok(()))
    });
    match result {
        Ok(report) => {
            println!("{}: {report}", output.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("duet quantize: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts the server and runs it until SIGTERM or Ctrl-C.
async fn serve(config: duet::config::Config) -> std::process::ExitCode {
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
        "duet is ready: chat page at http://{0}/ and the OpenAI API at http://{0}/v1",
        running.addr
    );
    let grace = std::time::Duration::from_millis(config.server.shutdown_grace_ms);
    let drain = std::time::Duration::from_millis(config.server.drain_ms);
    let handle = running.server.handle();
    let end_streams = running.end_streams;
    let state = running.state.clone();
    actix_web::rt::spawn(async move {
        let signal = stop_signal().await;
        // From now on /ready says 503: balancers stop sending.
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if !drain.is_zero() {
            // What still arrives meanwhile is answered.
            tracing::info!(%signal, drain_ms = drain.as_millis() as u64, "draining: /ready says 503; still serving");
            actix_web::rt::time::sleep(drain).await;
        }
        tracing::info!(%signal, grace_ms = grace.as_millis() as u64, "stopping: no new connections; answers in flight may finish");
        let stop = handle.stop(true);
        actix_web::rt::spawn(async move {
            actix_web::rt::time::sleep(grace).await;
            let _ = end_streams.send(true);
        });
        stop.await;
    });
    match running.server.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or Ctrl-C (SIGINT) and says which came.
async fn stop_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
    }
}
