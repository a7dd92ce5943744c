//! `GET /health`: answers at once, never loads the model, and says where each backend is:
//! the student's state (`unloaded`, `loading`, `ready` or `failed` with the reason) and
//! the teacher's address. Never the teacher's key.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "mode": state.mode,
        "student": state.student.as_ref().map(|s| s.status()),
        "teacher": state.teacher_url.as_ref().map(|url| json!({ "base_url": url })),
    }))
}
