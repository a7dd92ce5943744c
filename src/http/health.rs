//! `GET /health`: answers at once, never loads the model, and says where each backend is:
//! the student's state (`unloaded`, `loading`, `ready` or `failed` with the reason) and
//! the teacher's address, the memory budget against the process's resident memory and the
//! admission ledger. Never the teacher's key.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::memory;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "mode": state.mode,
        "student": state.student.as_ref().map(|s| s.status()),
        "teacher": state.teacher_url.as_ref().map(|url| json!({ "base_url": url })),
        "memory": {
            "budget_bytes": state.admission.budget(),
            "rss_bytes": memory::rss_bytes(),
            "peak_rss_bytes": memory::peak_rss_bytes(),
            "ledger": state.admission.ledger(),
        },
    }))
}
