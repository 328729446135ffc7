//! HLS playlist model and rendering (multivariant and LL-HLS media playlists), and the
//! client request directives (`_HLS_msn`, `_HLS_part`, `_HLS_skip`) with their rules.
//!
//! Pure: no IO, no clock (wall times are passed in as Unix milliseconds). Section numbers refer
//! to draft-pantos-hls-rfc8216bis (shared/LLHLS.md lists the rules).

use std::fmt::Write;

/// One part of a segment (§4.4.4.9).
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Duration in seconds.
    pub duration: f64,
    /// Starts with a keyframe.
    pub independent: bool,
    /// No media: the source skipped this time (GAP=YES; clients do not fetch it).
    pub gap: bool,
    /// URI relative to the media playlist.
    pub uri: String,
}

/// One media segment, complete or in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Media sequence number.
    pub msn: u64,
    /// Duration in seconds (sum of its parts; final once complete).
    pub duration: f64,
    /// URI of the whole segment, relative to the media playlist.
    pub uri: String,
    /// Wall time of its first frame at the edge, Unix milliseconds (EXT-X-PROGRAM-DATE-TIME).
    pub pdt_ms: i64,
    /// A discontinuity precedes it.
    pub discontinuity: bool,
    /// URI of the init segment it decodes with.
    pub map_uri: String,
    /// Its parts so far.
    pub parts: Vec<Part>,
    /// All parts are in; the segment may be listed with EXTINF.
    pub complete: bool,
}

impl Segment {
    /// Every part is a gap: the whole segment is marked EXT-X-GAP (§4.4.4.7).
    pub fn is_gap(&self) -> bool {
        !self.parts.is_empty() && self.parts.iter().all(|p| p.gap)
    }
}

/// A report on another rendition (§4.4.5.4).
#[derive(Debug, Clone, PartialEq)]
pub struct RenditionReport {
    /// URI of its media playlist, relative to this one.
    pub uri: String,
    /// Its last media sequence number.
    pub last_msn: u64,
    /// Its last part index in that segment.
    pub last_part: u64,
}

/// Fixed properties of a rendition's media playlists (never change during a stream).
#[derive(Debug, Clone, PartialEq)]
pub struct PlaylistConfig {
    /// EXT-X-TARGETDURATION, seconds.
    pub target_duration: u32,
    /// PART-TARGET, seconds.
    pub part_target: f64,
    /// Part tags are kept for segments within this many seconds of the live edge.
    pub part_window: f64,
}

impl PlaylistConfig {
    /// PART-HOLD-BACK: 3 × PART-TARGET (§4.4.3.8 requires at least 2×).
    pub fn part_hold_back(&self) -> f64 {
        3.0 * self.part_target
    }
    /// HOLD-BACK: 3 × target duration (the minimum of §4.4.3.8).
    pub fn hold_back(&self) -> f64 {
        3.0 * f64::from(self.target_duration)
    }
    /// CAN-SKIP-UNTIL: 6 × target duration (the minimum of §4.4.3.8).
    pub fn can_skip_until(&self) -> f64 {
        6.0 * f64::from(self.target_duration)
    }
}

/// The state of one rendition's media playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPlaylist {
    /// Fixed properties.
    pub config: PlaylistConfig,
    /// Segments in the live window, oldest first; the last may be in progress.
    pub segments: Vec<Segment>,
    /// EXT-X-DISCONTINUITY-SEQUENCE: discontinuities that left the window.
    pub discontinuity_sequence: u64,
    /// URI of the part the next EXT-X-PRELOAD-HINT names.
    pub preload_hint: Option<String>,
    /// The stream ended: EXT-X-ENDLIST, no hint.
    pub ended: bool,
}

/// `2026-11-23T21:05:57.123Z` from Unix milliseconds (§4.4.4.6: millisecond precision).
pub fn format_pdt(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

impl MediaPlaylist {
    /// The last segment that has at least one part, and the index of its last part.
    pub fn last_part(&self) -> Option<(u64, u64)> {
        self.segments
            .iter()
            .rev()
            .find(|s| !s.parts.is_empty())
            .map(|s| (s.msn, s.parts.len() as u64 - 1))
    }

    /// The last complete segment's msn.
    pub fn last_complete_msn(&self) -> Option<u64> {
        self.segments
            .iter()
            .rev()
            .find(|s| s.complete)
            .map(|s| s.msn)
    }

    /// Whether the playlist already holds what a blocking request asks for (§6.2.5.2): segment
    /// `msn` complete, or (with `part`) that part of it.
    pub fn satisfies(&self, msn: u64, part: Option<u64>) -> bool {
        match part {
            None => self.segments.iter().any(|s| s.msn >= msn && s.complete) || self.ended,
            Some(p) => {
                self.ended
                    || self.segments.iter().any(|s| {
                        (s.msn == msn && s.parts.len() as u64 > p)
                            || s.msn > msn && !s.parts.is_empty()
                    })
            }
        }
    }

    /// Renders the playlist; `skip` asks for a delta update (§4.4.5.2, §6.2.5.1).
    pub fn render(&self, skip: bool, reports: &[RenditionReport]) -> String {
        let c = &self.config;
        let mut o = String::with_capacity(4096);
        o.push_str("#EXTM3U\n#EXT-X-VERSION:9\n");
        let _ = writeln!(o, "#EXT-X-TARGETDURATION:{}", c.target_duration);
        let _ = writeln!(
            o,
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL={:.3},PART-HOLD-BACK={:.3},HOLD-BACK={:.3}",
            c.can_skip_until(),
            c.part_hold_back(),
            c.hold_back()
        );
        let _ = writeln!(o, "#EXT-X-PART-INF:PART-TARGET={:.3}", c.part_target);
        let first_msn = self.segments.first().map_or(0, |s| s.msn);
        let _ = writeln!(o, "#EXT-X-MEDIA-SEQUENCE:{first_msn}");
        if self.discontinuity_sequence > 0 {
            let _ = writeln!(
                o,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_sequence
            );
        }
        // Delta update: skip whole segments older than CAN-SKIP-UNTIL from the live edge.
        let total: f64 = self.segments.iter().map(|s| s.duration).sum();
        let mut skipped = 0;
        if skip && !self.ended {
            let mut age = total;
            for s in &self.segments {
                if age - s.duration < c.can_skip_until() || !s.complete {
                    break;
                }
                age -= s.duration;
                skipped += 1;
            }
        }
        let mut map: Option<&str> = None;
        if skipped > 0 {
            let _ = writeln!(o, "#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}");
            map = self.segments.get(skipped - 1).map(|s| s.map_uri.as_str());
            if let Some(m) = map {
                let _ = writeln!(o, "#EXT-X-MAP:URI=\"{m}\"");
            }
        }
        // Part tags only near the live edge (§6.2.2: about the last 3 target durations).
        let mut from_end = 0.0;
        let mut with_parts = vec![false; self.segments.len()];
        for (i, s) in self.segments.iter().enumerate().rev() {
            with_parts[i] = from_end < c.part_window;
            from_end += s.duration;
        }
        for (i, s) in self.segments.iter().enumerate().skip(skipped) {
            if s.discontinuity {
                o.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if map != Some(s.map_uri.as_str()) {
                let _ = writeln!(o, "#EXT-X-MAP:URI=\"{}\"", s.map_uri);
                map = Some(&s.map_uri);
            }
            let _ = writeln!(o, "#EXT-X-PROGRAM-DATE-TIME:{}", format_pdt(s.pdt_ms));
            if with_parts[i] && !self.ended {
                for p in &s.parts {
                    let _ = write!(
                        o,
                        "#EXT-X-PART:DURATION={:.3},URI=\"{}\"",
                        p.duration, p.uri
                    );
                    if p.independent {
                        o.push_str(",INDEPENDENT=YES");
                    }
                    if p.gap {
                        o.push_str(",GAP=YES");
                    }
                    o.push('\n');
                }
            }
            if s.complete {
                if s.is_gap() {
                    o.push_str("#EXT-X-GAP\n");
                }
                let _ = writeln!(o, "#EXTINF:{:.3},\n{}", s.duration, s.uri);
            }
        }
        if self.ended {
            o.push_str("#EXT-X-ENDLIST\n");
        } else if let Some(h) = &self.preload_hint {
            let _ = writeln!(o, "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{h}\"");
        }
        if !self.ended {
            for r in reports {
                let _ = writeln!(
                    o,
                    "#EXT-X-RENDITION-REPORT:URI=\"{}\",LAST-MSN={},LAST-PART={}",
                    r.uri, r.last_msn, r.last_part
                );
            }
        }
        o
    }
}

/// A variant of the multivariant playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// URI of its media playlist, relative to the multivariant playlist.
    pub uri: String,
    /// Peak bits per second.
    pub bandwidth: u64,
    /// Average bits per second.
    pub average_bandwidth: u64,
    /// RFC 6381 codecs, comma separated.
    pub codecs: String,
    /// Width and height.
    pub resolution: Option<(u32, u32)>,
    /// Frames per second.
    pub frame_rate: Option<f64>,
}

/// The multivariant playlist (§4.4.6).
pub fn render_multivariant(variants: &[Variant]) -> String {
    // No EXT-X-INDEPENDENT-SEGMENTS: with a long source GOP a segment may start between keyframes.
    let mut o = String::from("#EXTM3U\n#EXT-X-VERSION:9\n");
    for v in variants {
        let _ = write!(
            o,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"",
            v.bandwidth, v.average_bandwidth, v.codecs
        );
        if let Some((w, h)) = v.resolution {
            let _ = write!(o, ",RESOLUTION={w}x{h}");
        }
        if let Some(f) = v.frame_rate {
            let _ = write!(o, ",FRAME-RATE={f:.3}");
        }
        let _ = writeln!(o, "\n{}", v.uri);
    }
    o
}

/// Blocking and delta directives of a playlist request (§6.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `_HLS_msn`.
    pub msn: Option<u64>,
    /// `_HLS_part`.
    pub part: Option<u64>,
    /// `_HLS_skip=YES` or `v2`.
    pub skip: bool,
}

/// A request the origin must refuse at once with 400 (§6.2.5.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    /// `_HLS_part` without `_HLS_msn`.
    #[error("_HLS_part requires _HLS_msn")]
    PartWithoutMsn,
    /// A value that is not a non-negative integer.
    #[error("{0} is not a valid number")]
    NotANumber(&'static str),
}

impl Directives {
    /// Parses the query string; unknown `_HLS_` and other parameters are ignored.
    pub fn parse(query: Option<&str>) -> Result<Self, DirectiveError> {
        let mut d = Directives::default();
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "_HLS_msn" => {
                    d.msn = Some(
                        v.parse()
                            .map_err(|_| DirectiveError::NotANumber("_HLS_msn"))?,
                    )
                }
                "_HLS_part" => {
                    d.part = Some(
                        v.parse()
                            .map_err(|_| DirectiveError::NotANumber("_HLS_part"))?,
                    )
                }
                "_HLS_skip" => d.skip = v == "YES" || v == "v2",
                _ => {}
            }
        }
        if d.part.is_some() && d.msn.is_none() {
            return Err(DirectiveError::PartWithoutMsn);
        }
        Ok(d)
    }

    /// The canonical cache-key query: the three directives in a fixed order, nothing else.
    pub fn cache_query(&self) -> String {
        let mut parts = vec![];
        if let Some(m) = self.msn {
            parts.push(format!("_HLS_msn={m}"));
        }
        if let Some(p) = self.part {
            parts.push(format!("_HLS_part={p}"));
        }
        if self.skip {
            parts.push("_HLS_skip=YES".into());
        }
        parts.join("&")
    }
}

/// An object of a rendition's folder, by the name playlists give it: the one URL scheme the
/// origin serves and the edge caches (`index.m3u8`, `init-E.mp4`, `sM.m4s`, `sM.P.m4s`).
/// Numbers must be in canonical decimal (no sign, no leading zero, within u64): `s0123.m4s`
/// and `s123.m4s` would otherwise be two cache entries, and two origin fetches, of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectName {
    /// The media playlist.
    Playlist,
    /// An init segment (by publishing epoch).
    Init(u64),
    /// A whole segment.
    Segment(u64),
    /// Part `.1` of segment `.0`.
    Part(u64, u64),
}

fn canonical_u64(s: &str) -> Option<u64> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

impl ObjectName {
    /// Parses a file name; None for anything the origin never names.
    pub fn parse(file: &str) -> Option<Self> {
        if file == "index.m3u8" {
            return Some(ObjectName::Playlist);
        }
        if let Some(id) = file
            .strip_prefix("init-")
            .and_then(|f| f.strip_suffix(".mp4"))
        {
            return canonical_u64(id).map(ObjectName::Init);
        }
        let stem = file.strip_prefix('s')?.strip_suffix(".m4s")?;
        match stem.split_once('.') {
            None => canonical_u64(stem).map(ObjectName::Segment),
            Some((m, p)) => Some(ObjectName::Part(canonical_u64(m)?, canonical_u64(p)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(msn: u64, parts: usize, complete: bool) -> Segment {
        Segment {
            msn,
            duration: 0.2 * parts as f64,
            uri: format!("s{msn}.m4s"),
            pdt_ms: 1_795_466_757_123 + msn as i64 * 2000,
            discontinuity: false,
            map_uri: "init.mp4".into(),
            parts: (0..parts)
                .map(|i| Part {
                    duration: 0.2,
                    gap: false,
                    independent: i == 0,
                    uri: format!("s{msn}.{i}.m4s"),
                })
                .collect(),
            complete,
        }
    }

    fn playlist(n: u64) -> MediaPlaylist {
        let mut segments: Vec<Segment> = (0..n).map(|m| seg(m, 10, true)).collect();
        segments.push(seg(n, 3, false));
        MediaPlaylist {
            config: PlaylistConfig {
                target_duration: 2,
                part_target: 0.2,
                part_window: 6.0,
            },
            segments,
            discontinuity_sequence: 0,
            preload_hint: Some(format!("s{n}.3.m4s")),
            ended: false,
        }
    }

    #[test]
    fn object_names_are_canonical() {
        use ObjectName::*;
        assert_eq!(ObjectName::parse("index.m3u8"), Some(Playlist));
        assert_eq!(ObjectName::parse("init-77.mp4"), Some(Init(77)));
        assert_eq!(ObjectName::parse("s0.m4s"), Some(Segment(0)));
        assert_eq!(ObjectName::parse("s123.m4s"), Some(Segment(123)));
        assert_eq!(ObjectName::parse("s123.0.m4s"), Some(Part(123, 0)));
        for bad in [
            "s0123.m4s",
            "s123.00.m4s",
            "s123.01.m4s",
            "s+1.m4s",
            "s.m4s",
            "s1..m4s",
            "s1.2.3.m4s",
            "s18446744073709551616.m4s",
            "init-077.mp4",
            "init-.mp4",
            "init.mp4",
            "S1.m4s",
            "s1.M4S",
        ] {
            assert_eq!(ObjectName::parse(bad), None, "{bad}");
        }
        assert_eq!(
            ObjectName::parse("s18446744073709551615.0.m4s"),
            Some(Part(u64::MAX, 0))
        );
    }

    #[test]
    fn pdt_has_millisecond_precision() {
        // §4.4.4.6
        assert_eq!(format_pdt(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_pdt(1_795_466_757_123), "2026-11-23T20:45:57.123Z");
        assert_eq!(format_pdt(951_782_400_001), "2000-02-29T00:00:00.001Z");
    }

    #[test]
    fn server_control_and_part_inf_4_4_3_7_and_4_4_3_8() {
        let p = playlist(5).render(false, &[]);
        assert!(p.contains("#EXT-X-PART-INF:PART-TARGET=0.200\n"));
        assert!(p.contains(
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=0.600,HOLD-BACK=6.000\n"
        ));
        assert!(p.contains("#EXT-X-TARGETDURATION:2\n"));
        assert!(p.starts_with("#EXTM3U\n#EXT-X-VERSION:9\n"));
    }

    #[test]
    fn parts_independent_hint_and_order_4_4_4_9_and_4_4_5_3() {
        let p = playlist(5).render(false, &[]);
        // The PDT of the in-progress segment precedes its first part.
        let pdt = p.rfind("#EXT-X-PROGRAM-DATE-TIME").unwrap();
        let part = p
            .find("#EXT-X-PART:DURATION=0.200,URI=\"s5.0.m4s\",INDEPENDENT=YES")
            .unwrap();
        assert!(pdt < part);
        assert!(p.contains("#EXT-X-PART:DURATION=0.200,URI=\"s5.1.m4s\"\n"));
        assert!(p.ends_with("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"s5.3.m4s\"\n"));
        // Parts only within the part window (6 s: the in-progress segment and 3 before it).
        assert!(!p.contains("s1.0.m4s"));
        assert!(p.contains("s2.0.m4s"));
        assert!(p.contains("#EXTINF:2.000,\ns4.m4s\n"));
        assert_eq!(p.matches("#EXT-X-MAP:URI=\"init.mp4\"").count(), 1);
    }

    #[test]
    fn endlist_has_no_hint_and_no_parts_4_4_5_3() {
        let mut pl = playlist(3);
        pl.segments.last_mut().unwrap().complete = true;
        pl.ended = true;
        let p = pl.render(true, &[]);
        assert!(p.ends_with("#EXT-X-ENDLIST\n"));
        assert!(!p.contains("PRELOAD-HINT"));
        assert!(!p.contains("EXT-X-SKIP"));
    }

    #[test]
    fn delta_update_skips_old_segments_4_4_5_2() {
        let p = playlist(10).render(true, &[]);
        // 10 complete segments of 2 s + 0.6 s in progress: segments older than 12 s skipped.
        assert!(p.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"), "{p}");
        assert!(!p.contains("\ns3.m4s\n"));
        assert!(p.contains("\ns4.m4s\n"));
        assert!(p.contains("#EXT-X-MAP:URI=\"init.mp4\""));
        let full = playlist(10).render(false, &[]);
        assert!(!full.contains("EXT-X-SKIP"));
        assert!(full.contains("\ns0.m4s\n"));
    }

    #[test]
    fn rendition_reports_4_4_5_4() {
        let p = playlist(2).render(
            false,
            &[RenditionReport {
                uri: "../360p/index.m3u8".into(),
                last_msn: 2,
                last_part: 2,
            }],
        );
        assert!(p.ends_with(
            "#EXT-X-RENDITION-REPORT:URI=\"../360p/index.m3u8\",LAST-MSN=2,LAST-PART=2\n"
        ));
    }

    #[test]
    fn discontinuity_before_its_segment() {
        let mut pl = playlist(3);
        pl.segments[2].discontinuity = true;
        pl.segments[2].map_uri = "init-1.mp4".into();
        pl.segments[3].map_uri = "init-1.mp4".into();
        let p = pl.render(false, &[]);
        let d = p
            .find("#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init-1.mp4\"\n#EXT-X-PROGRAM-DATE-TIME")
            .unwrap();
        assert!(d > p.find("\ns1.m4s\n").unwrap());
    }

    #[test]
    fn blocking_conditions_6_2_5_2() {
        let pl = playlist(5); // s5 has parts 0..=2
        assert!(pl.satisfies(4, None));
        assert!(!pl.satisfies(5, None));
        assert!(pl.satisfies(5, Some(2)));
        assert!(!pl.satisfies(5, Some(3)));
        assert!(!pl.satisfies(6, Some(0)));
        assert_eq!(pl.last_part(), Some((5, 2)));
    }

    #[test]
    fn directives_6_2_5() {
        assert_eq!(
            Directives::parse(Some(
                "_HLS_msn=5&_HLS_part=2&token=x&_HLS_skip=YES&_HLS_foo=1"
            )),
            Ok(Directives {
                msn: Some(5),
                part: Some(2),
                skip: true
            })
        );
        assert_eq!(
            Directives::parse(Some("_HLS_part=2")),
            Err(DirectiveError::PartWithoutMsn)
        );
        assert_eq!(
            Directives::parse(Some("_HLS_msn=abc")),
            Err(DirectiveError::NotANumber("_HLS_msn"))
        );
        assert!(Directives::parse(Some("_HLS_skip=v2")).unwrap().skip);
        assert!(!Directives::parse(Some("_HLS_skip=NO")).unwrap().skip);
        assert_eq!(
            Directives::parse(Some("b=1&_HLS_skip=YES&_HLS_part=0&_HLS_msn=9"))
                .unwrap()
                .cache_query(),
            "_HLS_msn=9&_HLS_part=0&_HLS_skip=YES"
        );
    }

    #[test]
    fn multivariant() {
        let m = render_multivariant(&[Variant {
            uri: "src/index.m3u8".into(),
            bandwidth: 4_400_000,
            average_bandwidth: 4_000_000,
            codecs: "avc1.64001f,mp4a.40.2".into(),
            resolution: Some((1280, 720)),
            frame_rate: Some(30.0),
        }]);
        assert!(m.contains(
            "#EXT-X-STREAM-INF:BANDWIDTH=4400000,AVERAGE-BANDWIDTH=4000000,CODECS=\"avc1.64001f,mp4a.40.2\",RESOLUTION=1280x720,FRAME-RATE=30.000\nsrc/index.m3u8\n"
        ));
    }
}
