//! The Pingora `ProxyHttp` of the edge cache. Hooks stay thin: what to do is decided in
//! `edge::policy`; this file wires those decisions into Pingora's phases, picks the core, and
//! counts.
//!
//! Coalescing: every playback GET goes through pingora-cache with a cache lock, so concurrent
//! misses for one key wait on one origin request. Every response the origin gives a lifetime to
//! (including 400/404/503, briefly) is stored, because an uncacheable answer would release all
//! waiters to the origin at once.

use super::policy::{self, Playback, Refused};
use super::storage::MokaStorage;
use super::web;
use crate::telemetry::EdgeMetrics;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::lock::{
    CacheKeyLock, CacheKeyLockImpl, CacheLock, LockStatus, Locked, WritePermit,
};
use pingora::cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, NoCacheReason, RespCacheable,
};
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Which cores are reachable now (ids), from the relay's links.
pub type Health = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// pingora-cache's lock, with one more look at the storage once a request holds the write lock.
/// A request looks the key up, misses, and only then takes the lock; if the writer of that key
/// finished in between (released its lock after storing the object), the late request would
/// become a second writer and fetch the object again. Holding the lock, it now sees the object
/// and reads it instead: one origin request per object, however the requests interleave.
struct CheckedLock {
    inner: CacheLock,
    storage: &'static MokaStorage,
    age: Duration,
}

impl CacheKeyLock for CheckedLock {
    fn lock(&self, key: &CacheKey, stale_writer: bool) -> Locked {
        match self.inner.lock(key, stale_writer) {
            Locked::Write(p) if !stale_writer && self.storage.has(key) => {
                self.inner.release(key, p, LockStatus::Done);
                // A read lock that is already released: the caller looks up again and hits.
                let (mut w, stub) = WritePermit::new(self.age, false, http::Extensions::new());
                let r = stub.read_lock();
                w.unlock(LockStatus::Done);
                Locked::Read(r)
            }
            other => other,
        }
    }

    fn release(&self, key: &CacheKey, permit: WritePermit, reason: LockStatus) {
        self.inner.release(key, permit, reason)
    }
}

/// Settings of the proxy.
pub struct ProxySettings {
    /// Core id → origin address.
    pub cores: Vec<(String, SocketAddr)>,
    /// Longest wait for an origin response to begin (longer than the origin's longest hold).
    pub upstream_timeout: Duration,
    /// Viewer write timeout (slow readers).
    pub write_timeout: Duration,
    /// Keep-alive idle timeout for viewer connections.
    pub idle_timeout: Duration,
    /// Serve the player page at `/`.
    pub player: bool,
    /// Which streams need a signed URL.
    pub access: Arc<super::access::Access>,
}

/// The edge's caching proxy.
pub struct EdgeProxy {
    storage: &'static MokaStorage,
    lock: &'static CacheKeyLockImpl,
    settings: ProxySettings,
    health: Health,
    metrics: EdgeMetrics,
    directory: web::Directory,
}

/// Per-request state.
pub struct Ctx {
    playback: Option<Playback>,
    start: Instant,
    upstream_status: Option<u16>,
    held: bool,
}

impl EdgeProxy {
    /// A proxy over `storage`, with a cache lock whose timeouts exceed the longest origin hold.
    pub fn new(
        storage: &'static MokaStorage,
        settings: ProxySettings,
        health: Health,
        metrics: EdgeMetrics,
    ) -> Self {
        // A writer holding the lock longer than this is presumed stuck; waiters then compete
        // again. It must outlast a blocking reload the origin holds (3 × target duration).
        let age = settings.upstream_timeout + Duration::from_secs(1);
        let lock: &'static CacheKeyLockImpl = Box::leak(Box::new(CheckedLock {
            inner: CacheLock::new(age),
            storage,
            age,
        }));
        EdgeProxy {
            storage,
            lock,
            directory: {
                let access = settings.access.clone();
                web::Directory::new(
                    settings.cores.clone(),
                    health.clone(),
                    Arc::new(move |name: &str| access.mode(name) == super::access::Mode::Public),
                )
            },
            settings,
            health,
            metrics,
        }
    }

    /// The origin for `stream`: rendezvous hashing over the reachable cores (the same choice the
    /// relay makes for ingest), or over all of them when none is known to be up.
    fn origin_for(&self, stream: &str) -> Option<SocketAddr> {
        let up = (self.health)();
        let ids: Vec<&str> = if up.is_empty() {
            self.settings
                .cores
                .iter()
                .map(|(id, _)| id.as_str())
                .collect()
        } else {
            up.iter().map(String::as_str).collect()
        };
        let id = crate::fleet::pick(stream, ids)?;
        self.settings
            .cores
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, a)| *a)
    }

    /// Counts a request the edge answered itself (page, stream list).
    fn count_local(&self) {
        self.metrics
            .http_requests
            .with_label_values(&["other", "uncached"])
            .inc();
    }

    fn kind_label(ctx: &Ctx) -> &'static str {
        ctx.playback.as_ref().map_or("other", |p| p.kind.label())
    }
}

async fn respond(session: &mut Session, status: u16, msg: &str) -> Result<()> {
    // Refusals are answered by the edge itself and may be cached briefly downstream.
    let body = Bytes::from(format!("{msg}\n"));
    send(session, status, "text/plain", "max-age=1", body).await
}

/// Writes a whole response the edge makes itself (no body for HEAD).
async fn send(
    session: &mut Session,
    status: u16,
    content_type: &str,
    cache_control: &str,
    body: Bytes,
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(5))?;
    h.insert_header("content-type", content_type)?;
    h.insert_header("cache-control", cache_control)?;
    h.insert_header("access-control-allow-origin", "*")?;
    h.insert_header("content-length", body.len())?;
    if session.req_header().method == http::Method::HEAD {
        return session.write_response_header(Box::new(h), true).await;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            playback: None,
            start: Instant::now(),
            upstream_status: None,
            held: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.start = Instant::now();
        // Bound the idle time of connections the client keeps alive (Pingora's default is forever).
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.settings.idle_timeout.as_secs().max(1)));
        }
        session
            .downstream_session
            .set_write_timeout(Some(self.settings.write_timeout));
        let req = session.req_header();
        if req.method == http::Method::OPTIONS {
            let mut h = ResponseHeader::build(204, Some(4))?;
            h.insert_header("access-control-allow-origin", "*")?;
            h.insert_header("access-control-allow-methods", "GET, HEAD, OPTIONS")?;
            h.insert_header("access-control-max-age", "86400")?;
            session.write_response_header(Box::new(h), true).await?;
            return Ok(true);
        }
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            respond(session, 405, "method not allowed").await?;
            return Ok(true);
        }
        // The edge serves only bodiless requests. A body (a length, chunks, an HTTP/2 stream
        // left open) would be drained or awaited with no deadline: refuse it and close.
        let h1_body = req.headers.contains_key("transfer-encoding")
            || req
                .headers
                .get("content-length")
                .is_some_and(|v| v.as_bytes() != b"0");
        if h1_body || (session.is_http2() && !session.is_body_done()) {
            self.metrics
                .edge_refused
                .with_label_values(&["request_body"])
                .inc();
            session.set_keepalive(None);
            respond(session, 400, "request bodies are not accepted").await?;
            return Ok(true);
        }
        let req = session.req_header();
        // A signed URL's token leads the path: split it off before anything else looks at
        // the path, so it is part of neither the cache key nor the origin request.
        let (token, path) = super::access::split_path(req.uri.path());
        let (token, path) = (token.map(str::to_string), path.to_string());
        let query = req.uri.query().map(str::to_string);
        if path == "/live/streams.json" {
            self.count_local();
            let body = self.directory.streams().await;
            send(session, 200, "application/json", "max-age=1", body).await?;
            return Ok(true);
        }
        if self.settings.player {
            if let Some(a) = web::asset(&path) {
                self.count_local();
                send(session, 200, a.content_type, a.cache_control, a.body).await?;
                return Ok(true);
            }
        }
        match policy::classify(&path, query.as_deref()) {
            Ok(p) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if let Err(e) = self
                    .settings
                    .access
                    .check(&p.stream, &path, token.as_deref(), now)
                {
                    self.metrics
                        .edge_refused
                        .with_label_values(&[e.label()])
                        .inc();
                    let body = Bytes::from(format!("{e}\n"));
                    // Not cacheable anywhere: the same URL with a good token is served.
                    send(session, 403, "text/plain", "no-store", body).await?;
                    return Ok(true);
                }
                ctx.playback = Some(p);
                Ok(false)
            }
            Err(e) => {
                self.metrics
                    .http_requests
                    .with_label_values(&["other", "refused"])
                    .inc();
                let status = match e {
                    Refused::NotFound => 404,
                    Refused::BadRequest(_) => 400,
                };
                respond(session, status, &e.to_string()).await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // HEAD shares the GET's key and lock (pingora fetches a HEAD miss with a GET, so the
        // stored object is whole): one origin request per object whatever the method.
        let m = &session.req_header().method;
        if ctx.playback.is_some() && (*m == http::Method::GET || *m == http::Method::HEAD) {
            let mut o = CacheOptionOverrides::default();
            // Waiters wait as long as the writer may (the origin's hold plus margin).
            o.wait_timeout = Some(self.settings.upstream_timeout + Duration::from_secs(2));
            session
                .cache
                .enable(self.storage, None, None, Some(self.lock), Some(o));
        }
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let key = ctx
            .playback
            .as_ref()
            .map(|p| p.key.clone())
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "cache without a request"))?;
        Ok(CacheKey::new(key, ""))
    }

    fn response_cache_filter(
        &self,
        _session: &Session,
        resp: &ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let cc = resp
            .headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok());
        Ok(match policy::lifetime(resp.status.as_u16(), cc) {
            Some(ttl) => {
                let now = SystemTime::now();
                // Never served stale: a live playlist must not outlive its lifetime.
                RespCacheable::Cacheable(CacheMeta::new(now + ttl, now, 0, 0, resp.clone()))
            }
            None => RespCacheable::Uncacheable(NoCacheReason::OriginNotCache),
        })
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
        _error: Option<&Error>,
    ) -> bool {
        false
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let stream = ctx.playback.as_ref().map_or("", |p| p.stream.as_str());
        let Some(addr) = self.origin_for(stream) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no core configured");
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(1));
        peer.options.total_connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(self.settings.upstream_timeout);
        peer.options.write_timeout = Some(Duration::from_secs(5));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // One request per object: the canonical key is also the URI the origin sees.
        if let Some(p) = &ctx.playback {
            let uri: http::Uri = p
                .key
                .parse()
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad canonical URI"))?;
            upstream_request.set_uri(uri);
        }
        for h in [
            "range",
            "if-range",
            "if-none-match",
            "if-modified-since",
            "cookie",
            "authorization",
        ] {
            upstream_request.remove_header(h);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        self.metrics
            .http_upstream_requests
            .with_label_values(&[Self::kind_label(ctx), &status.to_string()])
            .inc();
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body {
            self.metrics
                .http_upstream_bytes
                .with_label_values(&[Self::kind_label(ctx)])
                .inc_by(b.len() as u64);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(p) = &ctx.playback {
            if p.kind.may_block() && !ctx.held {
                ctx.held = true;
                self.metrics
                    .http_hold
                    .with_label_values(&[p.kind.label()])
                    .observe(ctx.start.elapsed().as_secs_f64());
            }
        }
        let outcome = cache_outcome(session);
        upstream_response.insert_header("livepop-cache", outcome)?;
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        // A HEAD answered from an uncacheable GET: HTTP/2 would otherwise send its body.
        if session.req_header().method == http::Method::HEAD {
            *body = None;
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.esource() {
            ErrorSource::Downstream => 0, // the viewer is gone or misbehaved
            _ => match e.etype() {
                ErrorType::HTTPStatus(c) if *c >= 400 => *c,
                _ => 503,
            },
        };
        if code > 0 {
            tracing::debug!(error = %e, kind = Self::kind_label(ctx), "origin unavailable");
            let msg = format!("origin unavailable: {}", e.etype().as_str());
            let mut h = match ResponseHeader::build(code, Some(4)) {
                Ok(h) => h,
                Err(_) => {
                    return FailToProxy {
                        error_code: code,
                        can_reuse_downstream: false,
                    }
                }
            };
            let body = Bytes::from(format!("{msg}\n"));
            let _ = h.insert_header("content-type", "text/plain");
            let _ = h.insert_header("cache-control", "no-store");
            let _ = h.insert_header("access-control-allow-origin", "*");
            let _ = h.insert_header("content-length", body.len());
            let head = session.req_header().method == http::Method::HEAD;
            if session
                .write_response_header(Box::new(h), head)
                .await
                .is_ok()
                && !head
            {
                let _ = session.write_response_body(Some(body), true).await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // The viewer stopped reading (the edge writes nothing else with a timeout of its own).
        if e.is_some_and(|e| e.etype() == &ErrorType::WriteTimedout) {
            self.metrics
                .edge_refused
                .with_label_values(&["write_timeout"])
                .inc();
        }
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        self.metrics
            .http_responses
            .with_label_values(&[Self::kind_label(ctx), &status.to_string()])
            .inc();
        if let Some(p) = &ctx.playback {
            let outcome = cache_outcome(session);
            self.metrics
                .http_requests
                .with_label_values(&[p.kind.label(), outcome])
                .inc();
        }
    }
}

/// How the cache answered: from the cache (`hit`), after waiting on another request's fill
/// (`coalesced`), from the origin (`miss`), or not through the cache at all (`uncached`).
fn cache_outcome(session: &Session) -> &'static str {
    let waited = session.cache.lock_duration().is_some();
    match session.cache.phase() {
        CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating if waited => "coalesced",
        CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating => "hit",
        CachePhase::Miss | CachePhase::Expired | CachePhase::Revalidated => "miss",
        _ => "uncached",
    }
}
