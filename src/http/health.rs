//! `GET /health`: answers at once, never loads the model, and says where the student is
//! (`unloaded`, `loading`, `ready` or `failed` with the reason).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok", "student": state.student.status() }))
}
