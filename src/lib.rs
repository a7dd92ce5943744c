//! duet: an OpenAI-compatible chat server for one's own machine, answering from a local
//! quantized student model with bounded memory. `main.rs` and the tests both start it
//! through [`start`].

pub mod backend;
pub mod config;
pub mod error;
pub mod http;
pub mod memory;
pub mod openai;
pub mod student;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpServer, web};

use config::Config;
use http::AppState;
use student::Student;

/// A bound, not yet awaited server and the address it listens on (useful with port 0).
pub struct Running {
    pub addr: SocketAddr,
    pub server: actix_web::dev::Server,
    pub state: web::Data<AppState>,
}

/// Binds the listener and builds the app; no model weights are read here.
pub fn start(config: &Config) -> std::io::Result<Running> {
    memory::configure_allocator();
    let state = web::Data::new(AppState {
        student: Arc::new(Student::start(&config.student, config.student_name())),
        student_name: config.student_name(),
        started_at: http::unix_now(),
        max_body_bytes: config.server.max_body_bytes,
    });
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .configure(http::routes)
    })
    .bind((config.server.host.as_str(), config.server.port))?;
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let addr = *server.addrs().first().expect("bound to one address");
    Ok(Running {
        addr,
        server: server.run(),
        state,
    })
}
