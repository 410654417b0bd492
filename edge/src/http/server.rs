//! The accept loop. Hand-rolled on hyper rather than `axum::serve` because the edge needs
//! what that lacks: a header-read (and keep-alive idle) timeout, a cap on connections, and
//! a bounded drain on shutdown.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{router, HttpEdge};

/// Serves the API on `listener` until `cancel` fires; then stops accepting, lets requests
/// in flight finish (at most `shutdown_grace`), and returns.
pub async fn serve(listener: TcpListener, edge: HttpEdge, cancel: CancellationToken) -> io::Result<()> {
    let local = listener.local_addr()?;
    let config = edge.config().clone();
    let app = router(edge);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    tracing::info!(%local, "HTTP API (SendGrid v3 mail send) listening");

    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        metrics::counter!("sluice_http_connections_total").increment(1);
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        let header_read_timeout = config.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = cancel.cancelled(), if !shutting_down => {
                        // Finish the request in flight, then close; idle connections close now.
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }

    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, drain).await.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            grace = ?config.shutdown_grace,
            "HTTP requests still running after the shutdown grace period; dropping their connections"
        );
        connections.shutdown().await;
    }
    tracing::info!(%local, "HTTP API stopped");
    Ok(())
}

/// Accept errors concern one connection (aborted handshakes) or are resource shortages
/// (out of file descriptors) that pass; neither should stop the server. Back off briefly on
/// the latter so a full descriptor table does not turn into a busy loop.
async fn accept_failed(e: io::Error) {
    match e.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {}
        _ => {
            tracing::warn!(error = %e, "accepting an HTTP connection failed; retrying shortly");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
