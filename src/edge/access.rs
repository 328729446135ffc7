//! Signed playback URLs: which streams need a token, and checking one. Pure functions; the
//! proxy calls `Access::check` before any cache lookup, so a refused request never reaches the
//! cache or a core.
//!
//! In the spirit of CloudFront signed URLs and Akamai EdgeAuth tokens: a token names a key id,
//! an expiry and a path prefix, and carries HMAC-SHA256 over them with that key. Keys are
//! listed in the config by id; rotating means adding a key, signing with it, and removing the
//! old one once its URLs have expired.
//!
//! The token travels as the first path segments, `/t/<token>/live/<stream>/...`, not as a query
//! parameter: playlists name every other object by a relative URI, so a player resolves them
//! under the same `/t/<token>/` and carries the token to every request by itself, without
//! cookies or playlist rewriting. The edge strips it before anything else: it is never part of
//! the cache key nor sent to the origin.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

/// First segment of a signed path.
const TOKEN_SEGMENT: &str = "/t/";
/// Domain separation of what is signed.
const SIGNED_CONTEXT: &str = "livepop-url-v1";
/// Longest token accepted (a long prefix and key id fit in a fraction of this).
const MAX_TOKEN: usize = 512;

/// Whether a stream's playback needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Anyone may play it.
    #[default]
    Public,
    /// Only with a valid signed URL.
    Signed,
}

/// Why a request was refused (403), also the `edge_refused` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A signed stream requested without a token.
    #[error("this stream needs a signed URL")]
    Missing,
    /// Not a token.
    #[error("malformed token")]
    Malformed,
    /// A key id this edge does not hold (unknown, or rotated out).
    #[error("unknown signing key")]
    UnknownKey,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Valid for another path.
    #[error("token not valid for this path")]
    WrongPrefix,
    /// The signature does not match (tampered, or signed with another key).
    #[error("invalid token signature")]
    BadSignature,
}

impl TokenError {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Malformed => "token_malformed",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::Expired => "token_expired",
            TokenError::WrongPrefix => "token_prefix",
            TokenError::BadSignature => "token_signature",
        }
    }
}

/// A token's fields, before its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Key id.
    pub key_id: String,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Path prefix the token is valid for (starts with `/live/`, ends with `/`).
    pub prefix: String,
}

/// A key id: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A prefix a token may carry: an absolute path under `/live/` ending with `/`, no `..`.
pub fn valid_prefix(p: &str) -> bool {
    p.starts_with("/live/")
        && p.ends_with('/')
        && p.len() <= 256
        && !p.split('/').any(|s| s == ".." || s == ".")
        && p.bytes().all(|b| b.is_ascii_graphic())
}

fn message(c: &Claims) -> String {
    format!(
        "{SIGNED_CONTEXT}\n{}\n{}\n{}",
        c.key_id, c.expires, c.prefix
    )
}

/// A token for `claims`, signed with `secret`.
pub fn sign(claims: &Claims, secret: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, message(claims).as_bytes());
    format!(
        "{}.{}.{}.{}",
        claims.key_id,
        claims.expires,
        URL_SAFE_NO_PAD.encode(claims.prefix.as_bytes()),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

/// Splits `/t/<token>/rest` into the token and `/rest`; other paths have no token.
pub fn split_path(path: &str) -> (Option<&str>, &str) {
    let Some(after) = path.strip_prefix(TOKEN_SEGMENT) else {
        return (None, path);
    };
    match after.find('/') {
        Some(i) => (Some(&after[..i]), &after[i..]),
        None => (Some(after), "/"),
    }
}

fn parse(token: &str) -> Result<(Claims, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN {
        return Err(TokenError::Malformed);
    }
    let mut it = token.split('.');
    let (Some(kid), Some(exp), Some(prefix), Some(sig), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Err(TokenError::Malformed);
    };
    // Canonical decimal only: one expiry, one spelling (no leading zeros or signs).
    let digits = !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit());
    if !valid_key_id(kid) || !digits || (exp.len() > 1 && exp.starts_with('0')) {
        return Err(TokenError::Malformed);
    }
    let expires = exp.parse::<u64>().map_err(|_| TokenError::Malformed)?;
    let prefix = URL_SAFE_NO_PAD
        .decode(prefix)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|p| valid_prefix(p))
        .ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    Ok((
        Claims {
            key_id: kid.to_string(),
            expires,
            prefix,
        },
        sig,
    ))
}

/// Which streams need a token, and the keys that sign them.
pub struct Access {
    default: Mode,
    signed: Vec<String>,
    public: Vec<String>,
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Access")
            .field("default", &self.default)
            .field("signed", &self.signed)
            .field("public", &self.public)
            .field(
                "key_ids",
                &self.keys.iter().map(|k| &k.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// `pattern` is a stream name, or a prefix ending in `*`.
fn matches(pattern: &str, stream: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => stream.starts_with(prefix),
        None => pattern == stream,
    }
}

impl Access {
    /// From the config: the default mode, the exceptions, and (id, secret) keys.
    pub fn new(
        default: Mode,
        signed: Vec<String>,
        public: Vec<String>,
        keys: &[(String, Vec<u8>)],
    ) -> Self {
        Access {
            default,
            signed,
            public,
            keys: keys
                .iter()
                .map(|(id, secret)| (id.clone(), hmac::Key::new(hmac::HMAC_SHA256, secret)))
                .collect(),
        }
    }

    /// Everything public, no keys.
    pub fn public() -> Self {
        Access::new(Mode::Public, vec![], vec![], &[])
    }

    /// The mode of `stream`: an exact or prefix match in `public` or `signed` (the longer
    /// pattern wins; `public` on a tie), else the default.
    pub fn mode(&self, stream: &str) -> Mode {
        let best = |list: &[String]| {
            list.iter()
                .filter(|p| matches(p, stream))
                .map(|p| p.len())
                .max()
        };
        match (best(&self.public), best(&self.signed)) {
            (Some(p), Some(s)) if s > p => Mode::Signed,
            (Some(_), _) => Mode::Public,
            (None, Some(_)) => Mode::Signed,
            (None, None) => self.default,
        }
    }

    /// May `path` (token already split off) of `stream` be served, at Unix time `now`?
    pub fn check(
        &self,
        stream: &str,
        path: &str,
        token: Option<&str>,
        now: u64,
    ) -> Result<(), TokenError> {
        if self.mode(stream) == Mode::Public {
            return Ok(());
        }
        let (claims, sig) = parse(token.ok_or(TokenError::Missing)?)?;
        let key = self
            .keys
            .iter()
            .find(|(id, _)| *id == claims.key_id)
            .map(|(_, k)| k)
            .ok_or(TokenError::UnknownKey)?;
        // The signature first: nothing a forger chose is reported back as if it were valid.
        hmac::verify(key, message(&claims).as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= claims.expires {
            return Err(TokenError::Expired);
        }
        if !path.starts_with(&claims.prefix) {
            return Err(TokenError::WrongPrefix);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(kid: &str, expires: u64, prefix: &str) -> Claims {
        Claims {
            key_id: kid.into(),
            expires,
            prefix: prefix.into(),
        }
    }

    fn access() -> Access {
        Access::new(
            Mode::Public,
            vec!["paid".into(), "vip-*".into()],
            vec!["vip-trailer".into()],
            &[
                ("k1".into(), b"secret-one".to_vec()),
                ("k2".into(), b"secret-two".to_vec()),
            ],
        )
    }

    #[test]
    fn modes_by_name_and_prefix() {
        let a = access();
        assert_eq!(a.mode("demo"), Mode::Public);
        assert_eq!(a.mode("paid"), Mode::Signed);
        assert_eq!(a.mode("paid2"), Mode::Public);
        assert_eq!(a.mode("vip-1"), Mode::Signed);
        assert_eq!(a.mode("vip-trailer"), Mode::Public);
        let all = Access::new(Mode::Signed, vec![], vec!["free-*".into()], &[]);
        assert_eq!(all.mode("x"), Mode::Signed);
        assert_eq!(all.mode("free-1"), Mode::Public);
    }

    #[test]
    fn tokens_are_checked_in_every_part() {
        let a = access();
        let now = 1_000_000;
        let good = sign(&claims("k1", now + 60, "/live/paid/"), b"secret-one");
        let path = "/live/paid/src/s1.m4s";
        assert_eq!(a.check("paid", path, Some(&good), now), Ok(()));
        assert_eq!(a.check("demo", path, None, now), Ok(()));
        assert_eq!(a.check("paid", path, None, now), Err(TokenError::Missing));
        assert_eq!(
            a.check("paid", path, Some(&good), now + 60),
            Err(TokenError::Expired)
        );
        assert_eq!(
            a.check("paid", "/live/paid2/master.m3u8", Some(&good), now),
            Err(TokenError::WrongPrefix)
        );
        // Rotated: k2 signs, k1 still accepted until removed; k3 unknown.
        let k2 = sign(&claims("k2", now + 60, "/live/paid/"), b"secret-two");
        assert_eq!(a.check("paid", path, Some(&k2), now), Ok(()));
        let k3 = sign(&claims("k3", now + 60, "/live/paid/"), b"secret-two");
        assert_eq!(
            a.check("paid", path, Some(&k3), now),
            Err(TokenError::UnknownKey)
        );
        // Signed with the wrong key for its id.
        let wrong = sign(&claims("k1", now + 60, "/live/paid/"), b"secret-two");
        assert_eq!(
            a.check("paid", path, Some(&wrong), now),
            Err(TokenError::BadSignature)
        );
        // Tampered: a later expiry or a wider prefix with the old signature.
        let sig = good.rsplit('.').next().unwrap();
        let later = format!(
            "k1.{}.{}.{sig}",
            now + 9999,
            URL_SAFE_NO_PAD.encode("/live/paid/")
        );
        let wider = format!("k1.{}.{}.{sig}", now + 60, URL_SAFE_NO_PAD.encode("/live/"));
        for t in [later, wider] {
            assert_eq!(
                a.check("paid", path, Some(&t), now),
                Err(TokenError::BadSignature)
            );
        }
        // Malformed in every field.
        let p = URL_SAFE_NO_PAD.encode("/live/paid/");
        for t in [
            String::new(),
            "k1".into(),
            format!("k1.{}.{p}", now + 60),
            format!("k1.0{}.{p}.{sig}", now + 60),
            format!("k1.-1.{p}.{sig}"),
            format!("k1.+{}.{p}.{sig}", now + 60),
            format!("k 1.{}.{p}.{sig}", now + 60),
            format!(
                "k1.{}.{}.{sig}",
                now + 60,
                URL_SAFE_NO_PAD.encode("/live/../x/")
            ),
            format!("k1.{}.{p}.{sig}.x", now + 60),
            format!("k1.{}.{p}.!!", now + 60),
            "k".repeat(600),
        ] {
            assert_eq!(
                a.check("paid", path, Some(&t), now),
                Err(TokenError::Malformed),
                "{t}"
            );
        }
    }

    #[test]
    fn token_segment_is_split_off() {
        assert_eq!(
            split_path("/t/abc.1.x.y/live/d/master.m3u8"),
            (Some("abc.1.x.y"), "/live/d/master.m3u8")
        );
        assert_eq!(
            split_path("/live/d/master.m3u8"),
            (None, "/live/d/master.m3u8")
        );
        assert_eq!(split_path("/t/abc"), (Some("abc"), "/"));
        assert_eq!(split_path("/tt/x/live"), (None, "/tt/x/live"));
    }
}
