//! Just enough HLS parsing for a player: multivariant variants, and media playlists with their
//! LL-HLS parts, preload hint, server control and PROGRAM-DATE-TIME. Pure; tolerant of tags it
//! does not know (a player must be).

/// One `EXT-X-STREAM-INF` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Media playlist URI (as written, relative or absolute).
    pub uri: String,
    /// Peak bits per second.
    pub bandwidth: u64,
    /// Height from RESOLUTION, if given.
    pub height: Option<u32>,
}

/// Parses a multivariant playlist; `Err` when it is not one.
pub fn parse_multivariant(text: &str) -> Result<Vec<Variant>, String> {
    if !text.starts_with("#EXTM3U") {
        return Err("not a playlist (no #EXTM3U)".into());
    }
    let mut out = vec![];
    let mut pending: Option<(u64, Option<u32>)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(attrs) = line.strip_prefix("#EXT-X-STREAM-INF:") {
            let bw = attr(attrs, "BANDWIDTH")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let h = attr(attrs, "RESOLUTION")
                .and_then(|r| r.split_once('x'))
                .and_then(|(_, h)| h.parse().ok());
            pending = Some((bw, h));
        } else if !line.is_empty() && !line.starts_with('#') {
            if let Some((bandwidth, height)) = pending.take() {
                out.push(Variant {
                    uri: line.to_string(),
                    bandwidth,
                    height,
                });
            }
        }
    }
    if out.is_empty() {
        return Err("multivariant playlist lists no variants".into());
    }
    Ok(out)
}

/// One part (`EXT-X-PART`).
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// URI.
    pub uri: String,
    /// Seconds.
    pub duration: f64,
    /// INDEPENDENT=YES: starts with a keyframe.
    pub independent: bool,
    /// GAP=YES: must not be fetched.
    pub gap: bool,
}

/// One media segment; the last may be in progress (parts only, no URI yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Media sequence number.
    pub msn: u64,
    /// URI and duration once complete.
    pub complete: Option<(String, f64)>,
    /// Its parts (LL-HLS), in order.
    pub parts: Vec<Part>,
    /// PROGRAM-DATE-TIME of its first sample, Unix ms (explicit or carried forward).
    pub pdt_ms: Option<f64>,
    /// EXT-X-GAP.
    pub gap: bool,
    /// The init segment (EXT-X-MAP URI) that applies.
    pub map: Option<String>,
}

/// A media playlist.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MediaPlaylist {
    /// EXT-X-TARGETDURATION, seconds.
    pub target_duration: f64,
    /// EXT-X-PART-INF PART-TARGET, seconds (LL-HLS only).
    pub part_target: Option<f64>,
    /// CAN-BLOCK-RELOAD=YES.
    pub can_block_reload: bool,
    /// PART-HOLD-BACK, seconds.
    pub part_hold_back: Option<f64>,
    /// Segments, oldest first.
    pub segments: Vec<Segment>,
    /// The PART preload hint's URI.
    pub preload_hint: Option<String>,
    /// EXT-X-ENDLIST.
    pub ended: bool,
}

/// Parses a media playlist; `Err` when it is not one.
pub fn parse_media(text: &str) -> Result<MediaPlaylist, String> {
    if !text.starts_with("#EXTM3U") {
        return Err("not a playlist (no #EXTM3U)".into());
    }
    let mut pl = MediaPlaylist::default();
    let mut msn: u64 = 0;
    let mut map: Option<String> = None;
    let mut cur = Segment {
        msn: 0,
        complete: None,
        parts: vec![],
        pdt_ms: None,
        gap: false,
        map: None,
    };
    let mut extinf: Option<f64> = None;
    let mut next_pdt: Option<f64> = None;
    let mut seen_target = false;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
            pl.target_duration = v.parse().map_err(|_| format!("bad target duration {v}"))?;
            seen_target = true;
        } else if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            msn = v.parse().map_err(|_| format!("bad media sequence {v}"))?;
            cur.msn = msn;
        } else if let Some(a) = line.strip_prefix("#EXT-X-PART-INF:") {
            pl.part_target = attr(a, "PART-TARGET").and_then(|v| v.parse().ok());
        } else if let Some(a) = line.strip_prefix("#EXT-X-SERVER-CONTROL:") {
            pl.can_block_reload = attr(a, "CAN-BLOCK-RELOAD") == Some("YES");
            pl.part_hold_back = attr(a, "PART-HOLD-BACK").and_then(|v| v.parse().ok());
        } else if let Some(a) = line.strip_prefix("#EXT-X-MAP:") {
            map = attr(a, "URI").map(str::to_string);
        } else if let Some(v) = line.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
            cur.pdt_ms = parse_date_ms(v);
        } else if line == "#EXT-X-GAP" {
            cur.gap = true;
        } else if let Some(a) = line.strip_prefix("#EXT-X-PART:") {
            // One pass over the attributes: parts are most of an LL-HLS playlist's lines.
            let (mut uri, mut duration, mut independent, mut gap) = (None, None, false, false);
            for (k, v) in attrs(a) {
                match k {
                    "URI" => uri = Some(v),
                    "DURATION" => duration = v.parse().ok(),
                    "INDEPENDENT" => independent = v == "YES",
                    "GAP" => gap = v == "YES",
                    _ => {}
                }
            }
            let (Some(uri), Some(duration)) = (uri, duration) else {
                return Err(format!("EXT-X-PART without URI or DURATION: {line}"));
            };
            cur.parts.push(Part {
                uri: uri.to_string(),
                duration,
                independent,
                gap,
            });
        } else if let Some(a) = line.strip_prefix("#EXT-X-PRELOAD-HINT:") {
            if attr(a, "TYPE") == Some("PART") {
                pl.preload_hint = attr(a, "URI").map(str::to_string);
            }
        } else if let Some(v) = line.strip_prefix("#EXTINF:") {
            let d = v.split(',').next().unwrap_or("");
            extinf = Some(d.parse().map_err(|_| format!("bad EXTINF {v}"))?);
        } else if line == "#EXT-X-ENDLIST" {
            pl.ended = true;
        } else if !line.is_empty() && !line.starts_with('#') {
            let d = extinf
                .take()
                .ok_or_else(|| format!("URI without EXTINF: {line}"))?;
            if cur.pdt_ms.is_none() {
                cur.pdt_ms = next_pdt;
            }
            next_pdt = cur.pdt_ms.map(|p| p + d * 1000.0);
            cur.complete = Some((line.to_string(), d));
            cur.map = map.clone();
            msn += 1;
            let done = std::mem::replace(
                &mut cur,
                Segment {
                    msn,
                    complete: None,
                    parts: vec![],
                    pdt_ms: None,
                    gap: false,
                    map: None,
                },
            );
            pl.segments.push(done);
        }
    }
    if !seen_target {
        return Err("media playlist without EXT-X-TARGETDURATION".into());
    }
    if !cur.parts.is_empty() {
        if cur.pdt_ms.is_none() {
            cur.pdt_ms = next_pdt;
        }
        cur.map = map;
        pl.segments.push(cur);
    }
    Ok(pl)
}

impl MediaPlaylist {
    /// Is this an LL-HLS playlist a player can follow part by part with blocking reloads?
    pub fn low_latency(&self) -> bool {
        self.can_block_reload
            && self.part_target.is_some()
            && self.segments.iter().any(|s| !s.parts.is_empty())
    }

    /// The segment with `msn`.
    pub fn segment(&self, msn: u64) -> Option<&Segment> {
        let first = self.segments.first()?.msn;
        self.segments.get(msn.checked_sub(first)? as usize)
    }

    /// The position after the newest listed part: (msn, part index) to ask for next.
    pub fn next_part(&self) -> Option<(u64, usize)> {
        let last = self.segments.last()?;
        Some(match last.complete {
            Some(_) => (last.msn + 1, 0),
            None => (last.msn, last.parts.len()),
        })
    }

    /// Where hls.js would start: the newest independent part at least PART-HOLD-BACK (else 3
    /// part targets) behind the live edge. Returns (msn, part index).
    pub fn start_part(&self) -> Option<(u64, usize)> {
        let hold = self
            .part_hold_back
            .or(self.part_target.map(|t| 3.0 * t))
            .unwrap_or(0.0);
        let mut behind = 0.0;
        let mut fallback = None;
        for s in self.segments.iter().rev() {
            for (i, p) in s.parts.iter().enumerate().rev() {
                behind += p.duration;
                if p.independent && !p.gap {
                    fallback.get_or_insert((s.msn, i));
                    if behind >= hold {
                        return Some((s.msn, i));
                    }
                }
            }
        }
        fallback
    }
}

/// The (name, value) pairs of an attribute list; quoted values without their quotes.
pub fn attrs(list: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = list;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (k, after) = rest.split_once('=')?;
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], q[end + 1..].trim_start_matches(','))
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v, n),
                None => (after, ""),
            }
        };
        rest = next;
        Some((k.trim(), v))
    })
}

/// A quoted or plain attribute value from an attribute list.
pub fn attr<'a>(list: &'a str, name: &str) -> Option<&'a str> {
    attrs(list).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// ISO 8601 date-time (`2026-11-24T10:20:30.250Z`, or with an offset) → Unix ms.
pub fn parse_date_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    // Split the zone off: Z, +hh:mm or -hh:mm.
    let (clock, offset_min) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, z) = time.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let z = z[1..].replace(':', "");
        let (h, m) = (
            z.get(..2)?.parse::<i64>().ok()?,
            z.get(2..4).unwrap_or("0").parse::<i64>().ok()?,
        );
        (c, sign * (h * 60 + m))
    } else {
        (time, 0)
    };
    let mut t = clock.split(':');
    let (h, mi): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 - offset_min * 60;
    Some(secs as f64 * 1000.0 + sec * 1000.0)
}

/// Resolves `uri` against the URL of the playlist that named it (absolute path or relative).
pub fn resolve(base: &str, uri: &str) -> String {
    if uri.starts_with("http://") || uri.starts_with("https://") {
        return uri.to_string();
    }
    let (origin, path) = match base
        .find("://")
        .and_then(|i| base[i + 3..].find('/').map(|j| i + 3 + j))
    {
        Some(i) => (&base[..i], &base[i..]),
        None => (base, "/"),
    };
    if uri.starts_with('/') {
        return format!("{origin}{uri}");
    }
    let path = path.split('?').next().unwrap_or("/");
    let dir = &path[..=path.rfind('/').unwrap_or(0)];
    format!("{origin}{dir}{uri}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LL: &str = "#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-PART-INF:PART-TARGET=0.200
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=0.600,HOLD-BACK=6.000
#EXT-X-MEDIA-SEQUENCE:100
#EXT-X-MAP:URI=\"init-1.mp4\"
#EXT-X-PROGRAM-DATE-TIME:2026-11-24T10:20:30.250Z
#EXT-X-PART:DURATION=1.000,URI=\"s100.0.m4s\",INDEPENDENT=YES
#EXT-X-PART:DURATION=1.000,URI=\"s100.1.m4s\"
#EXTINF:2.000,
s100.m4s
#EXT-X-PART:DURATION=0.200,URI=\"s101.0.m4s\",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.200,URI=\"s101.1.m4s\"
#EXT-X-PART:DURATION=0.200,URI=\"s101.2.m4s\",GAP=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"s101.3.m4s\"
";

    #[test]
    fn parses_an_ll_hls_playlist() {
        let pl = parse_media(LL).unwrap();
        assert!(pl.low_latency());
        assert_eq!(pl.target_duration, 2.0);
        assert_eq!(pl.part_target, Some(0.2));
        assert_eq!(pl.part_hold_back, Some(0.6));
        assert_eq!(pl.segments.len(), 2);
        assert_eq!(pl.segments[0].msn, 100);
        assert_eq!(pl.segments[0].complete, Some(("s100.m4s".into(), 2.0)));
        assert_eq!(pl.segments[0].map.as_deref(), Some("init-1.mp4"));
        let t0 = parse_date_ms("2026-11-24T10:20:30.250Z").unwrap();
        assert_eq!(pl.segments[0].pdt_ms, Some(t0));
        // Carried forward by the segment's duration.
        assert_eq!(pl.segments[1].pdt_ms, Some(t0 + 2000.0));
        assert_eq!(pl.segments[1].complete, None);
        assert!(pl.segments[1].parts[2].gap);
        assert_eq!(pl.preload_hint.as_deref(), Some("s101.3.m4s"));
        assert_eq!(pl.next_part(), Some((101, 3)));
        // 0.6 s behind the edge: s101.0 is only 0.6 s back counting the GAP part, so it is it.
        assert_eq!(pl.start_part(), Some((101, 0)));
        assert_eq!(pl.segment(101).unwrap().parts.len(), 3);
        assert!(pl.segment(99).is_none());
    }

    #[test]
    fn dates_and_urls() {
        assert_eq!(parse_date_ms("1970-01-01T00:00:01.500Z"), Some(1500.0));
        assert_eq!(parse_date_ms("1970-01-01T01:00:00+01:00"), Some(0.0));
        assert_eq!(
            parse_date_ms("2000-03-01T00:00:00Z"),
            Some(951_868_800_000.0)
        );
        assert_eq!(parse_date_ms("junk"), None);
        let b = "http://127.0.0.1:8080/live/demo/src/index.m3u8?_HLS_msn=3";
        assert_eq!(
            resolve(b, "s1.m4s"),
            "http://127.0.0.1:8080/live/demo/src/s1.m4s"
        );
        assert_eq!(resolve(b, "/x.m4s"), "http://127.0.0.1:8080/x.m4s");
        assert_eq!(
            resolve("http://h/live/a/master.m3u8", "src/index.m3u8"),
            "http://h/live/a/src/index.m3u8"
        );
    }

    #[test]
    fn multivariant_and_plain_hls() {
        let m = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=2000,CODECS=\"avc1.64001f,mp4a.40.2\",RESOLUTION=1280x720\nsrc/index.m3u8\n#EXT-X-STREAM-INF:BANDWIDTH=800,RESOLUTION=640x360\n360p/index.m3u8\n";
        let v = parse_multivariant(m).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].bandwidth, v[0].height), (2000, Some(720)));
        assert_eq!(v[1].uri, "360p/index.m3u8");
        assert!(parse_multivariant("<html>").is_err());
        let plain = "#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXT-X-MEDIA-SEQUENCE:7\n#EXTINF:6.0,\na.ts\n#EXTINF:5.5,\nb.ts\n#EXT-X-ENDLIST\n";
        let pl = parse_media(plain).unwrap();
        assert!(!pl.low_latency());
        assert!(pl.ended);
        assert_eq!(pl.segments[1].msn, 8);
        assert_eq!(pl.next_part(), Some((9, 0)));
        assert!(parse_media("#EXTM3U\n#EXTINF:x,\na.ts\n").is_err());
    }
}
