//! Keeping the rules table of a running server current and visible: reload on SIGHUP and on
//! `POST /admin/rules/reload` (file changes are watched by `sluice_rules::watch_files`), log
//! and count every reload, and export the table version and hit counters to `/metrics`.
//! A rejected table never replaces the one in use.

use std::sync::Arc;

use anyhow::Context;
use sluice_rules::{Engine, Reloaded, TableError};
use tokio_util::sync::CancellationToken;

/// Logs a reload and counts it in `sluice_rules_reloads_total{result}`.
pub fn log_reload(trigger: &str, result: &Result<Reloaded, TableError>) {
    match result {
        Ok(r) => {
            metrics::counter!("sluice_rules_reloads_total", "result" => "ok").increment(1);
            tracing::info!(trigger, version = %r.version, previous = %r.previous, rules = r.rules, "rules table reloaded");
        }
        Err(e) => {
            metrics::counter!("sluice_rules_reloads_total", "result" => "error").increment(1);
            tracing::error!(trigger, error = %e, "rules table NOT reloaded; the previous table keeps serving");
        }
    }
}

pub async fn reload_on_sighup(engine: Arc<Engine>, cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = hup.recv() => {
                let e = engine.clone();
                match tokio::task::spawn_blocking(move || e.reload()).await {
                    Ok(result) => log_reload("SIGHUP", &result),
                    Err(e) => tracing::error!(error = %e, "rules reload failed; the previous table keeps serving"),
                }
            }
        }
    }
}

/// The table version (`sluice_rules_table_info{version}` = 1 for the one in use) and the
/// hits per rule id (`sluice_rules_hits_total{rule}`), refreshed before each scrape.
pub fn export_rules_metrics(engine: &Engine, last_version: &std::sync::Mutex<Option<Arc<str>>>) {
    let version = engine.version();
    let mut last = last_version.lock().expect("metrics lock poisoned");
    if last.as_ref() != Some(&version) {
        if let Some(old) = last.replace(version.clone()) {
            metrics::gauge!("sluice_rules_table_info", "version" => old.to_string()).set(0.0);
        }
        metrics::gauge!("sluice_rules_table_rules").set(engine.table().rules().len() as f64);
    }
    metrics::gauge!("sluice_rules_table_info", "version" => version.to_string()).set(1.0);
    for (rule, hits) in engine.hits() {
        metrics::counter!("sluice_rules_hits_total", "rule" => rule).absolute(hits);
    }
}

/// `POST /admin/rules/reload`: 200 with the new version, or 422 with the problems (the old
/// table keeps serving).
pub async fn reload_rules(engine: Arc<Engine>) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let e = engine.clone();
    let result = match tokio::task::spawn_blocking(move || e.reload()).await {
        Ok(r) => r,
        Err(e) => {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(serde_json::json!({ "error": e.to_string() })));
        }
    };
    log_reload("admin API", &result);
    match result {
        Ok(r) => (
            axum::http::StatusCode::OK,
            axum::Json(serde_json::json!({
                "version": &*r.version, "previous": &*r.previous, "rules": r.rules, "changed": r.changed(),
            })),
        ),
        Err(e) => (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(serde_json::json!({
                "error": "the rules table was rejected; the previous table keeps serving",
                "problems": e.diagnostics(),
                "version": &*engine.version(),
            })),
        ),
    }
}
