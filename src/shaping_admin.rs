//! The traffic-shaping part of the admin API (served on `admin.listen` with `/metrics`):
//!
//! | call | what it does |
//! |---|---|
//! | `GET /admin/shaping` | every path: ready queue, connections, rate, limits and where they come from, suspensions and throttles with the rule that caused them |
//! | `GET /admin/shaping/explain?domain=D[&mx=H][&pool=P]` | which provider and limits apply to mail for a domain |
//! | `POST /admin/shaping/suspend` `{"provider":..,"source":..,"duration":"1h","reason":..}` | suspend a provider, a source IP, or one path |
//! | `POST /admin/shaping/resume` `{"provider":..,"source":..}` | lift suspensions and throttles |
//! | `POST /admin/shaping/reload` | re-read the shaping data (a broken file is refused, the old data stays) |
//!
//! On a node without an MTA (`role = "edge"`) every call answers 404 and says so.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_mta::MtaControl;

type Answer = (StatusCode, Json<Value>);

fn bad(message: String) -> Answer {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message })))
}

#[derive(Deserialize)]
struct ExplainQuery {
    domain: String,
    mx: Option<String>,
    pool: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    provider: Option<String>,
    source: Option<String>,
    /// A humantime duration: `90s`, `30m`, `4h`.
    duration: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    provider: Option<String>,
    source: Option<String>,
}

/// Longest suspension an operator can ask for: longer than any message lives anyway.
const MAX_SUSPENSION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The routes, for a node that runs an MTA (`Some`) or not.
pub fn routes(control: Option<MtaControl>) -> Router {
    let Some(control) = control else {
        let none = || async { (StatusCode::NOT_FOUND, Json(json!({ "error": "this node runs no MTA (role = \"edge\"): ask an MTA node's admin API" }))) };
        return Router::new()
            .route("/admin/shaping", get(none))
            .route("/admin/shaping/explain", get(none))
            .route("/admin/shaping/suspend", post(none))
            .route("/admin/shaping/resume", post(none))
            .route("/admin/shaping/reload", post(none));
    };
    Router::new()
        .route("/admin/shaping", get(status))
        .route("/admin/shaping/explain", get(explain))
        .route("/admin/shaping/suspend", post(suspend))
        .route("/admin/shaping/resume", post(resume))
        .route("/admin/shaping/reload", post(reload))
        .with_state(control)
}

async fn status(State(c): State<MtaControl>) -> Answer {
    (StatusCode::OK, Json(serde_json::to_value(c.shaping().status()).expect("status serializes")))
}

async fn explain(State(c): State<MtaControl>, q: Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>) -> Answer {
    let Ok(Query(q)) = q else { return bad("expected ?domain=example.com (and optionally &mx=HOST, &pool=NAME)".into()) };
    if q.domain.trim().is_empty() || q.domain.contains(['@', ' ', '/']) {
        return bad(format!("{:?} is not a domain name", q.domain));
    }
    let e = c.explain(&q.domain, q.mx.as_deref(), q.pool.as_deref()).await;
    (StatusCode::OK, Json(serde_json::to_value(e).expect("explanation serializes")))
}

/// Reads a JSON body, answering 400 with serde's reason when it is not what `T` expects.
fn body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(raw).map_err(|e| bad(format!("bad request body: {e}")))
}

async fn suspend(State(c): State<MtaControl>, raw: axum::body::Bytes) -> Answer {
    let b: SuspendBody = match body(&raw) {
        Ok(b) => b,
        Err(a) => return a,
    };
    if b.provider.is_none() && b.source.is_none() {
        return bad("name a provider, a source, or both: suspending everything is not an admin call".into());
    }
    let duration = match humantime::parse_duration(&b.duration) {
        Ok(d) if !d.is_zero() && d <= MAX_SUSPENSION => d,
        Ok(_) => return bad(format!("duration {:?}: must be more than 0s and at most 7 days", b.duration)),
        Err(e) => return bad(format!("duration {:?}: {e} (write it like 90s, 30m or 4h)", b.duration)),
    };
    let reason = b.reason.unwrap_or_else(|| "suspended by an operator".into());
    let now = c.suspend(b.provider.as_deref(), b.source.as_deref(), duration, &reason).await;
    tracing::warn!(provider = ?b.provider, source = ?b.source, ?duration, reason, paths = now, "shaping: operator suspension");
    (StatusCode::OK, Json(json!({ "suspended_paths": now, "duration": humantime::format_duration(duration).to_string(), "applies_to_new_paths": true })))
}

async fn resume(State(c): State<MtaControl>, raw: axum::body::Bytes) -> Answer {
    let b: ResumeBody = if raw.is_empty() { ResumeBody { provider: None, source: None } } else {
        match body(&raw) {
            Ok(b) => b,
            Err(a) => return a,
        }
    };
    let n = c.resume(b.provider.as_deref(), b.source.as_deref());
    tracing::info!(provider = ?b.provider, source = ?b.source, paths = n, "shaping: resumed");
    (StatusCode::OK, Json(json!({ "resumed_paths": n })))
}

async fn reload(State(c): State<MtaControl>) -> Answer {
    match c.reload().await {
        Ok(version) => {
            tracing::info!(version, "shaping data reloaded");
            (StatusCode::OK, Json(json!({ "version": version })))
        }
        Err(e) => {
            tracing::error!(error = %e, "shaping data NOT reloaded; the previous data stays");
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": e.to_string(), "kept": c.shaping().version() })))
        }
    }
}
