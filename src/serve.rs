//! `sluice serve`: open the spool, start the roles this process runs, stop cleanly on
//! SIGTERM/SIGINT (stop accepting, finish or release in-flight work, close the spool).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_edge::http::HttpEdge;
use sluice_edge::smtp::SmtpServer;
use sluice_edge::{ApiKeys, Ingest, Tenant};
use sluice_events::EventLog;
use sluice_mta::dkim::DkimSigning;
use sluice_mta::{Mta, MtaControl};
use sluice_rules::{Classify, Engine};
use sluice_spool::{LocalSpool, LocalSpoolOptions, Spool, SuppressionList};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role, SpoolTarget};
use crate::rules_reload::{export_rules_metrics, log_reload, reload_on_sighup, reload_rules};
use crate::{apikey, dkim_cli, telemetry};

pub fn run(
    config_path: Option<PathBuf>,
    role: Option<Role>,
    data_dir: Option<PathBuf>,
    spool: Option<String>,
) -> anyhow::Result<()> {
    telemetry::init_logging();
    let mut config = Config::read(config_path.as_deref())?;
    if let Some(role) = role {
        config.role = role;
    }
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    if let Some(url) = spool {
        config.set_spool_url(&url)?;
    }
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the async runtime")?;
    let result = runtime.block_on(serve(config));
    // Tasks the runtime still held may drop the last RADOS handle now.
    drop(runtime);
    #[cfg(feature = "rados")]
    sluice_spool::rados::join_shutdowns();
    result
}

/// The spool plus what must happen to it at shutdown.
struct OpenSpool {
    spool: Arc<dyn Spool>,
    /// The suppression list, in the same store as the spool.
    suppressions: Arc<dyn SuppressionList>,
    #[cfg(feature = "rados")]
    rados: Option<Arc<sluice_spool::RadosSpool>>,
}

async fn open_spool(config: &Config) -> anyhow::Result<OpenSpool> {
    match config.spool_target()? {
        SpoolTarget::Local => {
            let path = config.spool_path();
            let spool = tokio::task::spawn_blocking(move || LocalSpool::open(LocalSpoolOptions::new(&path)))
                .await?
                .with_context(|| {
                    format!(
                        "cannot open the local spool at {} (is another sluice using it? set spool.path or --data-dir)",
                        config.spool_path().display()
                    )
                })?;
            let spool = Arc::new(spool);
            Ok(OpenSpool {
                spool: spool.clone(),
                suppressions: spool,
                #[cfg(feature = "rados")]
                rados: None,
            })
        }
        #[cfg(feature = "rados")]
        SpoolTarget::Rados(target) => {
            let r = &config.spool.rados;
            let mut opts = sluice_spool::RadosSpoolOptions::new(target.conf.clone(), target.pool.clone());
            opts.user = target.user.clone();
            opts.namespace = target.namespace.clone();
            opts.shards = r.shards;
            opts.op_timeout = r.op_timeout;
            opts.shard_lease = r.shard_lease;
            opts.inline_body_max = r.inline_body_max;
            opts.sweep_interval = r.sweep_interval;
            opts.orphan_age = r.orphan_age;
            opts.own_shards = config.role.runs_mta();
            let spool = Arc::new(sluice_spool::RadosSpool::open(opts).await.with_context(|| {
                format!("cannot open the RADOS spool (pool {} via {})", target.pool, target.conf.display())
            })?);
            Ok(OpenSpool { spool: spool.clone(), suppressions: spool.clone(), rados: Some(spool) })
        }
        #[cfg(not(feature = "rados"))]
        SpoolTarget::Rados(_) => anyhow::bail!(
            "the RADOS spool (spool.url / spool.backend / --spool) needs a sluice built with `--features rados` (and librados installed)"
        ),
    }
}

async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (config key {key}): is it in use?"))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before anything is announced: a SIGTERM that comes right after "ready" (a supervisor
    // stopping a node it just started) must be a clean shutdown, not the default action.
    let shutdown = shutdown_signal()?;
    let metrics = telemetry::init_metrics()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let opened = open_spool(&config).await?;
    let spool = opened.spool.clone();
    let events = EventLog::open(&config.events_path()).await?;
    let files = config.rules.files.clone();
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || Engine::load(files)).await?.context("cannot load the rules table (section [rules])")?,
    );
    tracing::info!(version = %engine.version(), rules = engine.table().rules().len(), "rules table loaded");
    let classifier: Arc<dyn Classify> = engine.clone();
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Reload on SIGHUP and (if enabled) when a file changes; both keep the old table on error.
    tasks.spawn(reload_on_sighup(engine.clone(), cancel.clone()));
    let _watch = match config.rules.watch {
        true => sluice_rules::watch_files(engine.clone(), |r| log_reload("file change", &r))
            .map_err(|e| tracing::warn!(error = %e, "rules: not watching the files"))
            .ok(),
        false => None,
    };

    let mut waker = None;
    let mut control = None;
    if config.role.runs_mta() {
        let dkim = DkimSigning::load(&config.dkim).context("cannot set up DKIM signing (section [dkim])")?;
        let mta = Mta::new(config.mta.clone(), spool.clone(), events.clone(), classifier.clone())
            .context("cannot start delivery (section [mta])")?
            .with_suppressions(opened.suppressions.clone())
            .with_dkim(Arc::new(dkim));
        waker = Some(mta.waker());
        control = Some(mta.control());
        let cancel = cancel.clone();
        tasks.spawn(async move {
            mta.run(cancel).await;
            Ok(())
        });
    }

    let mut listening = Vec::new();
    if config.role.runs_edge() {
        let mut keys = ApiKeys::from_config(&config.api_keys).expect("validated");
        if keys.is_empty() {
            let (key, created) = apikey::quickstart_key(&config.data_dir)?;
            keys.insert_key(&key, Tenant { name: "quickstart".into() });
            let path = config.data_dir.join("quickstart-api-key");
            if created {
                println!("sluice: created a quick-start API key (no [[api_keys]] configured): {key}");
            }
            println!("sluice: quick-start API key in {} (configure [[api_keys]] to replace it)", path.display());
        }
        let keys = Arc::new(keys);
        let mut ingest =
            Ingest::new(spool.clone(), events.clone(), config.mta.retry.max_age).with_suppressions(opened.suppressions.clone());
        if let Some(w) = &waker {
            ingest = ingest.with_waker(w.clone());
        }
        if let Some(check) = dkim_cli::admission(&config.dkim) {
            ingest = ingest.with_admission(check);
        }
        let http_listener = bind(config.http.listen, "http.listen").await?;
        let smtp_listener = bind(config.smtp.listen, "smtp.listen").await?;
        listening.push(format!("http={}", http_listener.local_addr()?));
        listening.push(format!("smtp={}", smtp_listener.local_addr()?));
        let http = HttpEdge::new(config.http.clone(), ingest.clone(), keys.clone(), config.smtp.hostname.clone());
        let smtp = SmtpServer::new(config.smtp.clone(), ingest, keys).context("cannot start the SMTP edge (section [smtp])")?;
        let c = cancel.clone();
        tasks.spawn(async move { sluice_edge::http::serve(http_listener, http, c).await.context("HTTP edge failed") });
        let c = cancel.clone();
        tasks.spawn(async move { smtp.serve(smtp_listener, c).await.context("SMTP edge failed") });
    }
    // SIGHUP reloads the shaping data too (the rules are reloaded by `reload_on_sighup`).
    if let Some(c) = control.clone() {
        tasks.spawn(reload_shaping_on_sighup(c, cancel.clone()));
    }
    let admin = bind(config.admin.listen, "admin.listen").await?;
    let admin_addr = admin.local_addr()?;
    tasks.spawn(serve_admin(admin, metrics, spool.clone(), engine.clone(), control, cancel.clone()));
    listening.push(format!("admin={admin_addr}"));
    tracing::info!(
        role = ?config.role,
        spool = spool.backend(),
        data_dir = %config.data_dir.display(),
        "sluice running: {}",
        listening.join(" ")
    );
    println!("sluice: ready ({})", listening.join(" "));

    // Run until a signal, or until a component fails.
    let mut failure = None;
    tokio::select! {
        _ = shutdown => tracing::info!("sluice: shutting down"),
        Some(done) = tasks.join_next() => {
            if let Ok(Err(e)) = done { failure = Some(e) }
        }
    }
    cancel.cancel();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::error!(error = %e, "component failed during shutdown");
        }
    }
    #[cfg(feature = "rados")]
    if let Some(r) = &opened.rados {
        r.close().await;
    }
    drop(opened);
    drop(spool);
    tracing::info!("sluice: stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes at the first signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn reload_shaping_on_sighup(control: MtaControl, cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = hup.recv() => match control.reload().await {
                Ok(version) => tracing::info!(trigger = "SIGHUP", version, "shaping data reloaded"),
                Err(e) => tracing::error!(trigger = "SIGHUP", error = %e, "shaping data NOT reloaded; the previous data stays"),
            },
        }
    }
}

/// `/metrics` (Prometheus), `/healthz`, `/admin/spool` (counts by state, JSON),
/// `GET`/`POST /admin/rules[/reload]` (the table in use; reload it) and `/admin/shaping/...`
/// (see `shaping_admin.rs`).
async fn serve_admin(
    listener: TcpListener,
    metrics: PrometheusHandle,
    spool: Arc<dyn Spool>,
    engine: Arc<Engine>,
    control: Option<MtaControl>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // Queue-depth gauges, refreshed in the background: counting can be a scan (RADOS).
    let gauges = {
        let (spool, cancel) = (spool.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(c) = spool.counts().await {
                    metrics::gauge!("sluice_queue_depth", "state" => "queued").set(c.queued as f64);
                    metrics::gauge!("sluice_queue_depth", "state" => "deferred").set(c.deferred as f64);
                    metrics::gauge!("sluice_queue_depth", "state" => "leased").set(c.leased as f64);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        })
    };
    let upkeep = metrics.clone();
    let (rules_engine, reload_engine) = (engine.clone(), engine.clone());
    let last_version = Arc::new(std::sync::Mutex::new(None));
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                export_rules_metrics(&engine, &last_version);
                async move { m.render() }
            }),
        )
        .route(
            "/admin/rules",
            get(move || {
                let e = rules_engine.clone();
                async move {
                    let files: Vec<String> = e.files().iter().map(|f| f.display().to_string()).collect();
                    axum::Json(serde_json::json!({ "version": &*e.version(), "rules": e.table().rules().len(), "files": files }))
                }
            }),
        )
        .route("/admin/rules/reload", post(move || reload_rules(reload_engine.clone())))
        .merge(crate::shaping_admin::routes(control))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/admin/spool",
            get(move || {
                let spool = spool.clone();
                async move {
                    match spool.counts().await {
                        Ok(c) => (axum::http::StatusCode::OK, axum::Json(serde_json::to_value(c).expect("counts serialize"))),
                        Err(e) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({ "error": e.to_string() })),
                        ),
                    }
                }
            }),
        );
    let upkeep_task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => upkeep.run_upkeep(),
                }
            }
        }
    });
    let c = cancel.clone();
    let result = axum::serve(listener, app).with_graceful_shutdown(async move { c.cancelled().await }).await;
    gauges.abort();
    upkeep_task.abort();
    result.context("admin listener failed")
}
