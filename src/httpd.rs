//! The hyper listeners: a core's origin (HTTP/1.1 and h2c) and every process's admin port
//! (HTTP/1.1). One accept loop with the limits every listener needs: a connection cap and a
//! per-source cap checked before any work, the first request's headers (or the HTTP/2 preface
//! and first HEADERS) due within `header_timeout` of connecting however the client drips them,
//! a kept-alive connection closed after `idle_timeout` without a request, and a client that
//! stops reading dropped after `write_timeout`.
//!
//! hyper alone bounds none of these: without a timer it has no header timeout, and hyper-util's
//! protocol detection waits for the 24-byte HTTP/2 preface with no deadline at all.

use crate::limits::{accept_backoff, ConnLimiter, Deadlines, OnTrip};
use crate::shutdown::Shutdown;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections at once; more are closed at once.
    pub max_connections: usize,
    /// Connections at once from one source address (IPv6: one /64); 0 for no cap.
    pub max_connections_per_ip: usize,
    /// The first request's headers must arrive within this time of connecting.
    pub header_timeout: Duration,
    /// A connection with no request under way (or no byte moving) for this long is closed;
    /// later requests' headers are due within it too.
    pub idle_timeout: Duration,
    /// A client that accepts no response bytes for this long is dropped.
    pub write_timeout: Duration,
}

/// Answers one request.
pub type Handler = Arc<
    dyn Fn(Request<hyper::body::Incoming>) -> BoxFuture<'static, Response<Full<Bytes>>>
        + Send
        + Sync,
>;

/// Serves `handler` on `listener` until shutdown; `h2c` also accepts HTTP/2 with prior
/// knowledge. `refused` is called with the reason of every refused or timed-out connection
/// (the `reason` label of the listener's refusal metric).
pub async fn serve(
    what: &'static str,
    listener: TcpListener,
    limits: HttpLimits,
    h2c: bool,
    handler: Handler,
    refused: OnTrip,
    mut shutdown: Shutdown,
) {
    let limiter = ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    accept_backoff(what, &e).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let permit = match limiter.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(r) => {
                refused(r.label());
                tracing::debug!(listener = what, %peer, reason = r.label(), "connection refused");
                continue; // dropping the socket closes it
            }
        };
        let _ = sock.set_nodelay(true);
        let handler = handler.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = Deadlines::new(sock, limits.write_timeout)
                .with_idle(limits.idle_timeout)
                .on_trip(refused.clone());
            let first = Arc::new(Notify::new());
            let svc = {
                let first = first.clone();
                hyper::service::service_fn(move |req| {
                    first.notify_one();
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                })
            };
            let mut b = auto::Builder::new(TokioExecutor::new());
            // Later requests on a kept-alive connection: hyper's header timer runs from the end
            // of one response to the next request's headers, so it is the idle timeout too.
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.idle_timeout)
                .max_buf_size(64 * 1024);
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(1000)
                .max_header_list_size(16 * 1024);
            let b = if h2c { b } else { b.http1_only() };
            let conn = b.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            // The first request: protocol detection, the h2 preface and the headers, however
            // slowly they drip, within the header timeout of connecting.
            tokio::select! {
                r = &mut conn => {
                    note_end(r, &refused);
                    return;
                }
                _ = first.notified() => {}
                _ = tokio::time::sleep(limits.header_timeout) => {
                    refused("header_timeout");
                    return;
                }
            }
            note_end(conn.await, &refused);
        });
    }
}

/// Counts hyper's own header timeout (later requests of a kept-alive connection); our
/// deadlines report themselves.
fn note_end(r: Result<(), Box<dyn std::error::Error + Send + Sync>>, refused: &OnTrip) {
    if let Err(e) = r {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            refused("idle_timeout");
        }
    }
}

/// Shorthand for handlers that need no async work.
pub fn ready(r: Response<Full<Bytes>>) -> BoxFuture<'static, Response<Full<Bytes>>> {
    Box::pin(std::future::ready(r))
}
