//! `GET /ready`: whether a load balancer should send this replica requests. 200 while it
//! serves; 503 from SIGTERM on, during `server.drain_ms`, while it still answers what
//! arrives, so that balancers and Kubernetes take it out before its listener closes.
//! `/health` (liveness) stays 200 meanwhile: the process is fine, only leaving.

use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(Ordering::Relaxed) {
        HttpResponse::ServiceUnavailable().json(json!({ "ready": false, "reason": "draining" }))
    } else {
        HttpResponse::Ok().json(json!({ "ready": true }))
    }
}
