//! The ABR ladder: decode a stream's H.264 once, scale it per rendition, encode each rendition
//! with libx264 (ffmpeg-next against the system FFmpeg), keyframes forced on exactly the source's
//! keyframes so every rendition's segments and parts line up with the source's.
//!
//! Threads, never the async runtime: one decode-and-scale thread per stream, one encoder thread
//! per rendition, bounded channels between them. The async side pushes frames with `try_send`
//! (never blocks) and receives encoded frames on a bounded tokio channel. When the ladder falls
//! behind real time it sheds load: the most expensive rendition (most pixels) stops first, and a
//! full input queue drops source frames up to the next keyframe (the packager turns the hole into
//! GAP parts). Both are logged and counted.

use crate::config::TranscodeConfig;
use crate::media::{
    AudioCodec, AudioConfig, Frame, StreamInfo, TrackKind, VideoCodec, VideoConfig,
};
use crate::telemetry::CoreMetrics;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use ffmpeg_next as ff;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// One rendition of the ladder.
#[derive(Debug, Clone, PartialEq)]
pub struct Rung {
    /// Name in URLs (e.g. "480p").
    pub name: String,
    /// Output size (even numbers).
    pub width: u32,
    pub height: u32,
    /// Video bitrate, kbit/s.
    pub video_kbps: u32,
}

/// The rungs for a source of `src` size: each asked-for height below the source's, width from
/// the source aspect ratio, both even. Never upscales; the source itself is always a rendition.
pub fn plan(src: (u32, u32), wanted: &[(String, u32, u32)]) -> Vec<Rung> {
    let (sw, sh) = src;
    let mut out: Vec<Rung> = wanted
        .iter()
        .filter(|(_, h, _)| *h < sh && *h >= 16)
        .map(|(name, h, kbps)| {
            let w = ((u64::from(sw) * u64::from(*h) / u64::from(sh.max(1))) as u32 + 1) & !1;
            Rung {
                name: name.clone(),
                width: w.max(16),
                height: *h & !1,
                video_kbps: *kbps,
            }
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.height));
    out.dedup_by(|a, b| a.height == b.height);
    out
}

/// Splits Annex B data (start codes) into NAL units.
pub fn annexb_nals(data: &[u8]) -> Vec<&[u8]> {
    let mut nals = vec![];
    let mut i = 0;
    let mut start: Option<usize> = None;
    while i + 3 <= data.len() {
        let sc3 = data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1;
        if sc3 {
            if let Some(s) = start {
                let mut end = i;
                while end > s && data[end - 1] == 0 {
                    end -= 1; // trailing zero of a 4-byte start code
                }
                nals.push(&data[s..end]);
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        if s < data.len() {
            nals.push(&data[s..]);
        }
    }
    nals
}

/// Length-prefixed (4 bytes) NAL units, as MP4 and FLV carry them.
pub fn to_length_prefixed(nals: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(nals.iter().map(|n| n.len() + 4).sum());
    for n in nals {
        v.extend_from_slice(&(n.len() as u32).to_be_bytes());
        v.extend_from_slice(n);
    }
    v
}

/// An AVCDecoderConfigurationRecord from one SPS and one PPS.
pub fn avcc_record(sps: &[u8], pps: &[u8]) -> Option<Bytes> {
    if sps.len() < 4 || pps.is_empty() {
        return None;
    }
    let mut v = vec![1, sps[1], sps[2], sps[3], 0xFF, 0xE1];
    v.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    v.extend_from_slice(sps);
    v.push(1);
    v.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    v.extend_from_slice(pps);
    Some(Bytes::from(v))
}

/// What the ladder sends back to the async side.
#[derive(Debug)]
pub enum Output {
    /// Rendition `index`'s decoder configuration (sent before its first frame).
    Config(usize, VideoConfig),
    /// An encoded frame of rendition `index`.
    Frame(usize, Frame),
    /// Rendition `index` stopped (shed under load, or failed).
    Stopped(usize),
}

struct Decoded {
    frame: ff::frame::Video,
    pts: i64,
    /// The source's decode delay (pts − dts of its keyframes): applied to the rendition's dts
    /// so that fragments start at the same decode time as the source's.
    delay: i64,
    key: bool,
    arrival_us: u64,
}

/// A running ladder for one stream.
pub struct Ladder {
    input: SyncSender<Frame>,
    /// Rungs, in order (index = rendition index in `Output`).
    pub rungs: Vec<Rung>,
    /// Dropping source frames until the next keyframe (input queue was full).
    skipping: bool,
    stream: String,
    metrics: CoreMetrics,
}

/// Frames queued before the decoder (about 4 s at 30 fps): enough to absorb hiccups.
const INPUT_QUEUE: usize = 120;
/// Decoded frames queued per encoder.
const ENCODE_QUEUE: usize = 30;
/// Behind real time by this much (µs, arrival at the edge to encoder input) → shed a rung.
const SHED_LAG_US: u64 = 1_500_000;

impl Ladder {
    /// Starts the ladder for a stream whose H.264 configuration is in `info`. `out` receives
    /// configurations and encoded frames.
    pub fn start(
        stream: &str,
        info: &StreamInfo,
        cfg: &TranscodeConfig,
        out: tokio::sync::mpsc::Sender<Output>,
        metrics: CoreMetrics,
    ) -> Result<Option<Self>> {
        let Some(v) = &info.video else {
            return Ok(None);
        };
        if v.codec != VideoCodec::H264 {
            warn!("transcoding supports H.264 sources only; serving the source rendition alone");
            return Ok(None);
        }
        let Some(src) = crate::media::avc_dimensions(&v.record) else {
            return Err(anyhow!("cannot read the source picture size from its SPS"));
        };
        let rungs = plan(src, &cfg.wanted());
        if rungs.is_empty() {
            return Ok(None);
        }
        ff::init().context("initialising FFmpeg")?;
        // FFmpeg's own messages (x264 statistics at close, warnings) only when they matter.
        ff::util::log::set_level(ff::util::log::Level::Error);
        let fps = info
            .metadata
            .frame_rate
            .filter(|f| *f > 0.0 && *f <= 240.0)
            .unwrap_or(30.0);
        let (in_tx, in_rx) = sync_channel::<Frame>(INPUT_QUEUE);
        let mut enc_txs = vec![];
        let stop: Vec<Arc<AtomicBool>> = rungs.iter().map(|_| Arc::default()).collect();
        for (i, r) in rungs.iter().enumerate() {
            let (tx, rx) = sync_channel::<Decoded>(ENCODE_QUEUE);
            enc_txs.push(tx);
            let out = out.clone();
            let m = metrics.clone();
            let name = stream.to_string();
            let rung = r.clone();
            let cfg = cfg.clone();
            let stop_i = stop[i].clone();
            // Opening x264 takes a while (and is FFmpeg work): on the encoder's own thread.
            std::thread::Builder::new()
                .name(format!("enc-{}", r.name))
                .spawn(move || match Encoder::open(&rung, fps, &cfg) {
                    Ok(enc) => {
                        if out.blocking_send(Output::Config(i, enc.config.clone())).is_ok() {
                            enc.run(i, rx, out, m, &name, &rung.name, stop_i);
                        }
                    }
                    Err(e) => {
                        warn!(stream = %name, rendition = %rung.name, error = %e, "cannot open the encoder");
                        let _ = out.blocking_send(Output::Stopped(i));
                    }
                })
                .context("spawning an encoder thread")?;
        }
        let record = v.record.clone();
        let rungs2 = rungs.clone();
        let m = metrics.clone();
        let name = stream.to_string();
        std::thread::Builder::new()
            .name("decode".into())
            .spawn(move || {
                if let Err(e) =
                    decode_loop(&record, in_rx, &rungs2, enc_txs, &stop, &out, &m, &name)
                {
                    warn!(stream = %name, error = %e, "transcoder stopped");
                }
            })
            .context("spawning the decode thread")?;
        info!(
            stream,
            renditions = ?rungs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            "transcoding ladder started"
        );
        Ok(Some(Ladder {
            input: in_tx,
            rungs,
            skipping: false,
            stream: stream.to_string(),
            metrics,
        }))
    }

    /// Queues a source video frame, waiting for room (benchmarks feeding a file as fast as
    /// the ladder goes; live input uses `push`).
    pub fn push_wait(&self, f: &Frame) {
        if f.track == TrackKind::Video {
            let _ = self.input.send(f.clone());
        }
    }

    /// Queues a source video frame without blocking. A full queue means the ladder is far
    /// behind: frames are dropped up to the next keyframe.
    pub fn push(&mut self, f: &Frame) {
        if f.track != TrackKind::Video {
            return;
        }
        if self.skipping && !f.keyframe {
            self.metrics
                .transcode_dropped
                .with_label_values(&[&self.stream])
                .inc();
            return;
        }
        self.skipping = false;
        match self.input.try_send(f.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                warn!(stream = %self.stream, "transcoder input full: dropping source frames to the next keyframe");
                self.skipping = true;
                self.metrics
                    .transcode_dropped
                    .with_label_values(&[&self.stream])
                    .inc();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_loop(
    record: &[u8],
    input: Receiver<Frame>,
    rungs: &[Rung],
    encoders: Vec<SyncSender<Decoded>>,
    stop: &[Arc<AtomicBool>],
    out: &tokio::sync::mpsc::Sender<Output>,
    metrics: &CoreMetrics,
    stream: &str,
) -> Result<()> {
    let codec =
        ff::decoder::find(ff::codec::Id::H264).ok_or_else(|| anyhow!("no H.264 decoder"))?;
    let mut ctx = ff::codec::context::Context::new_with_codec(codec);
    set_extradata(&mut ctx, record);
    // Slice threads only: frame threads would add a frame of delay per thread.
    ctx.set_threading(ff::codec::threading::Config {
        kind: ff::codec::threading::Type::Slice,
        count: 2,
        ..Default::default()
    });
    let mut dec = ctx.decoder().video().context("opening the H.264 decoder")?;
    dec.set_packet_time_base((1, 1000));
    let mut arrivals: HashMap<i64, (u64, bool)> = HashMap::new();
    let mut scalers: Vec<Option<ff::software::scaling::Context>> =
        rungs.iter().map(|_| None).collect();
    let mut alive: Vec<bool> = rungs.iter().map(|_| true).collect();
    let mut decoded = ff::frame::Video::empty();
    let frames_in = metrics.transcode_frames_in.with_label_values(&[stream]);
    let mut delay = 0;
    let mut last_arrival = 0;
    loop {
        // End of input: drain the frames the decoder still holds (reordering delay).
        let next = input.recv().ok();
        match &next {
            Some(f) => {
                frames_in.inc();
                if f.keyframe {
                    delay = f.pts.saturating_sub(f.dts).clamp(0, 1000);
                }
                last_arrival = f.arrival_us;
                arrivals.insert(f.pts, (f.arrival_us, f.keyframe));
                let mut pkt = ff::Packet::copy(&f.data);
                pkt.set_pts(Some(f.pts));
                pkt.set_dts(Some(f.dts));
                if f.keyframe {
                    pkt.set_flags(ff::packet::Flags::KEY);
                }
                if dec.send_packet(&pkt).is_err() {
                    metrics.transcode_dropped.with_label_values(&[stream]).inc();
                    continue; // a corrupt frame: the decoder recovers at the next keyframe
                }
            }
            None => {
                let _ = dec.send_eof();
            }
        }
        while dec.receive_frame(&mut decoded).is_ok() {
            let Some(pts) = decoded.timestamp().or(decoded.pts()) else {
                continue;
            };
            let (arrival_us, src_key) = arrivals.remove(&pts).unwrap_or((last_arrival, false));
            if arrivals.len() > 256 {
                arrivals.retain(|p, _| *p > pts);
            }
            // Shed the most expensive rendition still running when far behind real time.
            let lag = crate::media::now_unix_us().saturating_sub(arrival_us);
            if lag > SHED_LAG_US {
                if let Some(i) = alive.iter().position(|a| *a) {
                    alive[i] = false;
                    stop[i].store(true, Ordering::Relaxed);
                    warn!(stream, rendition = %rungs[i].name, lag_ms = lag / 1000, "transcoding behind real time: shedding a rendition");
                    metrics
                        .transcode_shed
                        .with_label_values(&[stream, &rungs[i].name])
                        .inc();
                    let _ = out.blocking_send(Output::Stopped(i));
                }
            }
            for (i, r) in rungs.iter().enumerate() {
                if !alive[i] {
                    continue;
                }
                let sws = match &mut scalers[i] {
                    Some(s) => s,
                    slot => {
                        let s = ff::software::scaling::Context::get(
                            decoded.format(),
                            decoded.width(),
                            decoded.height(),
                            ff::format::Pixel::YUV420P,
                            r.width,
                            r.height,
                            ff::software::scaling::Flags::BILINEAR,
                        )
                        .context("creating a scaler")?;
                        slot.insert(s)
                    }
                };
                let mut scaled = ff::frame::Video::empty();
                if sws.run(&decoded, &mut scaled).is_err() {
                    continue;
                }
                let d = Decoded {
                    frame: scaled,
                    pts,
                    delay,
                    key: src_key || decoded.is_key(),
                    arrival_us,
                };
                if encoders[i].send(d).is_err() {
                    alive[i] = false;
                }
            }
        }
        if next.is_none() {
            return Ok(()); // dropping the encoder channels lets them drain too
        }
    }
}

fn set_extradata(ctx: &mut ff::codec::context::Context, data: &[u8]) {
    // SAFETY: the buffer is allocated with av_mallocz including the padding FFmpeg requires,
    // and ownership passes to the codec context, which frees it.
    unsafe {
        let pad = ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
        let buf = ff::ffi::av_mallocz(data.len() + pad) as *mut u8;
        if buf.is_null() {
            return;
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len());
        let c = ctx.as_mut_ptr();
        (*c).extradata = buf;
        (*c).extradata_size = data.len() as i32;
    }
}

struct Encoder {
    enc: ff::encoder::Video,
    config: VideoConfig,
}

impl Encoder {
    fn open(r: &Rung, fps: f32, cfg: &TranscodeConfig) -> Result<Self> {
        let codec = ff::encoder::find_by_name("libx264")
            .ok_or_else(|| anyhow!("libx264 is not available in this FFmpeg build"))?;
        let ctx = ff::codec::context::Context::new_with_codec(codec);
        let mut e = ctx.encoder().video()?;
        e.set_width(r.width);
        e.set_height(r.height);
        e.set_format(ff::format::Pixel::YUV420P);
        e.set_time_base((1, 1000));
        let fps_num = (fps * 1000.0).round() as i32;
        e.set_frame_rate(Some((fps_num, 1000)));
        e.set_bit_rate(r.video_kbps as usize * 1000);
        e.set_max_bit_rate(r.video_kbps as usize * 1100);
        e.set_max_b_frames(0);
        // Keyframes only where forced (the source's keyframes).
        e.set_gop(100_000);
        e.set_flags(ff::codec::Flags::GLOBAL_HEADER);
        let mut o = ff::Dictionary::new();
        o.set("preset", &cfg.preset);
        o.set("tune", "zerolatency");
        o.set("forced-idr", "1");
        o.set("bufsize", &(r.video_kbps * 1000).to_string());
        o.set("x264-params", "scenecut=0:open-gop=0:bframes=0");
        if cfg.threads > 0 {
            o.set("threads", &cfg.threads.to_string());
        }
        let enc = e.open_with(o).context("opening libx264")?;
        // SAFETY: reading the extradata FFmpeg filled in at open (GLOBAL_HEADER).
        let extradata = unsafe {
            let c = enc.as_ptr();
            if (*c).extradata.is_null() || (*c).extradata_size <= 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts((*c).extradata, (*c).extradata_size as usize).to_vec()
            }
        };
        let nals = annexb_nals(&extradata);
        let sps = nals.iter().find(|n| !n.is_empty() && n[0] & 0x1F == 7);
        let pps = nals.iter().find(|n| !n.is_empty() && n[0] & 0x1F == 8);
        let record = match (sps, pps) {
            (Some(s), Some(p)) => avcc_record(s, p),
            _ => None,
        }
        .ok_or_else(|| anyhow!("libx264 gave no SPS/PPS"))?;
        Ok(Encoder {
            enc,
            config: VideoConfig {
                codec: VideoCodec::H264,
                record,
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        mut self,
        index: usize,
        input: Receiver<Decoded>,
        out: tokio::sync::mpsc::Sender<Output>,
        metrics: CoreMetrics,
        stream: &str,
        rendition: &str,
        stop: Arc<AtomicBool>,
    ) {
        let frames_out = metrics
            .transcode_frames_out
            .with_label_values(&[stream, rendition]);
        let latency = metrics.transcode_latency.with_label_values(&[rendition]);
        let mut pending: HashMap<i64, (u64, Instant)> = HashMap::new();
        let fps = metrics
            .transcode_fps
            .with_label_values(&[stream, rendition]);
        let speed = metrics
            .transcode_speed
            .with_label_values(&[stream, rendition]);
        let mut window = (
            Instant::now(),
            0u32,
            std::time::Duration::ZERO,
            None::<i64>,
            0i64,
        );
        let mut pkt = ff::Packet::empty();
        let mut last = (0u64, 0i64);
        loop {
            let next = input.recv().ok();
            let ended = next.is_none();
            match next {
                Some(mut d) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    d.frame.set_pts(Some(d.pts));
                    d.frame.set_kind(if d.key {
                        ff::picture::Type::I
                    } else {
                        ff::picture::Type::None
                    });
                    pending.insert(d.pts, (d.arrival_us, Instant::now()));
                    last = (d.arrival_us, d.delay);
                    // Per-second window: frames, encoder busy time, media time covered.
                    window.1 += 1;
                    window.3.get_or_insert(d.pts);
                    window.4 = d.pts;
                    if window.0.elapsed() >= std::time::Duration::from_secs(1) {
                        let wall = window.0.elapsed().as_secs_f64();
                        fps.set(f64::from(window.1) / wall);
                        let media = (window.4 - window.3.unwrap_or(window.4)) as f64 / 1000.0;
                        if window.2 > std::time::Duration::ZERO && media > 0.0 {
                            speed.set(media / window.2.as_secs_f64());
                        }
                        window = (Instant::now(), 0, std::time::Duration::ZERO, None, 0);
                    }
                    let busy = Instant::now();
                    let sent = self.enc.send_frame(&d.frame);
                    window.2 += busy.elapsed();
                    if sent.is_err() {
                        warn!(stream, rendition, "encoder refused a frame");
                        continue;
                    }
                }
                None => {
                    let _ = self.enc.send_eof();
                }
            }
            while self.enc.receive_packet(&mut pkt).is_ok() {
                let Some(data) = pkt.data() else { continue };
                let Some(pts) = pkt.pts() else { continue };
                // No B-frames: x264's dts equals pts; shift it by the source's decode delay.
                let dts = pkt.dts().unwrap_or(pts) - last.1;
                let (arrival_us, started) =
                    pending.remove(&pts).unwrap_or((last.0, Instant::now()));
                if pending.len() > 64 {
                    pending.retain(|p, _| *p > pts);
                }
                latency.observe(started.elapsed().as_secs_f64());
                let nals = annexb_nals(data);
                let frame = Frame {
                    track: TrackKind::Video,
                    dts,
                    pts,
                    keyframe: pkt.is_key(),
                    arrival_us,
                    data: Bytes::from(to_length_prefixed(&nals)),
                };
                frames_out.inc();
                if out.blocking_send(Output::Frame(index, frame)).is_err() {
                    return; // the stream is gone
                }
            }
            if ended {
                return; // drained
            }
        }
    }
}

/// Encodes a non-AAC audio track (MP3) to AAC, on its own thread: LL-HLS players expect AAC in
/// CMAF. The AAC configuration is known as soon as the encoder opens, so the packagers never
/// see the original codec.
pub struct AudioToAac {
    input: SyncSender<Frame>,
    /// The AAC configuration every rendition carries.
    pub config: AudioConfig,
}

impl AudioToAac {
    /// Opens the AAC encoder for `src` and starts the conversion; encoded frames go to `out`.
    pub fn start(src: &AudioConfig, out: tokio::sync::mpsc::Sender<Frame>) -> Result<Self> {
        let id = match src.codec {
            AudioCodec::Mp3 => ff::codec::Id::MP3,
            AudioCodec::Aac => return Err(anyhow!("already AAC")),
        };
        ff::init().context("initialising FFmpeg")?;
        ff::util::log::set_level(ff::util::log::Level::Error);
        let rate = src.sample_rate.clamp(8000, 96_000);
        let channels = i32::from(src.channels.clamp(1, 2));
        let layout = ff::ChannelLayout::default(channels);
        let planar = ff::format::Sample::F32(ff::format::sample::Type::Planar);
        let codec =
            ff::encoder::find(ff::codec::Id::AAC).ok_or_else(|| anyhow!("no AAC encoder"))?;
        let mut e = ff::codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()?;
        e.set_rate(rate as i32);
        e.set_channel_layout(layout);
        e.set_format(planar);
        e.set_bit_rate(128_000);
        e.set_time_base((1, rate as i32));
        e.set_flags(ff::codec::Flags::GLOBAL_HEADER);
        let enc = e.open_as(codec).context("opening the AAC encoder")?;
        // SAFETY: reading the AudioSpecificConfig FFmpeg filled in at open (GLOBAL_HEADER).
        let asc = unsafe {
            let c = enc.as_ptr();
            if (*c).extradata.is_null() || (*c).extradata_size <= 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts((*c).extradata, (*c).extradata_size as usize).to_vec()
            }
        };
        if asc.len() < 2 {
            return Err(anyhow!("the AAC encoder gave no AudioSpecificConfig"));
        }
        let config = AudioConfig {
            codec: AudioCodec::Aac,
            config: Bytes::from(asc),
            sample_rate: rate,
            channels: channels as u8,
        };
        let (tx, rx) = sync_channel::<Frame>(256);
        std::thread::Builder::new()
            .name("audio-aac".into())
            .spawn(move || {
                if let Err(e) = audio_loop(id, enc, rate, layout, rx, out) {
                    warn!(error = %e, "audio conversion stopped");
                }
            })
            .context("spawning the audio thread")?;
        Ok(AudioToAac { input: tx, config })
    }

    /// Queues a source audio frame without blocking (dropped if the converter is far behind).
    pub fn push(&self, f: Frame) {
        let _ = self.input.try_send(f);
    }
}

fn audio_loop(
    id: ff::codec::Id,
    mut enc: ff::encoder::Audio,
    rate: u32,
    layout: ff::ChannelLayout,
    input: Receiver<Frame>,
    out: tokio::sync::mpsc::Sender<Frame>,
) -> Result<()> {
    let codec = ff::decoder::find(id).ok_or_else(|| anyhow!("no decoder for the source audio"))?;
    let mut dec = ff::codec::context::Context::new_with_codec(codec)
        .decoder()
        .audio()?;
    dec.set_packet_time_base((1, 1000));
    let planar = ff::format::Sample::F32(ff::format::sample::Type::Planar);
    let channels = layout.channels() as usize;
    let mut resampler: Option<ff::software::resampling::Context> = None;
    // Samples waiting to fill a 1024-sample AAC frame, per channel.
    let mut fifo: Vec<Vec<f32>> = vec![vec![]; channels];
    let mut base_ms: Option<i64> = None;
    let mut sent: i64 = 0;
    let mut decoded = ff::frame::Audio::empty();
    let mut pkt_out = ff::Packet::empty();
    while let Ok(f) = input.recv() {
        let arrival = f.arrival_us;
        base_ms.get_or_insert(f.dts);
        let mut pkt = ff::Packet::copy(&f.data);
        pkt.set_pts(Some(f.dts));
        pkt.set_dts(Some(f.dts));
        if dec.send_packet(&pkt).is_err() {
            continue;
        }
        while dec.receive_frame(&mut decoded).is_ok() {
            if decoded.channel_layout().is_empty() {
                decoded
                    .set_channel_layout(ff::ChannelLayout::default(i32::from(decoded.channels())));
            }
            let rs = match &mut resampler {
                Some(r) => r,
                slot => slot.insert(ff::software::resampling::Context::get(
                    decoded.format(),
                    decoded.channel_layout(),
                    decoded.rate(),
                    planar,
                    layout,
                    rate,
                )?),
            };
            let mut converted = ff::frame::Audio::empty();
            if rs.run(&decoded, &mut converted).is_err() {
                continue;
            }
            for (c, q) in fifo.iter_mut().enumerate() {
                q.extend_from_slice(&converted.plane::<f32>(c)[..converted.samples()]);
            }
            while fifo[0].len() >= 1024 {
                let mut frame = ff::frame::Audio::new(planar, 1024, layout);
                frame.set_rate(rate);
                for (c, q) in fifo.iter_mut().enumerate() {
                    frame.plane_mut::<f32>(c)[..1024].copy_from_slice(&q[..1024]);
                    q.drain(..1024);
                }
                frame.set_pts(Some(sent));
                sent += 1024;
                if enc.send_frame(&frame).is_err() {
                    continue;
                }
                while enc.receive_packet(&mut pkt_out).is_ok() {
                    let Some(data) = pkt_out.data() else { continue };
                    let pts = pkt_out.pts().unwrap_or(0).max(0);
                    let ms = base_ms.unwrap_or(0) + pts * 1000 / i64::from(rate);
                    let frame = Frame {
                        track: TrackKind::Audio,
                        dts: ms,
                        pts: ms,
                        keyframe: true,
                        arrival_us: arrival,
                        data: Bytes::copy_from_slice(data),
                    };
                    if out.blocking_send(frame).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_never_upscales_and_keeps_the_aspect_ratio() {
        let wanted = vec![
            ("1080p".to_string(), 1080, 5000),
            ("720p".to_string(), 720, 2800),
            ("480p".to_string(), 480, 1400),
            ("360p".to_string(), 360, 800),
        ];
        let r = plan((1280, 720), &wanted);
        let names: Vec<&str> = r.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["480p", "360p"]);
        assert_eq!((r[0].width, r[0].height), (854, 480));
        assert_eq!((r[1].width, r[1].height), (640, 360));
        assert!(plan((320, 240), &wanted).is_empty());
        // 4:3 and odd results round to even sizes.
        let r = plan((1440, 1080), &wanted);
        assert_eq!((r[0].width, r[0].height), (960, 720));
    }

    #[test]
    fn annexb_to_length_prefixed() {
        let annexb = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 9, 9,
        ];
        let nals = annexb_nals(&annexb);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 9, 9][..]]
        );
        assert_eq!(
            to_length_prefixed(&nals),
            [0, 0, 0, 3, 0x67, 1, 2, 0, 0, 0, 2, 0x68, 3, 0, 0, 0, 3, 0x65, 9, 9]
        );
        let rec = avcc_record(&[0x67, 0x64, 0, 0x1f], &[0x68, 1]).unwrap();
        assert_eq!(
            &rec[..],
            [1, 0x64, 0, 0x1f, 0xFF, 0xE1, 0, 4, 0x67, 0x64, 0, 0x1f, 1, 0, 2, 0x68, 1]
        );
        assert!(annexb_nals(&[]).is_empty());
    }
}
