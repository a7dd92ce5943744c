//! The chat page at `GET /`: plain HTML, CSS and JavaScript compiled into the binary (no CDN,
//! no build step), talking to duet's own `/v1` API and `/health`. The page and its assets
//! are open to everyone, like `/health`: they hold no data, and the page asks for the API
//! key when the server wants one.

use actix_web::HttpResponse;
use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};

const INDEX: &str = include_str!("page/index.html");
const APP: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");
const FAVICON: &str = include_str!("page/favicon.svg");

/// Paths served without an API key.
pub const OPEN_PATHS: [&str; 5] = [
    "/",
    "/assets/app.js",
    "/assets/style.css",
    "/favicon.svg",
    "/favicon.ico",
];

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, content_type))
        // The page changes with the binary: let the browser check on every load.
        .insert_header((CACHE_CONTROL, "no-cache"))
        // It keeps an API key in the browser: only its own scripts run, nobody frames it.
        .insert_header((
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'",
        ))
        .insert_header(("x-content-type-options", "nosniff"))
        .body(body)
}

pub async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP)
}

pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// Also answers `/favicon.ico`, which browsers ask for on their own.
pub async fn favicon() -> HttpResponse {
    asset("image/svg+xml", FAVICON)
}
