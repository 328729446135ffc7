//! The edge's cache storage for pingora-cache: finished objects in a moka cache (byte budget,
//! least-recently-used eviction, each object expiring when its lifetime ends), and fills in
//! progress that readers stream from while the origin is still sending.
//!
//! Streaming partial writes are what lets one origin request serve every waiting viewer as soon
//! as the first bytes arrive. A fill that fails partway is marked failed, and every reader of it
//! gets an error (which aborts its response) instead of an end of body: a truncated object
//! never looks complete (pingora issue #932 describes MemCache doing exactly that).

use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::key::CacheHashKey;
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

type Key = u128;

/// What rebuilding a [`CacheMeta`] needs (CacheMeta itself is not `Clone`).
#[derive(Clone)]
struct Meta {
    fresh_until: SystemTime,
    created: SystemTime,
    stale_while_revalidate: u32,
    stale_if_error: u32,
    header: ResponseHeader,
}

impl Meta {
    fn of(m: &CacheMeta) -> Self {
        Meta {
            fresh_until: m.fresh_until(),
            created: m.created(),
            stale_while_revalidate: m.stale_while_revalidate_sec(),
            stale_if_error: m.stale_if_error_sec(),
            header: m.response_header().clone(),
        }
    }

    fn to_cache_meta(&self) -> CacheMeta {
        CacheMeta::new(
            self.fresh_until,
            self.created,
            self.stale_while_revalidate,
            self.stale_if_error,
            self.header.clone(),
        )
    }

    /// Rough bytes of the header, for the byte budget.
    fn weight(&self) -> usize {
        256 + self
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
    }
}

/// A finished object.
struct Done {
    meta: Meta,
    body: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum FillState {
    /// This many chunks are readable; more will come.
    Writing(usize),
    /// All chunks are in.
    Complete(usize),
    /// The fill stopped partway: readers must fail, not end.
    Failed,
}

/// An object being filled from the origin.
struct Fill {
    id: u64,
    meta: Meta,
    chunks: RwLock<Vec<Bytes>>,
    state: watch::Sender<FillState>,
}

/// Bytes-budgeted in-memory storage with streaming partial writes.
pub struct MokaStorage {
    done: moka::sync::Cache<Key, Arc<Done>>,
    filling: Mutex<HashMap<Key, Vec<Arc<Fill>>>>,
    next_id: AtomicU64,
}

/// Expire each object when its lifetime ends (the origin's max-age); pingora would treat it
/// as stale from then on, and live objects are never served stale.
struct UntilStale;

impl moka::Expiry<Key, Arc<Done>> for UntilStale {
    fn expire_after_create(&self, _k: &Key, v: &Arc<Done>, _now: Instant) -> Option<Duration> {
        Some(
            v.meta
                .fresh_until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    fn expire_after_update(
        &self,
        k: &Key,
        v: &Arc<Done>,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, now)
    }
}

fn key_of(k: &impl CacheHashKey) -> Key {
    u128::from_be_bytes(k.combined_bin())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MokaStorage {
    /// Whether `key` has an object, finished or filling. For the cache lock's re-check: it
    /// records no read, so it never runs moka's housekeeping inline.
    pub fn has(&self, key: &CacheKey) -> bool {
        let k = key_of(key);
        lock(&self.filling).get(&k).is_some_and(|v| !v.is_empty()) || self.done.contains_key(&k)
    }

    /// Storage holding at most about `max_bytes` of finished objects.
    pub fn new(max_bytes: u64) -> Self {
        MokaStorage {
            done: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &Key, v: &Arc<Done>| {
                    u32::try_from(v.body.len() + v.meta.weight()).unwrap_or(u32::MAX)
                })
                // Live objects are hot when new: admit everything, evict the least recent.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .expire_after(UntilStale)
                .build(),
            filling: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Finished objects and their weighted size (approximate until moka runs its housekeeping).
    pub fn usage(&self) -> (u64, u64) {
        self.done.run_pending_tasks();
        (self.done.entry_count(), self.done.weighted_size())
    }

    /// Fills in progress.
    pub fn filling(&self) -> usize {
        lock(&self.filling).values().map(Vec::len).sum()
    }

    fn remove_fill(&self, key: Key, id: u64) {
        let mut m = lock(&self.filling);
        if let Some(v) = m.get_mut(&key) {
            v.retain(|f| f.id != id);
            if v.is_empty() {
                m.remove(&key);
            }
        }
    }
}

fn partial_hit(f: &Arc<Fill>) -> (CacheMeta, HitHandler) {
    let hit = PartialHit {
        fill: f.clone(),
        state: f.state.subscribe(),
        read: 0,
    };
    (f.meta.to_cache_meta(), Box::new(hit))
}

#[async_trait]
impl Storage for MokaStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let k = key_of(key);
        // A fill in progress is newer than a finished object of the same key (which can only be
        // an expired one being replaced).
        if let Some(f) = lock(&self.filling).get(&k).and_then(|v| v.last().cloned()) {
            return Ok(Some(partial_hit(&f)));
        }
        Ok(self.done.get(&k).map(|d| {
            let hit = CompleteHit {
                body: d.body.clone(),
                start: 0,
                end: d.body.len(),
                done: false,
            };
            (d.meta.to_cache_meta(), Box::new(hit) as HitHandler)
        }))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(id) = tag.and_then(|t| <[u8; 8]>::try_from(t).ok()) else {
            return self.lookup(key, trace).await;
        };
        let id = u64::from_be_bytes(id);
        let fill = lock(&self.filling)
            .get(&key_of(key))
            .and_then(|v| v.iter().find(|f| f.id == id).cloned());
        Ok(fill.map(|f| partial_hit(&f)))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let k = key_of(key);
        let fill = Arc::new(Fill {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            meta: Meta::of(meta),
            chunks: RwLock::new(Vec::new()),
            state: watch::channel(FillState::Writing(0)).0,
        });
        lock(&self.filling).entry(k).or_default().push(fill.clone());
        Ok(Box::new(Writer {
            storage: self,
            key: k,
            tag: fill.id.to_be_bytes(),
            fill,
            bytes: 0,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let k = key_of(target.key());
        let filling = lock(&self.filling).remove(&k).is_some();
        let done = self.done.remove(&k).is_some();
        Ok(if filling || done {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let k = key_of(key);
        let Some(d) = self.done.get(&k) else {
            return Ok(false);
        };
        self.done.insert(
            k,
            Arc::new(Done {
                meta: Meta::of(meta),
                body: d.body.clone(),
            }),
        );
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Reads a finished object.
struct CompleteHit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.body.len() {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} past the end {}", self.body.len()),
            );
        }
        self.start = start;
        self.end = end.map_or(self.body.len(), |e| e.min(self.body.len()));
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Streams an object while it is being filled.
struct PartialHit {
    fill: Arc<Fill>,
    state: watch::Receiver<FillState>,
    /// Chunks already returned.
    read: usize,
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let state = *self.state.borrow_and_update();
            let available = match state {
                FillState::Failed => {
                    return Error::e_explain(
                        ErrorType::ReadError,
                        "the origin response this object was being filled from failed",
                    )
                }
                FillState::Writing(n) => n,
                FillState::Complete(n) if n == self.read => return Ok(None),
                FillState::Complete(n) => n,
            };
            if available > self.read {
                let chunks = self.fill.chunks.read().unwrap_or_else(|p| p.into_inner());
                let new = &chunks[self.read..available];
                self.read = available;
                return Ok(Some(if new.len() == 1 {
                    new[0].clone()
                } else {
                    let mut v = Vec::with_capacity(new.iter().map(Bytes::len).sum());
                    for c in new {
                        v.extend_from_slice(c);
                    }
                    Bytes::from(v)
                }));
            }
            if self.state.changed().await.is_err() {
                // The writer is gone without saying the body is complete.
                return Error::e_explain(ErrorType::ReadError, "cache fill abandoned");
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Writes one fill; dropping it unfinished marks the fill failed.
struct Writer {
    storage: &'static MokaStorage,
    key: Key,
    tag: [u8; 8],
    fill: Arc<Fill>,
    bytes: usize,
    finished: bool,
}

#[async_trait]
impl HandleMiss for Writer {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        let n = {
            let mut chunks = self.fill.chunks.write().unwrap_or_else(|p| p.into_inner());
            if !data.is_empty() {
                self.bytes += data.len();
                chunks.push(data);
            }
            chunks.len()
        };
        self.fill.state.send_replace(if eof {
            FillState::Complete(n)
        } else {
            FillState::Writing(n)
        });
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        let body = {
            let chunks = self.fill.chunks.read().unwrap_or_else(|p| p.into_inner());
            let mut v = Vec::with_capacity(self.bytes);
            for c in chunks.iter() {
                v.extend_from_slice(c);
            }
            let n = chunks.len();
            self.fill.state.send_replace(FillState::Complete(n));
            Bytes::from(v)
        };
        let size = body.len();
        self.storage.done.insert(
            self.key,
            Arc::new(Done {
                meta: self.fill.meta.clone(),
                body,
            }),
        );
        self.finished = true;
        self.storage.remove_fill(self.key, self.fill.id);
        Ok(MissFinishType::Created(size))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.tag)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.finished {
            self.fill.state.send_replace(FillState::Failed);
            self.storage.remove_fill(self.key, self.fill.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(secs: u64) -> CacheMeta {
        let now = SystemTime::now();
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.insert_header("cache-control", format!("max-age={secs}"))
            .unwrap();
        CacheMeta::new(now + Duration::from_secs(secs), now, 0, 0, h)
    }

    fn storage() -> &'static MokaStorage {
        Box::leak(Box::new(MokaStorage::new(1 << 20)))
    }

    async fn read_all(h: &mut HitHandler) -> Result<Vec<u8>> {
        let mut out = vec![];
        while let Some(b) = h.read_body().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn readers_stream_a_fill_then_hit_the_finished_object() {
        let s = storage();
        let key = CacheKey::new("/live/demo/src/s1.0.m4s", "");
        let trace = pingora::cache::trace::Span::inactive().handle();
        assert!(s.lookup(&key, &trace).await.unwrap().is_none());
        let mut w = s.get_miss_handler(&key, &meta(10), &trace).await.unwrap();
        let (_, mut early) = s.lookup(&key, &trace).await.unwrap().unwrap();
        w.write_body(Bytes::from_static(b"moof"), false)
            .await
            .unwrap();
        assert_eq!(early.read_body().await.unwrap().unwrap(), "moof");
        let reader = tokio::spawn(async move { read_all(&mut early).await });
        w.write_body(Bytes::from_static(b"mdat"), true)
            .await
            .unwrap();
        w.finish().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b"mdat");
        let (m, mut hit) = s.lookup(&key, &trace).await.unwrap().unwrap();
        assert_eq!(m.response_header().status, 200);
        assert_eq!(read_all(&mut hit).await.unwrap(), b"moofmdat");
        assert_eq!(s.filling(), 0);
        assert_eq!(s.usage().0, 1);
    }

    /// pingora issue #932: a fill that fails partway must fail its readers, and must leave
    /// nothing behind that a later request could take for the complete object.
    #[tokio::test]
    async fn a_failed_fill_fails_its_readers_and_leaves_nothing() {
        let s = storage();
        let key = CacheKey::new("/live/demo/src/s2.m4s", "");
        let trace = pingora::cache::trace::Span::inactive().handle();
        let mut w = s.get_miss_handler(&key, &meta(10), &trace).await.unwrap();
        let (_, mut reader) = s.lookup(&key, &trace).await.unwrap().unwrap();
        w.write_body(Bytes::from_static(b"half of it"), false)
            .await
            .unwrap();
        let r = tokio::spawn(async move { read_all(&mut reader).await });
        drop(w); // the origin connection broke
        let err = r
            .await
            .unwrap()
            .expect_err("a truncated body must not end cleanly");
        assert_eq!(*err.etype(), ErrorType::ReadError);
        assert!(s.lookup(&key, &trace).await.unwrap().is_none());
        assert_eq!(s.filling(), 0);
    }

    #[tokio::test]
    async fn objects_expire_with_their_lifetime_and_respect_the_budget() {
        let s = storage();
        let trace = pingora::cache::trace::Span::inactive().handle();
        let key = CacheKey::new("/live/demo/src/index.m3u8", "");
        let m = {
            let now = SystemTime::now();
            let h = ResponseHeader::build(200, None).unwrap();
            CacheMeta::new(now + Duration::from_millis(50), now, 0, 0, h)
        };
        let mut w = s.get_miss_handler(&key, &m, &trace).await.unwrap();
        w.write_body(Bytes::from_static(b"#EXTM3U\n"), true)
            .await
            .unwrap();
        w.finish().await.unwrap();
        assert!(s.lookup(&key, &trace).await.unwrap().is_some());
        // Expiry runs on moka's real clock: wait (bounded) for the object to go.
        let deadline = Instant::now() + Duration::from_secs(2);
        while s.lookup(&key, &trace).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "object outlived its lifetime");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // 64 objects of 64 KB in a 1 MB budget: the oldest are evicted.
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        for i in 0..64 {
            let k = CacheKey::new(format!("/live/demo/src/s{i}.m4s"), "");
            let mut w = s.get_miss_handler(&k, &meta(60), &trace).await.unwrap();
            w.write_body(big.clone(), true).await.unwrap();
            w.finish().await.unwrap();
        }
        let (_, bytes) = s.usage();
        assert!(bytes <= 1 << 20, "{bytes} bytes kept in a 1 MiB budget");
        let newest = CacheKey::new("/live/demo/src/s63.m4s", "");
        assert!(s.lookup(&newest, &trace).await.unwrap().is_some());
        let oldest = CacheKey::new("/live/demo/src/s0.m4s", "");
        assert!(s.lookup(&oldest, &trace).await.unwrap().is_none());
    }
}
