//! duet: an OpenAI-compatible chat server for one's own machine, answering from a local
//! quantized student model with bounded memory. `main.rs` starts it through [`start`], the
//! tests through [`start`] or [`start_with`] (another backend in place of the local model).

pub mod admission;
pub mod backend;
pub mod config;
pub mod error;
pub mod http;
pub mod llamacpp;
pub mod memory;
pub mod openai;
pub mod rate_limit;
pub mod router;
pub mod student;
pub mod teacher;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpServer, web};

use admission::Admission;
use backend::ChatBackend;
use config::{Config, Mode};
use http::AppState;
use router::Router;
use student::Student;
use teacher::Teacher;

/// A bound, not yet awaited server and the address it listens on (useful with port 0).
pub struct Running {
    pub addr: SocketAddr,
    pub server: actix_web::dev::Server,
    pub state: web::Data<AppState>,
    /// The local engine behind `state.student`, when duet runs its own (not in teacher mode,
    /// nor when a test supplied another backend).
    pub engine: Option<Arc<Student>>,
    /// Set to `true` when the shutdown grace period is over: open streams then end.
    pub end_streams: tokio::sync::watch::Sender<bool>,
}

/// Binds the listener and builds the app; no model weights are read here.
pub fn start(config: &Config) -> std::io::Result<Running> {
    start_with(config, None)
}

/// [`start`], with `student` answering for the student's model instead of the local engine
/// (tests of the HTTP edge use a small fake backend, no model file needed).
pub fn start_with(
    config: &Config,
    student: Option<Arc<dyn ChatBackend>>,
) -> std::io::Result<Running> {
    memory::configure_allocator();
    let budget = config.memory.budget();
    let admission = Admission::new(budget);
    let client_keys =
        Arc::new(http::auth::ClientKeys::load(&config.server).map_err(std::io::Error::other)?);
    let (end_streams, shutdown) = tokio::sync::watch::channel(false);
    let engine = (config.mode != Mode::Teacher && student.is_none()).then(|| {
        Arc::new(Student::start(
            &config.student,
            config.student_name(),
            admission.clone(),
            config.memory.keep_alive,
        ))
    });
    let student = match (config.mode, student, &engine) {
        (Mode::Teacher, _, _) => None,
        (_, Some(custom), _) => Some(custom),
        (_, None, engine) => engine.clone().map(|e| e as Arc<dyn ChatBackend>),
    };
    let teacher = match config.mode {
        Mode::Student => None,
        Mode::Teacher | Mode::Hybrid => {
            let key = std::env::var(&config.teacher.api_key_env).ok();
            if key.is_none() {
                tracing::warn!(variable = %config.teacher.api_key_env, "no teacher API key is set; requests go upstream without one");
            }
            let teacher = Teacher::new(&config.teacher, key).map_err(std::io::Error::other)?;
            Some(Arc::new(teacher))
        }
    };
    let state = web::Data::new(AppState {
        student,
        teacher_url: teacher
            .as_ref()
            .map(|_| without_credentials(&config.teacher.base_url)),
        teacher,
        router: Router::new(config),
        admission,
        rate_limits: rate_limit::RateLimits::new(&config.limits).map_err(std::io::Error::other)?,
        metrics: http::metrics::Metrics::new(),
        mode: config.mode,
        started_at: http::unix_now(),
        max_body_bytes: config.server.max_body_bytes,
        read_timeout: std::time::Duration::from_millis(config.server.read_timeout_ms),
        input_limits: config.limits.clone(),
        student_config: config.student.clone(),
        client_keys,
        shutdown,
        draining: std::sync::atomic::AtomicBool::new(false),
        trusted_proxies: http::client_address::TrustedProxies::parse(
            &config.server.trusted_proxies,
        )
        .map_err(std::io::Error::other)?,
    });
    let app_state = state.clone();
    let cors_origins = config.server.cors_origins.clone();
    let grace = std::time::Duration::from_millis(config.server.shutdown_grace_ms);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(actix_web::middleware::from_fn(http::auth::require_key))
            .wrap(http::cors(&cors_origins))
            .configure(http::routes)
    })
    // main.rs turns SIGTERM and Ctrl-C into a graceful stop; streams still open when the
    // grace period ends are closed properly, so actix only needs a little longer.
    .disable_signals()
    // A client that closes its connection is gone: dropping its request at once releases
    // its queue slot and memory reservation instead of generating for nobody.
    .h1_allow_half_closed(false)
    .shutdown_timeout(grace.as_secs() + 2)
    .bind((config.server.host.as_str(), config.server.port))?;
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let addr = *server.addrs().first().expect("bound to one address");
    Ok(Running {
        addr,
        server: server.run(),
        state,
        engine,
        end_streams,
    })
}

/// `https://user:secret@host/v1` -> `https://***@host/v1`, for display.
fn without_credentials(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme && !url[scheme + 3..at].contains('/') => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}
