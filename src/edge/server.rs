//! Viewer connections: our own accept loop in front of Pingora's HTTP proxy, so that listeners
//! live in the process's tokio runtime (port 0 works, addresses are logged like every other
//! listener, shutdown is ours) and connection limits are enforced before Pingora sees a byte.
//!
//! Limits: a cap on connections; the TLS handshake and each HTTP/1 request's headers must
//! arrive within `header_timeout` (a slow-headers client is cut off however it drips bytes).
//! Idle kept-alive connections and slow readers are bounded by the keep-alive and write
//! timeouts the proxy sets on each request.

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
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

/// Connection limits of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS handshake and each request's headers.
    pub header_timeout: Duration,
}

/// Serves viewers on `listener` (TLS when `tls` is set) with `app` until shutdown.
pub async fn serve<A>(
    listener: TcpListener,
    tls: Option<Arc<Acceptor>>,
    app: Arc<A>,
    slots: Arc<Semaphore>,
    limits: Limits,
    on_refused: Arc<dyn Fn() + Send + Sync>,
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
                    warn!(error = %e, "viewer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            on_refused();
            debug!(%peer, "viewer connection refused: connection limit reached");
            continue; // dropping the socket closes it
        };
        let _ = sock.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
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
                            debug!(%peer, "viewer TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(l4),
            };
            let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
            let mut next: Option<Stream> = Some(if h2 {
                stream // HTTP/2 has its own framing and idle timeout (h2_idle_timeout)
            } else {
                Box::new(Guard::new(stream, limits))
            });
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
    /// Inside a request's headers (`matched` bytes of "\r\n\r\n" seen): the deadline runs.
    Headers { matched: u8 },
    /// After the headers (the edge serves only bodiless GET and HEAD): no deadline here; the
    /// idle time between requests is Pingora's keep-alive timeout.
    Between,
    /// HTTP/2 with prior knowledge: not tracked (h2 has its own framing).
    H2,
}

/// Enforces the header deadline on an HTTP/1 connection by watching the bytes read, so a
/// client that drips a request byte by byte is cut off however slowly it drips; coalesces
/// writes between flushes.
#[derive(Debug)]
struct Guard {
    inner: Stream,
    header_timeout: Duration,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Coalesced writes not yet sent, and how much of them is.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl Guard {
    fn new(inner: Stream, limits: Limits) -> Self {
        Guard {
            inner,
            header_timeout: limits.header_timeout,
            phase: Phase::Connected,
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Connected && bytes.starts_with(b"PRI * HTTP/2.0") {
            self.phase = Phase::H2;
        }
        for &b in bytes {
            self.phase = match self.phase {
                Phase::H2 => return,
                // Stray line ends between requests are allowed and start nothing.
                Phase::Between if b == b'\r' || b == b'\n' => Phase::Between,
                Phase::Between => {
                    let d = Instant::now() + self.header_timeout;
                    self.deadline.as_mut().reset(d);
                    Phase::Headers { matched: 0 }
                }
                Phase::Connected => Phase::Headers {
                    matched: u8::from(b == b'\r'),
                },
                Phase::Headers { matched } => {
                    let expect = b"\r\n\r\n"[matched as usize];
                    match (b == expect, matched) {
                        (true, 3) => Phase::Between,
                        (true, m) => Phase::Headers { matched: m + 1 },
                        (false, _) => Phase::Headers {
                            matched: u8::from(b == b'\r'),
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
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.observe(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let waiting_for_headers =
                    matches!(self.phase, Phase::Connected | Phase::Headers { .. });
                if waiting_for_headers && self.deadline.as_mut().poll(cx).is_ready() {
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
        self.inner.shutdown().await
    }
}

impl UniqueID for Guard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guard {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Guard {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guard {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Guard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
