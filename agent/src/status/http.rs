//! The read-only HTTP listener (`--status-addr`, default 127.0.0.1:6782): `/healthz` (200 once
//! ready, 503 before), `/status` (the JSON report), `/metrics` (Prometheus text). Nothing here
//! changes the agent: management happens only on the unix socket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::report::collect;
use crate::services::Services;

async fn healthz(State(svc): State<Arc<Services>>) -> impl IntoResponse {
    let r = svc.ready.borrow().clone();
    if r.ready {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", r.reason))
    }
}

async fn status(State(svc): State<Arc<Services>>) -> impl IntoResponse {
    let report = collect(&svc).await;
    let code = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(report))
}

async fn metrics(State(svc): State<Arc<Services>>) -> impl IntoResponse {
    let report = collect(&svc).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        super::gauges::render(&svc.hub.metrics, &report),
    )
}

/// The status listener could not bind.
#[derive(Debug, thiserror::Error)]
#[error("--status-addr {addr}: cannot listen")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the listener (so a taken address fails the start) and returns the serving future.
pub async fn serve(
    svc: Arc<Services>,
    addr: SocketAddr,
) -> Result<impl Future<Output = ()> + Send + 'static, BindError> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })?;
    let shutdown = svc.hub.shutdown.clone();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(svc);
    Ok(async move {
        if let Err(e) =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        {
            tracing::error!(error = %e, "status listener failed");
        }
    })
}
