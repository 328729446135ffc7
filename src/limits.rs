//! Connection limits shared by every TCP listener: a cap on connections, a cap per source
//! address, and a stream wrapper that drops a peer which stops reading (write timeout) or sends
//! nothing (read deadline).
//!
//! Every listener admits a connection through a `ConnLimiter` before doing any work for it, so a
//! flood from one address cannot take the slots of everyone else, and wraps the socket in
//! `Deadlines` so that no phase of a connection waits on the peer without an end.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Why a connection was not admitted; also the `reason` label of the refusal metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener's connection cap is reached.
    ConnectionLimit,
    /// The source address already holds its share of connections.
    PerIpLimit,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PerIpLimit => "per_ip_limit",
        }
    }
}

/// The source a per-address cap counts: IPv4 addresses as they are, IPv6 by /64 (one
/// subscriber's prefix: a host can pick any address inside it), IPv4-mapped IPv6 as IPv4.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts the open connections of a listener (or of listeners that share a cap) in total and
/// per source address.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    per_ip_max: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl ConnLimiter {
    /// A limiter for `max` connections, at most `per_ip_max` from one source (0 = no per-source
    /// cap).
    pub fn new(max: usize, per_ip_max: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max,
            per_ip_max,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admits a connection from `ip`, or says why not. The permit frees the slot when dropped.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let key = source_key(ip);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *g;
        if *total >= self.max {
            return Err(Refusal::ConnectionLimit);
        }
        let n = per_ip.entry(key).or_insert(0);
        if self.per_ip_max > 0 && *n >= self.per_ip_max {
            return Err(Refusal::PerIpLimit);
        }
        *n += 1;
        *total += 1;
        Ok(ConnPermit {
            limiter: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// One admitted connection's slot.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut g = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.key);
            }
        }
    }
}

/// Waits `pause` after a failed accept. Out of file descriptors (EMFILE, ENFILE) the listener
/// stays readable, so retrying at once spins a core and floods the log while starving every
/// other task; a pause lets connections close and the log stays readable.
pub async fn accept_backoff(what: &str, e: &std::io::Error) {
    tracing::warn!(listener = what, error = %e, "accept failed; pausing this listener");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Called once with the reason ("write_timeout", "header_timeout", "idle_timeout") when a
/// deadline ends a connection.
pub type OnTrip = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Deadlines on a stream: a peer that leaves a write pending for `write_timeout` (it stopped
/// reading) gets an error instead of pinning the connection and its buffers; while a read
/// deadline is set, a read that has not delivered a byte by then fails (a silent or dripping
/// peer in a phase that must finish by a deadline); with an idle timeout, a connection that
/// moves no byte either way for that long fails. The owner moves the read deadline as the
/// protocol advances.
pub struct Deadlines<S> {
    inner: S,
    write_timeout: Duration,
    write_stall: Option<Pin<Box<Sleep>>>,
    read_due: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    on_trip: Option<OnTrip>,
}

impl<S> Deadlines<S> {
    /// Wraps `inner`; no read deadline until `set_read_deadline`, no idle timeout unless
    /// `with_idle`.
    pub fn new(inner: S, write_timeout: Duration) -> Self {
        Deadlines {
            inner,
            write_timeout,
            write_stall: None,
            read_due: None,
            idle: None,
            on_trip: None,
        }
    }

    /// Fails the stream when no byte moves either way for `idle`.
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = Some((idle, Box::pin(tokio::time::sleep(idle))));
        self
    }

    /// Reports which deadline ended the stream.
    pub fn on_trip(mut self, f: OnTrip) -> Self {
        self.on_trip = Some(f);
        self
    }

    /// Reads must complete by `at` (None: no deadline).
    pub fn set_read_deadline(&mut self, at: Option<Instant>) {
        self.read_due = at.map(|t| Box::pin(tokio::time::sleep_until(t)));
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    fn trip(&mut self, reason: &'static str, what: &str) -> std::io::Error {
        if let Some(f) = self.on_trip.take() {
            f(reason);
        }
        std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string())
    }

    fn write_stalled(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let t = self.write_timeout;
        let s = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        if s.as_mut().poll(cx).is_ready() {
            return Some(self.trip("write_timeout", "peer stopped reading (write timeout)"));
        }
        self.idle_expired(cx)
    }

    fn idle_expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let (_, s) = self.idle.as_mut()?;
        if s.as_mut().poll(cx).is_ready() {
            return Some(self.trip("idle_timeout", "connection idle too long"));
        }
        None
    }

    fn moved(&mut self) {
        if let Some((d, s)) = self.idle.as_mut() {
            s.as_mut().reset(Instant::now() + *d);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlines<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if let Some(d) = self.read_due.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        let e = self.trip("header_timeout", "peer did not send in time");
                        return Poll::Ready(Err(e));
                    }
                }
                match self.idle_expired(cx) {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Pending,
                }
            }
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S> Deadlines<S> {
    /// The verdict on a write-side poll: pending too long fails; progress re-arms the timers.
    fn settle<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
        progressed: impl FnOnce(&T) -> bool,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => match self.write_stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            Poll::Ready(r) => {
                self.write_stall = None;
                if r.as_ref().is_ok_and(progressed) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlines<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.settle(cx, r, |n| *n > 0)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.settle(cx, r, |n| *n > 0)
    }
    // hyper queues bodies by reference only over vectored writes; without this it copies.
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.settle(cx, r, |_| false)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.settle(cx, r, |_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn per_source_and_total_caps() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_admit(a).unwrap();
        let _p2 = l.try_admit(a).unwrap();
        assert_eq!(l.try_admit(a).unwrap_err(), Refusal::PerIpLimit);
        let _p3 = l.try_admit(b).unwrap();
        assert_eq!(l.try_admit(b).unwrap_err(), Refusal::ConnectionLimit);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.try_admit(a).unwrap();
        // IPv6 hosts of one /64 share a slot count; a v4-mapped address counts as its v4.
        let l = ConnLimiter::new(10, 1);
        let _x = l.try_admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            l.try_admit("2001:db8::2".parse().unwrap()).unwrap_err(),
            Refusal::PerIpLimit
        );
        assert!(l.try_admit("2001:db8:0:1::2".parse().unwrap()).is_ok());
        let _y = l.try_admit(a).unwrap();
        assert_eq!(
            l.try_admit("::ffff:10.0.0.1".parse().unwrap()).unwrap_err(),
            Refusal::PerIpLimit
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_gets_a_write_timeout() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut d = Deadlines::new(a, Duration::from_secs(2));
        // Fills the pipe; then nothing is read for 2 s.
        let err = d.write_all(&[0u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        // A reader that keeps up is never cut off, however long the transfer takes.
        let (a, mut b2) = tokio::io::duplex(1024);
        let mut d = Deadlines::new(a, Duration::from_secs(2));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                got += b2.read(&mut buf).await.unwrap();
            }
        });
        d.write_all(&[0u8; 64 * 1024]).await.unwrap();
        reader.await.unwrap();
        let _ = b.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn read_deadline() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut d = Deadlines::new(a, Duration::from_secs(2));
        d.set_read_deadline(Some(Instant::now() + Duration::from_secs(1)));
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(d.read(&mut buf).await.unwrap(), 1);
        let err = d.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        d.set_read_deadline(None);
        b.write_all(b"y").await.unwrap();
        assert_eq!(d.read(&mut buf).await.unwrap(), 1);
    }
}
