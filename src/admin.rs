//! The admin HTTP server of each process: /metrics, /healthz, /readyz.
//!
//! Served on its own port so that it can be firewalled apart from viewer traffic.

use crate::shutdown::Shutdown;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::Registry;
use std::convert::Infallible;
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

/// Serves the admin endpoints on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: ReadyFn,
    mut shutdown: Shutdown,
) {
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let ready = ready.clone();
                async move {
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
                    Ok::<_, Infallible>(r)
                }
            });
            let io = hyper_util::rt::TokioIo::new(sock);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
