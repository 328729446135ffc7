//! Viewer connections: our own accept loop in front of Pingora's HTTP proxy, so that listeners
//! live in the process's tokio runtime (port 0 works, addresses are logged like every other
//! listener, shutdown is ours) and connection limits are enforced before Pingora sees a byte.
//!
//! Limits: caps on connections in total and per source address; the TLS handshake, the h2c
//! preface check, the HTTP/2 preface and each HTTP/1 request's headers must arrive within
//! `header_timeout` (a slow-headers client is cut off however it drips bytes); a kept-alive
//! HTTP/1 connection waits at most `idle_timeout` for its next request; a write pending for
//! `write_timeout` ends the connection.

use crate::limits::{ConnLimiter, Deadlines, OnTrip};
use crate::shutdown::Shutdown;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::{
    raw_connect::ProxyDigest, tls::SslDigest, tls::TlsRef, Peek, Shutdown as IoShutdown,
    SocketDigest, Ssl, Stream, TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// Connection limits of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS handshake, the HTTP/2 preface, and each HTTP/1 request's headers.
    pub header_timeout: Duration,
    /// An HTTP/1 connection kept alive with no request under way.
    pub idle_timeout: Duration,
    /// A viewer that accepts no bytes for this long is dropped (every write: headers, bodies,
    /// flushes; pingora times only body writes).
    pub write_timeout: Duration,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves viewers on `listener` (TLS when `tls` is set) with `app` until shutdown.
pub async fn serve<A>(
    listener: TcpListener,
    tls: Option<Arc<Acceptor>>,
    app: Arc<A>,
    slots: Arc<ConnLimiter>,
    limits: Limits,
    on_refused: OnTrip,
    mut shutdown: Shutdown,
) where
    A: ServerApp + Send + Sync + 'static,
{
    // Pingora's sessions watch this for graceful shutdown.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    crate::limits::accept_backoff("playback", &e).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let permit = match slots.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(r) => {
                on_refused(r.label());
                debug!(%peer, reason = r.label(), "viewer connection refused");
                continue; // dropping the socket closes it
            }
        };
        let _ = sock.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        let on_trip = on_refused.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let l4: pingora::protocols::l4::stream::Stream = sock.into();
            let stream: Stream = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.tls_handshake(l4))
                        .await
                    {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "viewer TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            on_trip("header_timeout");
                            debug!(%peer, "viewer TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(l4),
            };
            // HTTP/2 by ALPN: the guard bounds the wait for the preface, then steps aside (h2
            // has its own framing, and pingora's h2_idle_timeout closes idle connections).
            let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
            let mut next: Option<Stream> = Some(Box::new(Guard::new(stream, limits, h2, on_trip)));
            // HTTP/1 keep-alive: Pingora hands the connection back after each request.
            while let Some(s) = next.take() {
                next = app.process_new(s, &stop).await;
            }
        });
    }
    let _ = stop_tx.send(true);
}

/// Where an HTTP/1 connection is in its request cycle, as seen from the bytes read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Connected, nothing read yet: the first headers are due a header timeout after connecting.
    Connected,
    /// Inside a request's headers (`matched` bytes of "\r\n\r\n" seen; `started` once a byte
    /// other than CR or LF arrived, so stray line ends cannot pass for an end of headers): the
    /// deadline runs.
    Headers { matched: u8, started: bool },
    /// After the headers (the edge serves only bodiless GET and HEAD): no deadline here; the
    /// idle time between requests is Pingora's keep-alive timeout.
    Between,
    /// HTTP/2 negotiated by ALPN, `got` bytes of the preface read: the deadline runs.
    Preface { got: u8 },
    /// HTTP/2 under way: not tracked (h2 has its own framing).
    H2,
}

/// Enforces the header deadline on an HTTP/1 connection by watching the bytes read, so a
/// client that drips a request byte by byte is cut off however slowly it drips; coalesces
/// writes between flushes.
struct Guard {
    /// The viewer's stream, with the write timeout (a viewer that stops reading).
    inner: Deadlines<Stream>,
    limits: Limits,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Bytes read ahead by `try_peek` (the h2c preface check), handed out first by reads.
    peeked: Vec<u8>,
    /// Writes are coalesced (HTTP/1 only: h2 frames its own writes).
    coalesce: bool,
    /// Coalesced writes not yet sent, and how much of them is.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Counts the connections a deadline ends.
    on_trip: OnTrip,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("phase", &self.phase).finish()
    }
}

impl Guard {
    fn new(inner: Stream, limits: Limits, h2: bool, on_trip: OnTrip) -> Self {
        Guard {
            inner: Deadlines::new(inner, limits.write_timeout).on_trip(on_trip.clone()),
            on_trip,
            limits,
            phase: if h2 {
                Phase::Preface { got: 0 }
            } else {
                Phase::Connected
            },
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            peeked: Vec::new(),
            coalesce: !h2,
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    fn waiting_for_headers(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connected | Phase::Headers { .. } | Phase::Preface { .. }
        )
    }

    fn observe(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Connected && bytes.starts_with(b"PRI * HTTP/2.0") {
            self.phase = Phase::H2;
        }
        for &b in bytes {
            self.phase = match self.phase {
                Phase::H2 => return,
                Phase::Preface { got } if usize::from(got) + 1 >= H2_PREFACE.len() => Phase::H2,
                Phase::Preface { got } => Phase::Preface { got: got + 1 },
                // Any byte starts the next request's deadline, stray line ends included: a
                // client must not hold the connection by sending CRLF now and then.
                Phase::Between => {
                    let d = Instant::now() + self.limits.header_timeout;
                    self.deadline.as_mut().reset(d);
                    Phase::Headers {
                        matched: u8::from(b == b'\r'),
                        started: b != b'\r' && b != b'\n',
                    }
                }
                Phase::Connected => Phase::Headers {
                    matched: u8::from(b == b'\r'),
                    started: b != b'\r' && b != b'\n',
                },
                Phase::Headers { matched, started } => {
                    let expect = b"\r\n\r\n"[matched as usize];
                    let started = started || (b != b'\r' && b != b'\n');
                    match (b == expect, matched) {
                        (true, 3) if started => Phase::Between,
                        (true, 3) => Phase::Headers {
                            matched: 0,
                            started,
                        },
                        (true, m) => Phase::Headers {
                            matched: m + 1,
                            started,
                        },
                        (false, _) => Phase::Headers {
                            matched: u8::from(b == b'\r'),
                            started,
                        },
                    }
                }
            };
        }
    }
}

impl AsyncRead for Guard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.peeked.is_empty() {
            let n = buf.remaining().min(self.peeked.len());
            let bytes: Vec<u8> = self.peeked.drain(..n).collect();
            buf.put_slice(&bytes);
            self.observe(&bytes);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.observe(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.waiting_for_headers() && self.deadline.as_mut().poll(cx).is_ready() {
                    (self.on_trip)("header_timeout");
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request headers not received in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl Guard {
    /// Writes out the coalesced bytes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

/// Writes are coalesced until Pingora flushes (it does at the end of each response and after
/// each chunk), so a response's header and body leave in one send instead of two: on loopback
/// and small objects, the syscall and TCP segment per write dominate the cost of a cache hit.
const WRITE_COALESCE: usize = 64 * 1024;

impl AsyncWrite for Guard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if !me.coalesce {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        if me.wbuf.len() + buf.len() > WRITE_COALESCE {
            match me.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            if buf.len() >= WRITE_COALESCE {
                return Pin::new(&mut me.inner).poll_write(cx, buf);
            }
        }
        me.wbuf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[async_trait]
impl IoShutdown for Guard {
    async fn shutdown(&mut self) {
        self.inner.get_mut().shutdown().await
    }
}

impl UniqueID for Guard {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().id()
    }
}

impl Ssl for Guard {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ref().get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ref().get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.get_ref().selected_alpn_proto()
    }
}

impl GetTimingDigest for Guard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().get_timing_digest()
    }
}

impl GetProxyDigest for Guard {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().get_proxy_digest()
    }
}

impl GetSocketDigest for Guard {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().get_socket_digest()
    }
}

/// Pingora peeks for the h2c preface before each HTTP/1 request (kept-alive connections
/// included). Its own peek waits for all 24 bytes with no deadline, so a silent or dripping
/// client, or an idle kept-alive one, would hold its connection slot forever. This peek stops as
/// soon as the bytes can no longer be the preface, and gives up at the header deadline (a new
/// connection) or the keep-alive idle timeout (between requests).
#[async_trait]
impl Peek for Guard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let (deadline, reason) = if self.phase == Phase::Between {
            (Instant::now() + self.limits.idle_timeout, "idle_timeout")
        } else {
            (self.deadline.deadline(), "header_timeout")
        };
        let want = buf.len();
        let fill = async {
            let mut chunk = [0u8; 64];
            while self.peeked.len() < want && H2_PREFACE.starts_with(&self.peeked) {
                let room = (want - self.peeked.len()).min(chunk.len());
                let n = tokio::io::AsyncReadExt::read(&mut self.inner, &mut chunk[..room]).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                self.peeked.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        };
        match tokio::time::timeout_at(deadline, fill).await {
            Ok(r) => r?,
            Err(_) => {
                (self.on_trip)(reason);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the deadline",
                ));
            }
        }
        let n = want.min(self.peeked.len());
        buf[..n].copy_from_slice(&self.peeked[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}
