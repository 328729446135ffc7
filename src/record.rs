//! Debug recording: writes every stream a core receives to an FLV file, so that what arrived
//! can be inspected with ffprobe. The file is `NAME-EPOCH.flv.part` while the stream is live
//! and is renamed to `NAME-EPOCH.flv` when it ends.
//!
//! File IO runs on a blocking thread, never on the async runtime.

use crate::media::{AudioCodec, Frame, StreamInfo, TrackKind, VideoCodec};
use crate::relay::receiver::{LiveStream, StreamEvent};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Serializes FLV tags. Pure apart from the `Write` it is given.
pub struct FlvWriter<W: Write> {
    out: W,
    last_ts: u32,
}

impl<W: Write> FlvWriter<W> {
    /// Writes the FLV header (audio and video flags set).
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(&[b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 9, 0, 0, 0, 0])?;
        Ok(FlvWriter { out, last_ts: 0 })
    }

    fn tag(&mut self, kind: u8, ts: u32, parts: &[&[u8]]) -> std::io::Result<()> {
        let size: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = [0u8; 11];
        h[0] = kind;
        h[1..4].copy_from_slice(&(size as u32).to_be_bytes()[1..]);
        h[4..7].copy_from_slice(&ts.to_be_bytes()[1..]);
        h[7] = (ts >> 24) as u8;
        self.out.write_all(&h)?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.out.write_all(&((size + 11) as u32).to_be_bytes())
    }

    /// Writes sequence headers for the given configuration.
    pub fn write_info(&mut self, info: &StreamInfo) -> std::io::Result<()> {
        let ts = self.last_ts;
        if let Some(v) = &info.video {
            match v.codec {
                VideoCodec::H264 => self.tag(9, ts, &[&[0x17, 0, 0, 0, 0], &v.record])?,
                VideoCodec::H265 => self.tag(9, ts, &[&[0x90], b"hvc1", &v.record])?,
            }
        }
        if let Some(a) = &info.audio {
            if a.codec == AudioCodec::Aac {
                self.tag(8, ts, &[&[0xAF, 0], &a.config])?;
            }
        }
        Ok(())
    }

    /// Writes one frame with its own timestamp (as the publisher sent it; negative ones as 0).
    pub fn write_frame(&mut self, f: &Frame, info: &StreamInfo) -> std::io::Result<()> {
        let ts = f.dts.clamp(0, i64::from(u32::MAX)) as u32;
        self.last_ts = ts;
        let cts = f.pts.saturating_sub(f.dts).clamp(-(1 << 23), (1 << 23) - 1) as i32;
        let cts = &cts.to_be_bytes()[1..];
        match f.track {
            TrackKind::Video => {
                let ft: u8 = if f.keyframe { 1 } else { 2 };
                match info.video.as_ref().map(|v| v.codec) {
                    Some(VideoCodec::H265) => {
                        self.tag(9, ts, &[&[0x80 | (ft << 4) | 1], b"hvc1", cts, &f.data])
                    }
                    _ => self.tag(9, ts, &[&[(ft << 4) | 7, 1], cts, &f.data]),
                }
            }
            TrackKind::Audio => match info.audio.as_ref().map(|a| a.codec) {
                Some(AudioCodec::Mp3) => self.tag(8, ts, &[&[0x2F], &f.data]),
                _ => self.tag(8, ts, &[&[0xAF, 1], &f.data]),
            },
        }
    }

    /// Flushes and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Path of the finished recording of a stream.
pub fn file_name(dir: &Path, name: &str, epoch: u64) -> PathBuf {
    dir.join(format!("{name}-{epoch}.flv"))
}

/// Records `stream` into `dir` until it ends.
pub fn spawn(
    dir: PathBuf,
    stream: &Arc<LiveStream>,
    mut rx: broadcast::Receiver<StreamEvent>,
    errors: prometheus::IntCounter,
) {
    let name = stream.name.clone();
    let final_path = file_name(&dir, &name, stream.epoch);
    tokio::task::spawn_blocking(move || {
        let part = final_path.with_extension("flv.part");
        let mut run = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let file = std::fs::File::create(&part)?;
            let mut w = FlvWriter::new(BufWriter::with_capacity(256 * 1024, file))?;
            let mut info = StreamInfo::default();
            loop {
                match rx.blocking_recv() {
                    Ok(StreamEvent::Info { info: i, .. }) => {
                        // Metadata-only updates must not repeat the sequence headers.
                        if i.video != info.video || i.audio != info.audio {
                            w.write_info(&i)?;
                        }
                        info = i;
                    }
                    Ok(StreamEvent::Frame(frame)) => w.write_frame(&frame, &info)?,
                    Ok(StreamEvent::End) | Err(broadcast::error::RecvError::Closed) => break,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(stream = %name, lost = n, "recorder fell behind; frames lost");
                    }
                }
            }
            w.finish()?
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()?;
            std::fs::rename(&part, &final_path)?;
            Ok(())
        };
        match run() {
            Ok(()) => {
                tracing::info!(stream = %name, file = %final_path.display(), "recording finished")
            }
            Err(e) => {
                errors.inc();
                tracing::warn!(stream = %name, error = %e, "recording failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn tag_layout() {
        let mut w = FlvWriter::new(Vec::new()).unwrap();
        let info = StreamInfo::default();
        w.write_frame(
            &Frame {
                track: TrackKind::Audio,
                dts: 0,
                pts: 0,
                keyframe: true,
                arrival_us: 0,
                data: Bytes::from_static(&[1, 2]),
            },
            &info,
        )
        .unwrap();
        w.write_frame(
            &Frame {
                track: TrackKind::Video,
                dts: 40,
                pts: 80,
                keyframe: true,
                arrival_us: 0,
                data: Bytes::from_static(&[9]),
            },
            &info,
        )
        .unwrap();
        let b = w.finish().unwrap();
        assert_eq!(&b[..13], &[b'F', b'L', b'V', 1, 5, 0, 0, 0, 9, 0, 0, 0, 0]);
        // Audio tag: type 8, size 4, ts 0, stream 0, body AF 01 01 02, prev size 15.
        assert_eq!(
            &b[13..28],
            &[8, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0xAF, 1, 1, 2]
        );
        assert_eq!(&b[28..32], &[0, 0, 0, 15]);
        // Video tag: ts 40, keyframe AVC NALU with composition time 40.
        assert_eq!(&b[32..38], &[9, 0, 0, 6, 0, 0]);
        assert_eq!(b[38], 40);
        assert_eq!(&b[43..49], &[0x17, 1, 0, 0, 40, 9]);
    }
}
