//! What the edge answers itself, outside the cache: the player page (web/, compiled in) and
//! the fleet's stream list.
//!
//! The page's files are ours (web/index.html, player.js, player.css); hls.js comes from npm
//! (web/node_modules, installed by the run and test commands) and is compiled in by build.rs
//! when present. Without it the page says how to install it instead of failing silently.
//!
//! `/live/streams.json` merges every reachable core's list (a stream lives on the core the
//! rendezvous hash picks, so no single core knows them all). One merge per second at most,
//! however many viewers ask: concurrent requests wait on the one in flight.

use super::proxy::Health;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// hls.js from web/node_modules, or empty when npm had not installed it at build time.
const HLS_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hls.min.js"));

/// A file the edge serves itself.
pub struct Asset {
    /// Content-Type.
    pub content_type: &'static str,
    /// Cache-Control.
    pub cache_control: &'static str,
    /// The body.
    pub body: Bytes,
}

/// The player page's files, by request path.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, cache_control, body): (_, _, &'static [u8]) = match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            "no-cache",
            include_bytes!("../../web/index.html"),
        ),
        "/player.js" => (
            "text/javascript; charset=utf-8",
            "no-cache",
            include_bytes!("../../web/player.js"),
        ),
        "/player.css" => (
            "text/css; charset=utf-8",
            "no-cache",
            include_bytes!("../../web/player.css"),
        ),
        "/vendor/hls.min.js" if !HLS_JS.is_empty() => {
            ("text/javascript; charset=utf-8", "max-age=3600", HLS_JS)
        }
        _ => return None,
    };
    Some(Asset {
        content_type,
        cache_control,
        body: Bytes::from_static(body),
    })
}

/// Whether hls.js was compiled in (the page cannot play without it).
pub fn has_hls_js() -> bool {
    !HLS_JS.is_empty()
}

/// The fleet's stream list, merged from the cores' origins.
pub struct Directory {
    cores: Vec<(String, SocketAddr)>,
    health: Health,
    /// Whether a stream is listed (signed streams are not: their names are for their viewers).
    listed: Listed,
    client: Client<HttpConnector, Empty<Bytes>>,
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

/// Decides which stream names the list shows.
pub type Listed = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How long a merged list is reused.
const FRESH: Duration = Duration::from_secs(1);
/// How long one core may take to answer.
const CORE_TIMEOUT: Duration = Duration::from_secs(1);

impl Directory {
    /// A directory over the cores (id, origin address); `health` says which are reachable.
    pub fn new(cores: Vec<(String, SocketAddr)>, health: Health, listed: Listed) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(CORE_TIMEOUT));
        Directory {
            cores,
            health,
            listed,
            client: Client::builder(TokioExecutor::new()).build(conn),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// `{"streams": [...]}`: every stream of every reachable core, sorted by name.
    pub async fn streams(&self) -> Bytes {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = &*last {
            if at.elapsed() < FRESH {
                return body.clone();
            }
        }
        let up = (self.health)();
        let asked: Vec<SocketAddr> = self
            .cores
            .iter()
            .filter(|(id, _)| up.is_empty() || up.contains(id))
            .map(|(_, a)| *a)
            .collect();
        let lists = futures_util::future::join_all(asked.iter().map(|a| self.fetch(*a))).await;
        let mut merged = merge(lists.into_iter().flatten());
        if let Some(list) = merged["streams"].as_array_mut() {
            list.retain(|s| s["name"].as_str().is_some_and(|n| (self.listed)(n)));
        }
        let body = Bytes::from(merged.to_string());
        *last = Some((Instant::now(), body.clone()));
        body
    }

    async fn fetch(&self, origin: SocketAddr) -> Option<serde_json::Value> {
        let uri: http::Uri = format!("http://{origin}/live/streams.json").parse().ok()?;
        let got = tokio::time::timeout(CORE_TIMEOUT, async {
            let resp = self.client.get(uri).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
                .collect()
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).ok()
        })
        .await;
        match got {
            Ok(Some(v)) => Some(v),
            _ => {
                tracing::debug!(%origin, "core did not list its streams");
                None
            }
        }
    }
}

/// Merges cores' lists: one entry per name (a live one wins over an ended one, which a core
/// keeps for a while after the publisher left), sorted by name.
fn merge(lists: impl Iterator<Item = serde_json::Value>) -> serde_json::Value {
    let mut by_name: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    for list in lists {
        let Some(streams) = list.get("streams").and_then(|s| s.as_array()) else {
            continue;
        };
        for s in streams {
            let Some(name) = s.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let live = s.get("live").and_then(|l| l.as_bool()).unwrap_or(false);
            let keep = by_name
                .get(name)
                .is_none_or(|old| !old["live"].as_bool().unwrap_or(false) && live);
            if keep {
                by_name.insert(name.to_string(), s.clone());
            }
        }
    }
    serde_json::json!({ "streams": by_name.into_values().collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_keeps_one_entry_per_name_preferring_live() {
        let a = json!({"streams": [{"name": "b", "live": false}, {"name": "a", "live": true}]});
        let b = json!({"streams": [{"name": "b", "live": true}, {"name": "a", "live": false}]});
        let junk = json!({"nope": 1});
        let m = merge([a, junk, b].into_iter());
        assert_eq!(
            m,
            json!({"streams": [{"name": "a", "live": true}, {"name": "b", "live": true}]})
        );
    }

    #[test]
    fn the_page_and_its_files_are_served() {
        for p in ["/", "/index.html", "/player.js", "/player.css"] {
            let a = asset(p).unwrap_or_else(|| panic!("{p} missing"));
            assert!(!a.body.is_empty());
        }
        assert!(asset("/live/demo/master.m3u8").is_none());
        assert!(asset("/../Cargo.toml").is_none());
        // The test command installs hls.js before building (deploy/test.sh): a build without it
        // serves a page that cannot play, which must fail here, not pass either way.
        assert!(
            has_hls_js(),
            "hls.js was not compiled in: run `npm ci --prefix web`"
        );
        let hls = asset("/vendor/hls.min.js").expect("hls.js served");
        assert_eq!(hls.content_type, "text/javascript; charset=utf-8");
        assert!(
            hls.body.len() > 100_000,
            "hls.min.js is {} bytes",
            hls.body.len()
        );
        assert!(String::from_utf8_lossy(&hls.body).contains("Hls"));
        // The page loads the vendored copy (no third-party CDN).
        let page = asset("/").unwrap();
        assert!(String::from_utf8_lossy(&page.body).contains("/vendor/hls.min.js"));
    }
}
