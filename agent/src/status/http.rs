//! The read-only HTTP listener (`--status-addr`, default 127.0.0.1:6782): `/` (the map page),
//! `/healthz` (200 once ready, 503 before), `/status` (the JSON report), `/metrics`
//! (Prometheus text). Nothing here changes the agent: management happens only on the unix
//! socket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::report::collect;
use crate::services::Services;

/// The map page: one self-contained document (styles and script inline, nothing fetched
/// from elsewhere) that polls `status` and draws it. Built into the binary.
pub const MAP_PAGE: &str = include_str!("page.html");

/// `GET /`: the map page.
pub async fn map_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page loads nothing from elsewhere; say so to the browser too.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:",
            ),
        ],
        MAP_PAGE,
    )
}

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
        .route("/", get(map_page))
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

/// Serves the map page with a fixed report (a simulated mesh, see `status::simulated`) until
/// `shutdown`: how the page is measured at a scale no lab reaches.
pub async fn serve_fixed(
    listener: tokio::net::TcpListener,
    report: super::report::Report,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let body = Arc::new(serde_json::to_string(&report).map_err(std::io::Error::other)?);
    let app = Router::new().route("/", get(map_page)).route(
        "/status",
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body.as_str().to_owned()) }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
