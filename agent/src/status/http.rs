//! The read-only HTTP listener (`--status-addr`, default 127.0.0.1:6782): `/healthz` (200 once
//! ready, 503 before), `/status` (the JSON report), `/metrics` (Prometheus text). Nothing here
//! changes the agent: management happens only on the unix socket.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::daemon::Agent;

async fn healthz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let r = agent.ready.borrow().clone();
    if r.ready {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", r.reason))
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let report = agent.report().await;
    let code = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(report))
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let report = agent.report().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        agent.metrics.render(&report),
    )
}

/// Binds the listener (so a taken address fails the start) and returns the serving future.
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
) -> anyhow::Result<impl Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--status-addr {addr}"))?;
    let shutdown = agent.shutdown.clone();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(agent);
    Ok(async move {
        if let Err(e) =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        {
            tracing::error!(error = %e, "status listener failed");
        }
    })
}
