//! Cuts one rendition's frames into LL-HLS parts and segments (CMAF), sans-IO.
//!
//! Video drives the timeline: a part closes when the next video frame would make it reach the
//! part length (n frames, n fixed from the frame rate at start, so PART-TARGET never changes);
//! a segment closes at a keyframe once it reached the target duration (or, with a long GOP, at
//! a part boundary before it would outgrow the target duration). Audio is muxed into the same
//! parts: a part closes when audio has reached its end time too, or after `audio_wait_ms`.
//! The packager owns the rendition's playlist model and the bytes of its init segment, parts
//! and segments in the live window. Wall time is passed in.

use crate::cmaf::{self, Sample, TrackKind as CmafTrack, TrackRun, TrackSpec};
use crate::hls::{MediaPlaylist, Part, PlaylistConfig, Segment};
use crate::media::{AudioCodec, Frame, StreamInfo, TrackKind};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};

/// A longer jump in the source's timestamps is a discontinuity rather than a gap to fill.
const MAX_GAP_MS: i64 = 10_000;
/// Timestamps (ms) beyond ±2^42 (139 years) are refused: every product below (90 kHz ticks,
/// audio sample rates up to 2^20 Hz) then fits in 64 bits, whatever the publisher sends.
const MAX_TIMESTAMP_MS: i64 = 1 << 42;
/// Composition offsets (pts − dts) beyond a minute are refused (the 90 kHz offset is 32-bit).
const MAX_CTS_MS: i64 = 60_000;
/// Audio held waiting for its video: at most this span of timestamps...
const MAX_AUDIO_AHEAD_MS: i64 = 10_000;
/// ...and this many bytes (with `FRAME_OVERHEAD` each), whatever the timestamps say.
const MAX_AUDIO_QUEUE_BYTES: usize = 4 << 20;
/// Bookkeeping counted per buffered frame, so that empty frames still count.
const FRAME_OVERHEAD: usize = 64;

/// Packaging settings.
#[derive(Debug, Clone)]
pub struct PackagerConfig {
    /// Wanted part duration (ms); the real PART-TARGET is a whole number of frames near it.
    pub part_target_ms: u32,
    /// Segment target duration (s) = EXT-X-TARGETDURATION.
    pub target_duration_s: u32,
    /// Complete segments kept in the playlist.
    pub window_segments: usize,
    /// How long a part whose video is complete waits for its audio (ms).
    pub audio_wait_ms: u64,
    /// Bytes of video one part may hold while it fills: video whose timestamps do not advance
    /// would otherwise never close its part.
    pub max_part_bytes: usize,
}

impl Default for PackagerConfig {
    fn default() -> Self {
        PackagerConfig {
            part_target_ms: 200,
            target_duration_s: 2,
            window_segments: 10,
            audio_wait_ms: 150,
            max_part_bytes: 32 << 20,
        }
    }
}

/// Fixed once the first frames are seen.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Video frame duration estimate (ms).
    frame_ms: f64,
    /// Cut a part once it spans at least this (ms).
    part_cut_ms: i64,
    /// Declared PART-TARGET (ms).
    part_target_ms: i64,
}

/// A part whose video is complete, waiting for its audio.
#[derive(Debug)]
struct Waiting {
    video: Vec<Frame>,
    /// End of the part (the next part's first dts).
    end: i64,
    /// When the video completed (wall ms).
    since: i64,
    /// The segment closes after this part.
    closes_segment: bool,
}

/// One rendition's packager.
pub struct Packager {
    cfg: PackagerConfig,
    info: StreamInfo,
    timing: Option<Timing>,
    has_audio: bool,
    video_track: u32,
    audio_track: u32,
    audio_rate: u32,
    /// Expected next audio decode time in the audio timescale (keeps 1024-sample steps exact).
    audio_next_ticks: Option<u64>,
    init: Option<Bytes>,
    init_id: u64,
    /// Earlier init segments still named by a segment in the window (after a restart).
    old_inits: Vec<(String, Bytes)>,
    /// Video of the part being filled.
    part: Vec<Frame>,
    waiting: Option<Waiting>,
    /// Start dts of the segment the cutter is filling (decided when its first frame arrives).
    cut_seg_start: Option<i64>,
    audio_q: VecDeque<Frame>,
    /// Bytes in `audio_q` and in `part` (with `FRAME_OVERHEAD` each).
    audio_q_bytes: usize,
    part_bytes: usize,
    /// Frames dropped by a bound since the caller last took the counts, by reason.
    dropped: Vec<(&'static str, u64)>,
    /// Parts made since `take_parts`: (media, GAP).
    new_parts: (u64, u64),
    /// The playlist model.
    pub playlist: MediaPlaylist,
    seg_start_dts: Option<i64>,
    next_msn: u64,
    fragment_seq: u32,
    /// (msn, part index) → bytes.
    parts: BTreeMap<(u64, u64), Bytes>,
    /// msn → (segment bytes so far, complete).
    segments: BTreeMap<u64, Vec<Bytes>>,
    /// Unix ms minus dts (ms) of the first frame after a (re)start: PDT = anchor + dts.
    pdt_anchor: Option<i64>,
    pending_discontinuity: bool,
    frames_out: u64,
    /// Edge arrival (µs) of the newest frame in the newest part, and whether a part was emitted
    /// since the caller last took it.
    last_part_arrival: Option<u64>,
    /// Video frames seen, first and last dts (for the frame rate).
    video_span: Option<(u64, i64, i64)>,
}

/// A part or segment lookup result.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Here it is.
    Ready(Bytes),
    /// Named by the preload hint (or the next part of the current segment): not complete yet.
    Pending,
    /// Never existed or left the window.
    Missing,
}

impl Packager {
    /// A packager for a stream with `info`; the first msn is `first_msn`; `init_id` makes the
    /// init segment's URI unique (the publishing session's epoch).
    pub fn new(cfg: PackagerConfig, info: StreamInfo, first_msn: u64, init_id: u64) -> Self {
        let has_audio = info.audio.is_some();
        let part_window = 3.0 * f64::from(cfg.target_duration_s);
        Packager {
            playlist: MediaPlaylist {
                config: PlaylistConfig {
                    target_duration: cfg.target_duration_s,
                    part_target: f64::from(cfg.part_target_ms) / 1000.0,
                    part_window,
                },
                segments: vec![],
                discontinuity_sequence: 0,
                preload_hint: None,
                ended: false,
            },
            cfg,
            info,
            timing: None,
            has_audio,
            video_track: 1,
            audio_track: 2,
            audio_rate: 48_000,
            audio_next_ticks: None,
            init: None,
            init_id,
            old_inits: vec![],
            part: vec![],
            waiting: None,
            cut_seg_start: None,
            audio_q: VecDeque::new(),
            audio_q_bytes: 0,
            part_bytes: 0,
            dropped: vec![],
            new_parts: (0, 0),
            seg_start_dts: None,
            next_msn: first_msn,
            fragment_seq: 1,
            parts: BTreeMap::new(),
            segments: BTreeMap::new(),
            pdt_anchor: None,
            pending_discontinuity: false,
            frames_out: 0,
            last_part_arrival: None,
            video_span: None,
        }
    }

    /// True once PART-TARGET is fixed (after the first video frames).
    pub fn started(&self) -> bool {
        self.timing.is_some()
    }

    /// The current init segment's URI.
    pub fn map_uri(&self) -> String {
        format!("init-{}.mp4", self.init_id)
    }

    /// The init segment named `uri`.
    pub fn init_segment(&self, uri: &str) -> Option<Bytes> {
        if uri == self.map_uri() {
            return self.init.clone();
        }
        self.old_inits
            .iter()
            .find(|(u, _)| u == uri)
            .map(|(_, b)| b.clone())
    }

    /// Edge arrival time (µs) of the newest frame of the part emitted since the last call.
    pub fn take_part_arrival(&mut self) -> Option<u64> {
        self.last_part_arrival.take()
    }

    /// Frames written into parts so far.
    pub fn frames_out(&self) -> u64 {
        self.frames_out
    }

    fn build_init(&mut self) -> Option<()> {
        let v = self.info.video.clone()?;
        let (w, h) = crate::media::avc_dimensions(&v.record)
            .or_else(|| Some((self.info.metadata.width?, self.info.metadata.height?)))
            .unwrap_or((0, 0));
        let mut tracks = vec![TrackSpec {
            id: self.video_track,
            timescale: cmaf::VIDEO_TIMESCALE,
            kind: CmafTrack::Video {
                config: v,
                width: w as u16,
                height: h as u16,
            },
        }];
        if let Some(a) = &self.info.audio {
            if a.codec == AudioCodec::Aac {
                self.audio_rate = a.sample_rate.max(1);
                tracks.push(TrackSpec {
                    id: self.audio_track,
                    timescale: self.audio_rate,
                    kind: CmafTrack::Audio(a.clone()),
                });
            } else {
                self.has_audio = false;
            }
        }
        self.init = Some(cmaf::init_segment(&tracks));
        Some(())
    }

    /// Replaces the stream configuration before the first frame (a transcoded rendition learns
    /// its encoder's configuration after its packager exists).
    pub fn set_info(&mut self, info: StreamInfo) {
        if self.init.is_none() {
            self.has_audio = info.audio.is_some();
            self.info = info;
        }
    }

    /// The publisher came back (new epoch) or the codec changed: continue with a discontinuity
    /// and a new init segment. Media sequence numbers continue.
    pub fn restart(&mut self, info: StreamInfo, init_id: u64, now_ms: i64) {
        self.new_timeline(now_ms);
        self.retain_audio(|_| false);
        self.info = info;
        self.has_audio = self.info.audio.is_some();
        if let Some(old) = self.init.take() {
            self.old_inits.push((self.map_uri(), old));
        }
        // A new id even for a codec change within one publishing session.
        self.init_id = init_id.max(self.init_id + 1);
        self.playlist.ended = false;
    }

    /// Closes what is open; the next keyframe starts a segment after EXT-X-DISCONTINUITY.
    fn new_timeline(&mut self, now_ms: i64) {
        self.flush(now_ms);
        self.cut_seg_start = None;
        self.pdt_anchor = None;
        self.audio_next_ticks = None;
        self.pending_discontinuity = true;
    }

    /// Adds a frame. Returns true if the playlist changed.
    pub fn push(&mut self, f: Frame, now_ms: i64) -> bool {
        if self.init.is_none() && self.build_init().is_none() {
            return false; // no video configuration yet
        }
        let sane = |t: i64| t.unsigned_abs() <= MAX_TIMESTAMP_MS as u64;
        // Both within ±2^42, so the difference cannot overflow.
        if !sane(f.dts) || !sane(f.pts) || (f.pts - f.dts).abs() > MAX_CTS_MS {
            self.count_drop("bad_timestamp");
            return false;
        }
        match f.track {
            TrackKind::Audio => {
                if !self.has_audio {
                    return false;
                }
                self.audio_q_bytes += f.data.len() + FRAME_OVERHEAD;
                self.audio_q.push_back(f);
                self.bound_audio();
                self.try_close(now_ms)
            }
            TrackKind::Video => self.push_video(f, now_ms),
        }
    }

    /// Parts made since the last call: (with media, GAP parts).
    pub fn take_parts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.new_parts)
    }

    /// Frames dropped by a bound since the last call, by reason (for a metric and a log line).
    pub fn take_dropped(&mut self) -> Vec<(&'static str, u64)> {
        std::mem::take(&mut self.dropped)
    }

    fn count_drop(&mut self, reason: &'static str) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.dropped.push((reason, 1)),
        }
    }

    /// Audio that runs ahead of the video (or goes on after the video stopped) waits in the
    /// queue for video to place it: keep only the newest `MAX_AUDIO_AHEAD_MS` and
    /// `MAX_AUDIO_QUEUE_BYTES` of it.
    fn bound_audio(&mut self) {
        let newest = self.audio_q.back().map_or(0, |a| a.dts);
        while let Some(a) = self.audio_q.front() {
            if self.audio_q_bytes <= MAX_AUDIO_QUEUE_BYTES && newest - a.dts <= MAX_AUDIO_AHEAD_MS {
                break;
            }
            self.pop_audio();
            self.count_drop("audio_ahead");
        }
    }

    fn pop_audio(&mut self) -> Option<Frame> {
        let a = self.audio_q.pop_front()?;
        self.audio_q_bytes = self
            .audio_q_bytes
            .saturating_sub(a.data.len() + FRAME_OVERHEAD);
        Some(a)
    }

    /// Drops queued audio that `keep` rejects.
    fn retain_audio(&mut self, keep: impl Fn(&Frame) -> bool) -> usize {
        let before = self.audio_q.len();
        self.audio_q.retain(|a| keep(a));
        self.audio_q_bytes = self
            .audio_q
            .iter()
            .map(|a| a.data.len() + FRAME_OVERHEAD)
            .sum();
        before - self.audio_q.len()
    }

    fn push_video(&mut self, f: Frame, now_ms: i64) -> bool {
        let mut changed = false;
        self.video_span = Some(match self.video_span {
            None => (1, f.dts, f.dts),
            Some((n, first, _)) => (n + 1, first, f.dts),
        });
        if let (Some(t), Some(last)) = (self.timing, self.part.last()) {
            let expected = last.dts + t.frame_ms.round() as i64;
            if f.dts < last.dts || f.dts - expected > MAX_GAP_MS {
                changed |= self.timeline_break(f.dts, now_ms);
            } else if f.dts - expected > t.part_target_ms {
                changed |= self.fill_gap(expected, &f);
            }
        }
        if self.cut_seg_start.is_none() && self.part.is_empty() && !f.keyframe {
            return changed; // wait for a keyframe to start
        }
        if self.pdt_anchor.is_none() {
            self.pdt_anchor = Some((f.arrival_us / 1000) as i64 - f.dts);
        }
        if let Some(first) = self.part.first() {
            let timing = *self.timing.get_or_insert_with(|| {
                let fd = (f.dts - first.dts).clamp(5, 200) as f64;
                let n = (f64::from(self.cfg.part_target_ms) / fd).round().max(1.0);
                let t = Timing {
                    frame_ms: fd,
                    part_cut_ms: (n * fd - fd / 2.0).round() as i64,
                    // Millisecond timestamps jitter by 1 ms per frame: declare enough headroom that
                    // no part of n frames exceeds PART-TARGET.
                    part_target_ms: (n * (fd + 1.0)).ceil() as i64 + 1,
                };
                self.playlist.config.part_target = t.part_target_ms as f64 / 1000.0;
                t
            });
            let part_len = f.dts - first.dts;
            let seg_len = f.dts - self.cut_seg_start.unwrap_or(first.dts);
            let target_ms = i64::from(self.cfg.target_duration_s) * 1000;
            let part_full = part_len >= timing.part_cut_ms;
            // At a keyframe once the segment is long enough; with a long GOP, at a part
            // boundary before the segment would round above the target duration.
            let new_segment = (f.keyframe
                && seg_len as f64 >= target_ms as f64 - timing.frame_ms / 2.0)
                || (part_full && seg_len + timing.part_target_ms >= target_ms + 500);
            if new_segment || part_full {
                if self.waiting.is_some() {
                    changed |= self.emit_waiting(); // its audio is late: go without it
                }
                self.waiting = Some(Waiting {
                    video: self.take_part(),
                    end: f.dts,
                    since: now_ms,
                    closes_segment: new_segment,
                });
                if new_segment {
                    self.cut_seg_start = Some(f.dts);
                }
                changed |= self.try_close(now_ms);
            }
        } else if self.cut_seg_start.is_none() {
            self.cut_seg_start = Some(f.dts);
        }
        let size = f.data.len() + FRAME_OVERHEAD;
        if self.part_bytes + size > self.cfg.max_part_bytes {
            // Only timestamps that do not advance (or absurd frame sizes) get here.
            self.count_drop("part_too_large");
            return changed;
        }
        self.part_bytes += size;
        self.part.push(f);
        changed
    }

    fn take_part(&mut self) -> Vec<Frame> {
        self.part_bytes = 0;
        std::mem::take(&mut self.part)
    }

    fn open_segment(&mut self, dts: i64) {
        let msn = self.next_msn;
        self.next_msn += 1;
        self.seg_start_dts = Some(dts);
        let pdt_ms = self.pdt_anchor.unwrap_or(0) + dts;
        let discontinuity = std::mem::take(&mut self.pending_discontinuity);
        self.playlist.segments.push(Segment {
            msn,
            duration: 0.0,
            uri: format!("s{msn}.m4s"),
            pdt_ms,
            discontinuity,
            map_uri: self.map_uri(),
            parts: vec![],
            complete: false,
        });
        self.segments.insert(msn, vec![]);
    }

    fn close_segment(&mut self) -> bool {
        self.seg_start_dts = None;
        let Some(seg) = self.playlist.segments.last_mut() else {
            return false;
        };
        if seg.complete {
            return false;
        }
        seg.complete = true;
        self.playlist.preload_hint = Some(format!("s{}.0.m4s", seg.msn + 1));
        self.trim();
        true
    }

    /// Drops what left the window: segments beyond `window_segments`, part bytes once they are
    /// 3 target durations past the part window (§6.2.2).
    fn trim(&mut self) {
        let complete = self.playlist.segments.iter().filter(|s| s.complete).count();
        let excess = complete.saturating_sub(self.cfg.window_segments);
        for s in self.playlist.segments.drain(..excess) {
            if s.discontinuity {
                self.playlist.discontinuity_sequence += 1;
            }
        }
        let first = self.playlist.segments.first().map_or(0, |s| s.msn);
        // Segment bytes stay one extra window for players that are behind.
        let keep_from = first.saturating_sub(self.cfg.window_segments as u64);
        self.segments = self.segments.split_off(&keep_from);
        // Part tags cover about 3 target durations (3 segments); part bytes stay 3 more.
        let newest = self.playlist.segments.last().map_or(0, |s| s.msn);
        let part_from = newest.saturating_sub(6);
        self.parts = self.parts.split_off(&(part_from, 0));
        let segments = &self.playlist.segments;
        self.old_inits
            .retain(|(uri, _)| segments.iter().any(|s| &s.map_uri == uri));
    }

    /// The source skipped time (frames lost upstream, or a pause in its timestamps): the
    /// media so far goes out, and GAP parts (whole EXT-X-GAP segments for long gaps) fill
    /// `[from, next.dts)` so the timeline and PROGRAM-DATE-TIME stay continuous (§4.4.4.9).
    fn fill_gap(&mut self, from: i64, next: &Frame) -> bool {
        let Some(t) = self.timing else {
            return false;
        };
        self.emit_waiting();
        let video = self.take_part();
        self.emit_part(video, from);
        let target_ms = i64::from(self.cfg.target_duration_s) * 1000;
        // Gap parts divide a segment evenly, each within PART-TARGET.
        let per_segment = (target_ms + t.part_target_ms - 1) / t.part_target_ms;
        let nominal = target_ms / per_segment.max(1);
        let mut cursor = from;
        while cursor < next.dts {
            // Gap parts fill each segment up to the target duration exactly.
            if self
                .seg_start_dts
                .is_some_and(|s| cursor - s + nominal > target_ms)
            {
                self.close_segment();
            }
            if self.seg_start_dts.is_none() {
                self.open_segment(cursor);
            }
            let end = (cursor + nominal).min(next.dts);
            self.push_gap_part(cursor, end);
            cursor = end;
        }
        // Audio of the skipped time cannot be placed without its video.
        let next_dts = next.dts;
        let dropped = self.retain_audio(|a| a.dts >= next_dts);
        self.audio_next_ticks = None;
        if dropped > 0 {
            tracing::debug!(dropped, "audio inside a gap dropped");
        }
        // Media resuming with a keyframe starts a new segment (the short last gap part is then
        // the last part of its segment, which §4.4.4.9 allows).
        if next.keyframe {
            self.close_segment();
        }
        self.cut_seg_start = self.seg_start_dts;
        true
    }

    fn push_gap_part(&mut self, start: i64, end: i64) {
        let seg_start = self.seg_start_dts.unwrap_or(start);
        let Some(seg) = self.playlist.segments.last_mut() else {
            return;
        };
        let idx = seg.parts.len() as u64;
        self.new_parts.1 += 1;
        seg.parts.push(Part {
            duration: (end - start) as f64 / 1000.0,
            independent: false,
            gap: true,
            uri: format!("s{}.{idx}.m4s", seg.msn),
        });
        seg.duration = (end - seg_start) as f64 / 1000.0;
        self.playlist.preload_hint = Some(format!("s{}.{}.m4s", seg.msn, idx + 1));
    }

    /// Timestamps went backwards or jumped too far to fill: what is open goes out, and the
    /// media continues after an EXT-X-DISCONTINUITY from the next keyframe, same init segment.
    fn timeline_break(&mut self, next_dts: i64, now_ms: i64) -> bool {
        tracing::info!(next_dts, "timestamp discontinuity in the source");
        self.new_timeline(now_ms);
        // Keep the audio that belongs to the new timeline.
        let window = 2 * i64::from(self.cfg.target_duration_s) * 1000;
        self.retain_audio(|a| (a.dts - next_dts).abs() < window);
        true
    }

    /// Emits the waiting part if audio has caught up with its end, or waited long enough.
    fn try_close(&mut self, now_ms: i64) -> bool {
        let Some(w) = &self.waiting else {
            return false;
        };
        let audio_ready = !self.has_audio || self.audio_q.back().is_some_and(|a| a.dts >= w.end);
        if audio_ready || now_ms >= w.since + self.cfg.audio_wait_ms as i64 {
            return self.emit_waiting();
        }
        false
    }

    fn emit_waiting(&mut self) -> bool {
        let Some(w) = self.waiting.take() else {
            return false;
        };
        self.emit_part(w.video, w.end);
        if w.closes_segment {
            self.close_segment();
        }
        true
    }

    /// Call periodically: closes a part that waited long enough for audio.
    pub fn tick(&mut self, now_ms: i64) -> bool {
        self.try_close(now_ms)
    }

    fn emit_part(&mut self, video: Vec<Frame>, end: i64) {
        let Some(first) = video.first() else {
            return;
        };
        if self.seg_start_dts.is_none() {
            self.open_segment(first.dts);
        }
        self.last_part_arrival = video.iter().map(|f| f.arrival_us).max();
        let first = &video[0];
        let start = first.dts;
        let independent = first.keyframe;
        let mut runs = vec![];
        let mut samples = Vec::with_capacity(video.len());
        for (i, f) in video.iter().enumerate() {
            let next = video.get(i + 1).map_or(end, |n| n.dts);
            samples.push(Sample {
                duration: u32::try_from((next - f.dts).max(0) * 90).unwrap_or(u32::MAX),
                cts_offset: ((f.pts - f.dts) * 90) as i32,
                sync: f.keyframe,
                data: f.data.clone(),
            });
        }
        runs.push(TrackRun {
            track_id: self.video_track,
            base_decode_time: (start.max(0) * 90) as u64,
            samples,
        });
        let mut frames = video.len() as u64;
        if self.has_audio {
            let mut samples = vec![];
            let mut base = None;
            while self.audio_q.front().is_some_and(|a| a.dts < end) {
                let Some(a) = self.pop_audio() else { break };
                let exact = (a.dts.max(0) as u64).saturating_mul(u64::from(self.audio_rate)) / 1000;
                let ticks = match self.audio_next_ticks {
                    // Keep exact 1024-sample steps unless the timestamps jumped (a gap).
                    Some(t) if t.abs_diff(exact) < 1024 => t,
                    _ => exact,
                };
                base.get_or_insert(ticks);
                self.audio_next_ticks = Some(ticks + 1024);
                samples.push(Sample {
                    duration: 1024,
                    cts_offset: 0,
                    sync: true,
                    data: a.data,
                });
            }
            if let Some(base) = base {
                frames += samples.len() as u64;
                runs.push(TrackRun {
                    track_id: self.audio_track,
                    base_decode_time: base,
                    samples,
                });
            }
        }
        self.frames_out += frames;
        let bytes = cmaf::fragment(self.fragment_seq, &runs);
        self.fragment_seq = self.fragment_seq.wrapping_add(1);
        let Some(seg) = self.playlist.segments.last_mut() else {
            return;
        };
        let idx = seg.parts.len() as u64;
        let duration = (end - start) as f64 / 1000.0;
        self.new_parts.0 += 1;
        seg.parts.push(Part {
            duration,
            independent,
            gap: false,
            uri: format!("s{}.{idx}.m4s", seg.msn),
        });
        seg.duration = (end - self.seg_start_dts.unwrap_or(start)) as f64 / 1000.0;
        self.parts.insert((seg.msn, idx), bytes.clone());
        if let Some(v) = self.segments.get_mut(&seg.msn) {
            v.push(bytes);
        }
        self.playlist.preload_hint = Some(format!("s{}.{}.m4s", seg.msn, idx + 1));
    }

    /// Closes what is open (publisher stopped) without ending the playlist.
    fn flush(&mut self, _now_ms: i64) {
        self.emit_waiting();
        if let Some(last) = self.part.last() {
            let end = last.dts + self.timing.map_or(33, |t| t.frame_ms.round() as i64);
            let video = self.take_part();
            self.emit_part(video, end);
        }
        self.close_segment();
    }

    /// The publisher stopped: close the last part and segment, add EXT-X-ENDLIST.
    pub fn end(&mut self, now_ms: i64) {
        self.flush(now_ms);
        self.playlist.ended = true;
        self.playlist.preload_hint = None;
    }

    /// Part `idx` of segment `msn`.
    pub fn part(&self, msn: u64, idx: u64) -> Lookup {
        if let Some(b) = self.parts.get(&(msn, idx)) {
            return Lookup::Ready(b.clone());
        }
        if !self.playlist.ended && self.is_next_part(msn, idx) {
            return Lookup::Pending;
        }
        Lookup::Missing
    }

    /// Whether (msn, idx) is the part the preload hint names (or will name next: a request may
    /// race the playlist by one part).
    fn is_next_part(&self, msn: u64, idx: u64) -> bool {
        match self.playlist.segments.last() {
            Some(s) if !s.complete => s.msn == msn && idx == s.parts.len() as u64,
            Some(s) => msn == s.msn + 1 && idx == 0,
            None => idx == 0 && msn == self.next_msn,
        }
    }

    /// Whether part `idx` of segment `msn` (the whole segment when None) lies past everything
    /// produced so far: a request for it is early, not for something gone.
    pub fn is_ahead(&self, msn: u64, idx: Option<u64>) -> bool {
        if self.playlist.ended {
            return false;
        }
        match self.playlist.segments.last() {
            None => msn >= self.next_msn,
            Some(s) => {
                msn > s.msn
                    || (msn == s.msn
                        && match idx {
                            Some(i) => i >= s.parts.len() as u64,
                            None => !s.complete,
                        })
            }
        }
    }

    /// Segment `msn`, complete.
    pub fn segment(&self, msn: u64) -> Lookup {
        let complete = self
            .playlist
            .segments
            .iter()
            .find(|s| s.msn == msn)
            .map(|s| s.complete);
        match (self.segments.get(&msn), complete) {
            (Some(parts), Some(true) | None) if !parts.is_empty() => {
                let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
                for p in parts {
                    v.extend_from_slice(p);
                }
                Lookup::Ready(Bytes::from(v))
            }
            (Some(_), Some(false)) => Lookup::Pending,
            _ => Lookup::Missing,
        }
    }

    /// (average, peak) bits per second over the segments in the window (parts so far if
    /// no segment is complete yet).
    pub fn bitrates(&self) -> (u64, u64) {
        let (mut bytes, mut secs, mut peak) = (0usize, 0.0f64, 0u64);
        for s in &self.playlist.segments {
            let Some(parts) = self.segments.get(&s.msn) else {
                continue;
            };
            let b: usize = parts.iter().map(|p| p.len()).sum();
            if s.duration > 0.0 {
                bytes += b;
                secs += s.duration;
                if s.complete {
                    peak = peak.max((b as f64 * 8.0 / s.duration) as u64);
                }
            }
        }
        let avg = if secs > 0.0 {
            (bytes as f64 * 8.0 / secs) as u64
        } else {
            0
        };
        (avg, peak.max(avg))
    }

    /// Video frame rate measured over the stream so far, snapped to a common rate when close.
    pub fn frame_rate(&self) -> Option<f64> {
        let (n, first, last) = self.video_span?;
        if n < 2 || last <= first {
            return None;
        }
        let fps = (n - 1) as f64 * 1000.0 / (last - first) as f64;
        let common = [23.976, 24.0, 25.0, 29.97, 30.0, 48.0, 50.0, 59.94, 60.0];
        let nearest = common
            .into_iter()
            .min_by(|a, b| (fps - a).abs().total_cmp(&(fps - b).abs()))
            .unwrap_or(fps);
        Some(if (fps - nearest).abs() / nearest < 0.005 {
            nearest
        } else {
            (fps * 1000.0).round() / 1000.0
        })
    }

    /// Declared PART-TARGET in seconds.
    pub fn part_target(&self) -> f64 {
        self.playlist.config.part_target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{AudioConfig, VideoCodec, VideoConfig};

    fn info() -> StreamInfo {
        StreamInfo {
            video: Some(VideoConfig {
                codec: VideoCodec::H264,
                record: Bytes::from_static(&[1, 0x64, 0, 0x1f, 0xff, 0xe1, 0]),
            }),
            audio: Some(AudioConfig {
                codec: AudioCodec::Aac,
                config: Bytes::from_static(&[0x11, 0x90]),
                sample_rate: 48_000,
                channels: 2,
            }),
            metadata: Default::default(),
        }
    }

    fn frame(track: TrackKind, dts: i64, key: bool) -> Frame {
        Frame {
            track,
            dts,
            pts: dts,
            keyframe: key,
            arrival_us: 1_700_000_000_000_000 + dts as u64 * 1000,
            data: Bytes::from_static(b"x"),
        }
    }

    /// Feeds `secs` of 30 fps video (GOP `gop` frames) and 48 kHz AAC, interleaved.
    fn feed(p: &mut Packager, secs: i64, gop: i64) {
        feed_frames(p, 0..secs * 30, gop);
    }

    /// Feeds video frames `range` (30 fps, GOP `gop`) and the audio of the same time.
    fn feed_frames(p: &mut Packager, range: std::ops::Range<i64>, gop: i64) {
        let start = (range.start * 1000 + 15) / 30;
        let mut a = (start * 48_000 + 1_023_999) / 1_024_000;
        for i in range {
            let dts = (i * 1000 + 15) / 30;
            while a * 1024 * 1000 / 48_000 <= dts {
                p.push(frame(TrackKind::Audio, a * 1024 * 1000 / 48_000, true), dts);
                a += 1;
            }
            p.push(frame(TrackKind::Video, dts, i % gop == 0), dts);
        }
    }

    #[test]
    fn parts_and_segments_follow_the_rules() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed(&mut p, 9, 60);
        let pl = &p.playlist;
        let pt = pl.config.part_target;
        assert!((0.2..=0.21).contains(&pt), "part target {pt}");
        assert_eq!(p.frame_rate(), Some(30.0));
        let complete: Vec<_> = pl.segments.iter().filter(|s| s.complete).collect();
        assert_eq!(complete.len(), 4);
        for s in &complete {
            assert!((s.duration - 2.0).abs() < 0.002, "segment {}", s.duration);
            assert_eq!(s.parts.len(), 10);
            assert!(s.parts[0].independent);
            let sum: f64 = s.parts.iter().map(|p| p.duration).sum();
            assert!((sum - s.duration).abs() < 1e-9);
            for part in &s.parts {
                // §4.4.4.9: each part at most PART-TARGET and at least 85 % of it.
                assert!(
                    part.duration <= pt && part.duration >= 0.85 * pt,
                    "{}",
                    part.duration
                );
            }
        }
        // PDT advances by segment durations.
        for w in complete.windows(2) {
            assert_eq!(
                w[1].pdt_ms - w[0].pdt_ms,
                (w[0].duration * 1000.0).round() as i64
            );
        }
        assert!(matches!(p.segment(0), Lookup::Ready(_)));
        assert!(matches!(p.part(4, 0), Lookup::Ready(_)));
        let (msn, last) = pl.last_part().unwrap();
        assert_eq!(p.part(msn, last + 1), Lookup::Pending);
        assert_eq!(p.part(msn, last + 2), Lookup::Missing);
        assert_eq!(p.segment(msn), Lookup::Pending);
        assert_eq!(p.segment(msn + 5), Lookup::Missing);
    }

    #[test]
    fn long_gop_segments_stay_within_target_duration() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed(&mut p, 12, 240); // 8 s GOP
                               // 12 s without a keyframe after the first: cut at part boundaries into four complete
                               // segments of 2.4 s (EXTINF rounds to the 2 s target, §4.4.3.1) and the open fifth,
                               // not into one 8 s segment.
        let complete: Vec<&Segment> = p.playlist.segments.iter().filter(|s| s.complete).collect();
        assert_eq!(complete.len(), 4, "{:?}", p.playlist.segments);
        for s in complete {
            assert!(s.duration.round() <= 2.0, "segment of {} s", s.duration);
        }
    }

    #[test]
    fn end_closes_and_window_trims() {
        let cfg = PackagerConfig {
            window_segments: 3,
            ..PackagerConfig::default()
        };
        let mut p = Packager::new(cfg, info(), 7, 1);
        feed(&mut p, 11, 60);
        p.end(20_000);
        let pl = &p.playlist;
        assert!(pl.ended && pl.preload_hint.is_none());
        assert!(pl.segments.iter().all(|s| s.complete));
        assert_eq!(pl.segments.len(), 3);
        assert_eq!(pl.segments.last().unwrap().msn, 7 + 5);
        assert_eq!(p.part(12, 99), Lookup::Missing);
    }

    #[test]
    fn restart_adds_discontinuity_and_new_map() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed(&mut p, 3, 60);
        p.restart(info(), 1, 5000);
        feed(&mut p, 3, 60);
        let d: Vec<_> = p
            .playlist
            .segments
            .iter()
            .filter(|s| s.discontinuity)
            .collect();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].map_uri, "init-2.mp4");
        assert!(p.init_segment("init-2.mp4").is_some());
        // Segments before the discontinuity still decode with the old init segment.
        assert!(p.init_segment("init-1.mp4").is_some());
        feed(&mut p, 30, 60);
        assert!(
            p.init_segment("init-1.mp4").is_none(),
            "freed with its segments"
        );
        let msns: Vec<u64> = p.playlist.segments.iter().map(|s| s.msn).collect();
        assert!(msns.windows(2).all(|w| w[1] == w[0] + 1), "{msns:?}");
    }

    /// Frames lost upstream (a dropped GOP) become GAP parts: the timeline, segment durations
    /// and PROGRAM-DATE-TIME stay continuous and every part keeps within PART-TARGET.
    #[test]
    fn lost_frames_become_gap_parts_4_4_4_9() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed_frames(&mut p, 0..75, 60); // 2.5 s
        feed_frames(&mut p, 120..300, 60); // resumes at the keyframe of 4 s: 1.5 s lost
        let pl = &p.playlist;
        let pt = pl.config.part_target;
        let gaps: Vec<&Part> = pl
            .segments
            .iter()
            .flat_map(|s| &s.parts)
            .filter(|p| p.gap)
            .collect();
        let gap_time: f64 = gaps.iter().map(|p| p.duration).sum();
        assert!(
            (gap_time - 1.5).abs() < 0.002,
            "gap parts cover {gap_time} s"
        );
        assert!(gaps.iter().all(|g| g.duration <= pt && !g.independent));
        // 0–2.5 s and 4–10 s of media: the segment at 2 s is cut at PART-TARGET boundaries
        // of the gap (1.9 s) and a 0.1 s gap segment ends at the keyframe of 4 s; 4 and 6 s
        // complete, 8 s still open.
        let durations: Vec<f64> = pl.segments.iter().map(|s| s.duration).collect();
        let complete = pl.segments.iter().filter(|s| s.complete).count();
        assert_eq!(complete, 5, "{durations:?}");
        let until_resume: f64 = durations[..3].iter().sum();
        assert!((until_resume - 4.0).abs() < 0.002, "{durations:?}");
        for s in pl.segments.iter().filter(|s| s.complete) {
            assert!(s.duration.round() <= 2.0, "segment of {} s", s.duration);
            let sum: f64 = s.parts.iter().map(|p| p.duration).sum();
            assert!((sum - s.duration).abs() < 1e-9);
        }
        for w in pl.segments.windows(2) {
            assert_eq!(
                w[1].pdt_ms - w[0].pdt_ms,
                (w[0].duration * 1000.0).round() as i64
            );
        }
        // The media after the gap starts a segment with an independent part.
        let resumed = pl
            .segments
            .iter()
            .find(|s| s.pdt_ms - pl.segments[0].pdt_ms == 4000);
        let resumed = resumed.expect("a segment starting at 4 s");
        assert!(resumed.parts[0].independent && !resumed.parts[0].gap);
        // Gap parts have no file.
        let (msn, idx) = pl
            .segments
            .iter()
            .find_map(|s| {
                s.parts
                    .iter()
                    .position(|p| p.gap)
                    .map(|i| (s.msn, i as u64))
            })
            .unwrap();
        assert_eq!(p.part(msn, idx), Lookup::Missing);
        let text = pl.render(false, &[]);
        assert!(text.contains(",GAP=YES\n"), "{text}");
        assert!(!pl.segments.iter().any(|s| s.discontinuity));
    }

    /// A gap longer than a segment leaves whole segments of gap parts: EXT-X-GAP (§4.4.4.7).
    #[test]
    fn long_gap_makes_gap_segments_4_4_4_7() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed_frames(&mut p, 0..60, 60);
        feed_frames(&mut p, 240..420, 60); // 6 s missing
        let gap_segs: Vec<&Segment> = p.playlist.segments.iter().filter(|s| s.is_gap()).collect();
        // Media 0–2 s and 8–14 s: the segments at 2, 4 and 6 s are all gap.
        assert_eq!(gap_segs.len(), 3, "{:?}", p.playlist.segments);
        let complete = p.playlist.segments.iter().filter(|s| s.complete).count();
        assert_eq!(complete, 6, "{:?}", p.playlist.segments);
        assert_eq!(p.segment(gap_segs[0].msn), Lookup::Missing);
        let text = p.playlist.render(false, &[]);
        let uri = &gap_segs[0].uri;
        assert!(
            text.contains(&format!("#EXT-X-GAP\n#EXTINF:2.000,\n{uri}\n")),
            "{text}"
        );
        for s in p.playlist.segments.iter().filter(|s| s.complete) {
            assert!(s.duration.round() <= 2.0, "segment of {} s", s.duration);
        }
    }

    /// Timestamps that go backwards, or jump further than a gap is worth filling, continue
    /// after a discontinuity from the next keyframe, with continuing media sequence numbers.
    #[test]
    fn timestamp_jumps_become_discontinuities() {
        for resume in [30i64, 30 * 60] {
            let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
            feed_frames(&mut p, 300..390, 60);
            feed_frames(&mut p, resume..resume + 150, 60);
            let segs = &p.playlist.segments;
            assert_eq!(
                segs.iter().filter(|s| s.discontinuity).count(),
                1,
                "{segs:?}"
            );
            assert!(!segs.iter().flat_map(|s| &s.parts).any(|p| p.gap));
            assert!(segs.windows(2).all(|w| w[1].msn == w[0].msn + 1));
            let d = segs.iter().find(|s| s.discontinuity).unwrap();
            assert!(d.parts[0].independent);
            assert_eq!(d.map_uri, "init-1.mp4", "same init segment");
        }
    }

    #[test]
    fn buffers_are_bounded_whatever_the_timestamps() {
        let mut p = Packager::new(PackagerConfig::default(), info(), 0, 1);
        feed(&mut p, 3, 60);
        assert!(p.take_dropped().is_empty());
        // Audio that runs on after the video stopped: at most MAX_AUDIO_AHEAD_MS is held.
        for i in 0..20_000i64 {
            p.push(frame(TrackKind::Audio, 3_000 + i * 21, true), 3_000);
        }
        let span = p.audio_q.back().unwrap().dts - p.audio_q.front().unwrap().dts;
        assert!(span <= MAX_AUDIO_AHEAD_MS, "audio span {span}");
        let dropped = p.take_dropped();
        assert!(
            matches!(dropped[..], [("audio_ahead", n)] if n > 10_000),
            "{dropped:?}"
        );
        // Audio with one timestamp forever: the byte bound holds.
        let big = Bytes::from(vec![0u8; 4096]);
        for _ in 0..5_000 {
            let mut a = frame(TrackKind::Audio, 500_000, true);
            a.data = big.clone();
            p.push(a, 3_000);
        }
        assert!(p.audio_q_bytes <= MAX_AUDIO_QUEUE_BYTES);
        assert_eq!(
            p.audio_q_bytes,
            p.audio_q
                .iter()
                .map(|a| a.data.len() + FRAME_OVERHEAD)
                .sum::<usize>()
        );
        // Video whose timestamps never advance never closes its part: bounded too.
        let cfg = PackagerConfig {
            max_part_bytes: 1 << 20,
            ..PackagerConfig::default()
        };
        let mut v = Packager::new(cfg, info(), 0, 1);
        for i in 0..5_000 {
            let mut f = frame(TrackKind::Video, 1_000, i == 0);
            f.data = big.clone();
            v.push(f, 1_000);
        }
        assert!(v.part_bytes <= 1 << 20);
        assert_eq!(v.take_dropped()[0].0, "part_too_large");
        // Absurd timestamps are refused, not multiplied.
        for (dts, pts) in [
            (i64::MAX, i64::MAX),
            (0, i64::MAX),
            (i64::MIN, 0),
            (0, 120_000),
        ] {
            let mut f = frame(TrackKind::Video, 0, true);
            f.dts = dts;
            f.pts = pts;
            assert!(!v.push(f, 2_000));
        }
        assert_eq!(v.take_dropped(), vec![("bad_timestamp", 4)]);
    }
}
