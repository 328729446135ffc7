//! The hyper listeners: a core's origin (HTTP/1.1 and h2c) and every process's admin port
//! (HTTP/1.1). One accept loop with the limits every listener needs: a connection cap and a
//! per-source cap checked before any work, the first request's headers (or the HTTP/2 preface
//! and first HEADERS) due within `header_timeout` of connecting however the client drips them,
//! a kept-alive connection closed after `idle_timeout` without a request (HTTP/2 PINGs and
//! other frames do not count: only requests do), and a client that stops reading dropped after
//! `write_timeout`.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests under way on one connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    /// Resolves once no request has been under way for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // A request under way is bounded by its handler (the origin's longest hold)
                // and the write timeout.
                tokio::time::sleep(idle.min(Duration::from_secs(1))).await;
                continue;
            }
            let due = *self.last.lock().unwrap_or_else(|p| p.into_inner()) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One request under way; its end (or its cancellation: a reset stream) is recorded on drop.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as under way until it is sent or dropped.
struct Guarded {
    body: Full<Bytes>,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

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
            let activity = Arc::new(Activity {
                in_flight: AtomicUsize::new(0),
                last: Mutex::new(Instant::now()),
            });
            let svc = {
                let first = first.clone();
                let activity = activity.clone();
                hyper::service::service_fn(move |req| {
                    first.notify_one();
                    let in_flight = InFlight::start(&activity);
                    let fut = handler(req);
                    async move {
                        // Under way until its body is written (or the stream is reset).
                        let r = fut.await.map(|body| Guarded {
                            body,
                            _in_flight: in_flight,
                        });
                        Ok::<_, Infallible>(r)
                    }
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
            tokio::select! {
                r = &mut conn => note_end(r, &refused),
                _ = activity.idle_for(limits.idle_timeout) => refused("idle_timeout"),
            }
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
