//! `GET /metrics`: Prometheus text exposition of what duet does — requests by backend and
//! status, fallbacks, generated tokens, and memory (budget, resident, reserved, the
//! student's estimate and measurement). Never a key: no label carries one.

use actix_web::{HttpResponse, web};
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use super::AppState;
use crate::backend::LoadState;
use crate::memory;

/// The server's own registry (one per server, so servers in one process never mix).
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    gauges: Vec<(&'static str, IntGauge)>,
}

/// Gauges read fresh at every scrape.
const GAUGES: [(&str, &str); 13] = [
    (
        "duet_memory_budget_bytes",
        "The memory budget (memory.max_bytes).",
    ),
    (
        "duet_resident_memory_bytes",
        "The process's resident memory (VmRSS).",
    ),
    (
        "duet_peak_resident_memory_bytes",
        "The process's peak resident memory (VmHWM).",
    ),
    (
        "duet_memory_reserved_bytes",
        "Memory reserved by admitted requests.",
    ),
    (
        "duet_prompt_cache_bytes",
        "Key/value cache kept for prompt prefixes later requests may share.",
    ),
    (
        "duet_admission_refused_total",
        "Requests refused because the memory budget was spent.",
    ),
    (
        "duet_student_loaded",
        "1 while the student's weights are in memory.",
    ),
    (
        "duet_student_loads_total",
        "Times the student's weights were loaded.",
    ),
    (
        "duet_student_estimated_bytes",
        "The student's footprint estimated before loading.",
    ),
    (
        "duet_student_measured_rss_bytes",
        "Resident memory measured right after the student loaded.",
    ),
    (
        "duet_limits_redis_failures_total",
        "Rate-limit checks the shared limits' Redis could not answer (counted locally or refused).",
    ),
    (
        "duet_student_forward_passes_total",
        "Forward passes the student ran.",
    ),
    (
        "duet_student_batched_sequences_total",
        "Sequences those passes carried in all (over passes: the mean batch size).",
    ),
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = counter(
            "duet_requests_total",
            "Chat completion requests answered.",
            &["backend", "status"],
        );
        let fallbacks = counter(
            "duet_fallbacks_total",
            "Requests handed to the other backend.",
            &["from", "to"],
        );
        let generated_tokens = counter(
            "duet_generated_tokens_total",
            "Completion tokens generated, where known.",
            &["backend"],
        );
        let gauges = GAUGES
            .iter()
            .map(|(name, help)| {
                let g = IntGauge::new(*name, *help).expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                (*name, g)
            })
            .collect();
        Self {
            registry,
            requests,
            fallbacks,
            generated_tokens,
            gauges,
        }
    }

    fn set(&self, name: &str, value: u64) {
        let gauge = self.gauges.iter().find(|(n, _)| *n == name);
        debug_assert!(gauge.is_some(), "no gauge named {name}");
        if let Some((_, g)) = gauge {
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let m = &state.metrics;
    let ledger = state.admission.ledger();
    m.set("duet_memory_budget_bytes", state.admission.budget());
    m.set("duet_resident_memory_bytes", memory::rss_bytes());
    m.set("duet_peak_resident_memory_bytes", memory::peak_rss_bytes());
    m.set("duet_memory_reserved_bytes", ledger.reserved_bytes);
    m.set("duet_prompt_cache_bytes", ledger.prompt_cache_bytes);
    m.set("duet_admission_refused_total", ledger.refused);
    m.set(
        "duet_limits_redis_failures_total",
        state.rate_limits.redis_failures(),
    );
    if let Some(status) = state.student.as_ref().map(|s| s.status()) {
        m.set("duet_student_loads_total", u64::from(status.loads));
        m.set("duet_student_forward_passes_total", status.forward_passes);
        m.set(
            "duet_student_batched_sequences_total",
            status.batched_sequences,
        );
        let loaded = matches!(status.state, LoadState::Ready { .. });
        m.set("duet_student_loaded", u64::from(loaded));
        if let LoadState::Ready {
            estimated_bytes,
            measured_rss_bytes,
            ..
        } = status.state
        {
            m.set("duet_student_estimated_bytes", estimated_bytes);
            m.set("duet_student_measured_rss_bytes", measured_rss_bytes);
        }
    }
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&m.registry.gather(), &mut body) {
        return HttpResponse::InternalServerError().body(e.to_string());
    }
    HttpResponse::Ok()
        .content_type(encoder.format_type())
        .body(body)
}
