//! The admin HTTP server of each process: /metrics, /healthz, /readyz.
//!
//! Served on its own port so that it can be firewalled apart from viewer traffic.

use crate::shutdown::Shutdown;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Decides /readyz.
pub type ReadyFn = Arc<dyn Fn() -> bool + Send + Sync>;

fn respond(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Serves the admin endpoints on `listener` until shutdown, within `limits`; refused and
/// timed-out connections are counted in `refused` by reason.
pub async fn serve(
    listener: TcpListener,
    limits: crate::httpd::HttpLimits,
    registry: Registry,
    ready: ReadyFn,
    refused: prometheus::IntCounterVec,
    shutdown: Shutdown,
) {
    let handler: crate::httpd::Handler = Arc::new(move |req: Request<hyper::body::Incoming>| {
        let r = match req.uri().path() {
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::telemetry::render(&registry),
            ),
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                if ready() {
                    respond(StatusCode::OK, "text/plain", "ready\n".into())
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".into(),
                    )
                }
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        crate::httpd::ready(r)
    });
    let on_refused: crate::limits::OnTrip =
        Arc::new(move |reason| refused.with_label_values(&[reason]).inc());
    crate::httpd::serve(
        "admin", listener, limits, false, handler, on_refused, shutdown,
    )
    .await
}
