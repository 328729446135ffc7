//! What the edge cache does with a request and a response: object kinds, the cache key, the
//! request sent to the origin, and how long a response may be kept. Pure functions; the proxy
//! hooks in `edge::proxy` only call them.
//!
//! Rules (shared/LLHLS.md, appendix B.1 of draft-pantos-hls-rfc8216bis): the key keeps
//! `_HLS_msn`, `_HLS_part`, `_HLS_skip` in canonical order and drops every other query
//! parameter; lifetimes come from the origin's Cache-Control (the origin knows the target
//! duration); errors are kept as briefly as the origin says, so that a burst of viewers waiting
//! on a failing request still makes one origin request.

use crate::hls::{Directives, ObjectName};
use std::time::Duration;

/// What a playback request asks for; also the `kind` label of the edge metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `master.m3u8`.
    Master,
    /// A media playlist, `blocking` when it carries `_HLS_msn`.
    Playlist {
        /// Held by the origin until the named segment or part exists.
        blocking: bool,
    },
    /// A part, `sM.P.m4s` (blocking while it is the preload hint).
    Part,
    /// A whole segment, `sM.m4s`.
    Segment,
    /// An init segment, `init-*.mp4`.
    Init,
}

impl Kind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Master => "master",
            Kind::Playlist { .. } => "playlist",
            Kind::Part => "part",
            Kind::Segment => "segment",
            Kind::Init => "init",
        }
    }

    /// Requests the origin may hold open (blocking reloads, preload-hinted parts).
    pub fn may_block(self) -> bool {
        matches!(self, Kind::Playlist { blocking: true } | Kind::Part)
    }

    /// Every label, for pre-registering metrics.
    pub const LABELS: [&'static str; 5] = ["master", "playlist", "part", "segment", "init"];
}

/// A playback request the edge accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playback {
    /// Stream name (the rendezvous hash input).
    pub stream: String,
    /// Object kind.
    pub kind: Kind,
    /// Path and canonical query: both the cache key and the URI sent to the origin, so requests
    /// that differ only in other query parameters share one fetch.
    pub key: String,
}

/// Why a request is refused at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a playback path.
    #[error("not found")]
    NotFound,
    /// Malformed LL-HLS directives (the origin would answer 400 too).
    #[error("{0}")]
    BadRequest(String),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Classifies `path` (and `query`) of a GET or HEAD request.
pub fn classify(path: &str, query: Option<&str>) -> Result<Playback, Refused> {
    let parts: Vec<&str> = path
        .strip_prefix("/live/")
        .ok_or(Refused::NotFound)?
        .split('/')
        .collect();
    if !parts.iter().all(|p| valid_segment(p)) {
        return Err(Refused::NotFound);
    }
    let (stream, kind) = match parts.as_slice() {
        [stream, "master.m3u8"] => (*stream, Kind::Master),
        [stream, _rendition, file] => {
            // Only the names the origin gives, in canonical form: one object, one key.
            let kind = match ObjectName::parse(file).ok_or(Refused::NotFound)? {
                ObjectName::Playlist => {
                    let d =
                        Directives::parse(query).map_err(|e| Refused::BadRequest(e.to_string()))?;
                    Kind::Playlist {
                        blocking: d.msn.is_some(),
                    }
                }
                ObjectName::Init(_) => Kind::Init,
                ObjectName::Segment(_) => Kind::Segment,
                ObjectName::Part(..) => Kind::Part,
            };
            (*stream, kind)
        }
        _ => return Err(Refused::NotFound),
    };
    let key = match kind {
        Kind::Playlist { .. } => {
            let q = Directives::parse(query)
                .map_err(|e| Refused::BadRequest(e.to_string()))?
                .cache_query();
            if q.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{q}")
            }
        }
        _ => path.to_string(),
    };
    Ok(Playback {
        stream: stream.to_string(),
        kind,
        key,
    })
}

/// How long a response with this status and Cache-Control may be served from the cache, or
/// None if it must not be stored. Statuses a player can act on are kept (errors only as briefly
/// as the origin allows); anything unexpected from the origin is not.
pub fn lifetime(status: u16, cache_control: Option<&str>) -> Option<Duration> {
    if !matches!(status, 200 | 400 | 404 | 410 | 503) {
        return None;
    }
    let cc = cache_control?;
    let mut max_age = None;
    let mut s_maxage = None;
    for directive in cc.split(',') {
        let d = directive.trim().to_ascii_lowercase();
        if d == "no-store" || d == "no-cache" || d == "private" {
            return None;
        }
        if let Some(v) = d.strip_prefix("s-maxage=") {
            s_maxage = v.trim_matches('"').parse::<u64>().ok();
        } else if let Some(v) = d.strip_prefix("max-age=") {
            max_age = v.trim_matches('"').parse::<u64>().ok();
        }
    }
    let secs = s_maxage.or(max_age)?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let k = |p: &str, q: Option<&str>| classify(p, q).map(|x| x.kind);
        assert_eq!(k("/live/demo/master.m3u8", None), Ok(Kind::Master));
        assert_eq!(
            k("/live/demo/src/index.m3u8", None),
            Ok(Kind::Playlist { blocking: false })
        );
        assert_eq!(
            k("/live/demo/src/index.m3u8", Some("_HLS_msn=4")),
            Ok(Kind::Playlist { blocking: true })
        );
        assert_eq!(k("/live/demo/src/s12.3.m4s", None), Ok(Kind::Part));
        assert_eq!(k("/live/demo/src/s12.m4s", None), Ok(Kind::Segment));
        assert_eq!(k("/live/demo/src/init-77.mp4", None), Ok(Kind::Init));
        for bad in [
            "/",
            "/live/demo",
            "/live/demo/src/s1.2.3.m4s",
            "/live/demo/src/sx.m4s",
            "/live/../etc/passwd",
            "/live/demo/src/..",
            "/live/demo/src/a.txt",
            "/other/demo/master.m3u8",
            "/live/demo//index.m3u8",
            "/live/demo/src/s012.m4s",
            "/live/demo/src/s12.03.m4s",
            "/live/demo/src/init-077.mp4",
            "/live/demo/src/init.mp4",
        ] {
            assert_eq!(k(bad, None), Err(Refused::NotFound), "{bad}");
        }
        assert!(matches!(
            k("/live/demo/src/index.m3u8", Some("_HLS_part=1")),
            Err(Refused::BadRequest(_))
        ));
    }

    /// Appendix B.1 / LLHLS.md caching: `_HLS_msn`, `_HLS_part`, `_HLS_skip` stay in the key in
    /// canonical order; every other query parameter is dropped.
    #[test]
    fn cache_key_keeps_only_hls_directives_in_canonical_order() {
        let key = |p: &str, q: &str| classify(p, Some(q)).unwrap().key;
        let a = key(
            "/live/demo/src/index.m3u8",
            "token=abc&_HLS_part=2&_HLS_msn=9&_HLS_skip=YES",
        );
        assert_eq!(
            a,
            "/live/demo/src/index.m3u8?_HLS_msn=9&_HLS_part=2&_HLS_skip=YES"
        );
        assert_eq!(
            a,
            key(
                "/live/demo/src/index.m3u8",
                "_HLS_msn=9&_HLS_part=2&_HLS_skip=YES&cb=123"
            )
        );
        assert_eq!(
            key("/live/demo/src/index.m3u8", "x=1"),
            "/live/demo/src/index.m3u8"
        );
        assert_eq!(
            key("/live/demo/src/s5.1.m4s", "token=abc"),
            "/live/demo/src/s5.1.m4s"
        );
        assert_eq!(classify("/live/x/master.m3u8", None).unwrap().stream, "x");
    }

    #[test]
    fn lifetimes_follow_the_origin() {
        assert_eq!(
            lifetime(200, Some("max-age=12")),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            lifetime(200, Some("public, max-age=1, s-maxage=3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            lifetime(503, Some("max-age=1")),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            lifetime(404, Some("max-age=1")),
            Some(Duration::from_secs(1))
        );
        assert_eq!(lifetime(200, Some("no-store")), None);
        assert_eq!(lifetime(200, Some("max-age=0")), None);
        assert_eq!(lifetime(200, None), None);
        assert_eq!(lifetime(502, Some("max-age=5")), None);
        assert_eq!(lifetime(206, Some("max-age=5")), None);
    }
}
