//! CMAF / fragmented MP4 writer (ISO/IEC 14496-12, 14496-15, 23000-19), pure functions over bytes.
//!
//! `init_segment` writes ftyp+moov for a set of tracks; `fragment` writes one moof+mdat holding
//! samples of one or more tracks. An LL-HLS part is one fragment; a segment is the concatenation
//! of its parts. Checked with ffprobe in tests (tests/cmaf_ffprobe.rs).

use crate::media::{AudioCodec, AudioConfig, VideoCodec, VideoConfig};
use bytes::{BufMut, Bytes, BytesMut};

/// Timescale of video tracks (90 kHz, so that ms timestamps convert exactly).
pub const VIDEO_TIMESCALE: u32 = 90_000;

/// What a track carries.
#[derive(Debug, Clone)]
pub enum TrackKind {
    /// Video with its decoder configuration and coded size.
    Video {
        /// Decoder configuration (avcC / hvcC record).
        config: VideoConfig,
        /// Coded width in pixels.
        width: u16,
        /// Coded height in pixels.
        height: u16,
    },
    /// Audio with its decoder configuration.
    Audio(AudioConfig),
}

/// One track of an init segment.
#[derive(Debug, Clone)]
pub struct TrackSpec {
    /// Track id (1-based, unique in the file).
    pub id: u32,
    /// Media timescale (ticks per second).
    pub timescale: u32,
    /// What it carries.
    pub kind: TrackKind,
}

/// One sample of a fragment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Duration in the track's timescale.
    pub duration: u32,
    /// Composition time offset (pts − dts) in the track's timescale.
    pub cts_offset: i32,
    /// A sync sample (keyframe).
    pub sync: bool,
    /// The sample data.
    pub data: Bytes,
}

/// The samples of one track in one fragment.
#[derive(Debug, Clone)]
pub struct TrackRun {
    /// Track id.
    pub track_id: u32,
    /// Decode time of the first sample, in the track's timescale (tfdt).
    pub base_decode_time: u64,
    /// Samples in decode order.
    pub samples: Vec<Sample>,
}

fn boxed(out: &mut BytesMut, kind: &[u8; 4], body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32(0);
    out.put_slice(kind);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

fn full(
    out: &mut BytesMut,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut BytesMut),
) {
    boxed(out, kind, |b| {
        b.put_u32((u32::from(version) << 24) | (flags & 0x00FF_FFFF));
        body(b);
    });
}

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// ftyp + moov for `tracks`, with an mvex so that media lives in fragments.
pub fn init_segment(tracks: &[TrackSpec]) -> Bytes {
    let mut out = BytesMut::with_capacity(1024);
    boxed(&mut out, b"ftyp", |b| {
        b.put_slice(b"iso6");
        b.put_u32(0);
        for brand in [b"iso6", b"cmfc", b"mp41", b"dash"] {
            b.put_slice(brand);
        }
    });
    boxed(&mut out, b"moov", |b| {
        full(b, b"mvhd", 0, 0, |b| {
            b.put_u32(0); // creation time
            b.put_u32(0); // modification time
            b.put_u32(1000); // timescale
            b.put_u32(0); // duration: unknown (fragmented)
            b.put_u32(0x0001_0000); // rate 1.0
            b.put_u16(0x0100); // volume 1.0
            b.put_bytes(0, 10);
            for m in MATRIX {
                b.put_u32(m);
            }
            b.put_bytes(0, 24);
            b.put_u32(tracks.iter().map(|t| t.id).max().unwrap_or(0) + 1);
        });
        for t in tracks {
            trak(b, t);
        }
        boxed(b, b"mvex", |b| {
            for t in tracks {
                full(b, b"trex", 0, 0, |b| {
                    b.put_u32(t.id);
                    b.put_u32(1); // sample description index
                    b.put_u32(0);
                    b.put_u32(0);
                    b.put_u32(0);
                });
            }
        });
    });
    out.freeze()
}

fn trak(b: &mut BytesMut, t: &TrackSpec) {
    let (is_video, width, height) = match &t.kind {
        TrackKind::Video { width, height, .. } => (true, *width, *height),
        TrackKind::Audio(_) => (false, 0, 0),
    };
    boxed(b, b"trak", |b| {
        // flags: enabled | in movie | in preview
        full(b, b"tkhd", 0, 7, |b| {
            b.put_u32(0);
            b.put_u32(0);
            b.put_u32(t.id);
            b.put_u32(0);
            b.put_u32(0); // duration
            b.put_bytes(0, 8);
            b.put_u16(0); // layer
            b.put_u16(if is_video { 0 } else { 1 }); // alternate group
            b.put_u16(if is_video { 0 } else { 0x0100 }); // volume
            b.put_u16(0);
            for m in MATRIX {
                b.put_u32(m);
            }
            b.put_u32(u32::from(width) << 16);
            b.put_u32(u32::from(height) << 16);
        });
        boxed(b, b"mdia", |b| {
            full(b, b"mdhd", 0, 0, |b| {
                b.put_u32(0);
                b.put_u32(0);
                b.put_u32(t.timescale);
                b.put_u32(0);
                b.put_u16(0x55c4); // language "und"
                b.put_u16(0);
            });
            full(b, b"hdlr", 0, 0, |b| {
                b.put_u32(0);
                b.put_slice(if is_video { b"vide" } else { b"soun" });
                b.put_bytes(0, 12);
                b.put_slice(if is_video { b"Video\0" } else { b"Audio\0" });
            });
            boxed(b, b"minf", |b| {
                if is_video {
                    full(b, b"vmhd", 0, 1, |b| b.put_bytes(0, 8));
                } else {
                    full(b, b"smhd", 0, 0, |b| b.put_u32(0));
                }
                boxed(b, b"dinf", |b| {
                    full(b, b"dref", 0, 0, |b| {
                        b.put_u32(1);
                        full(b, b"url ", 0, 1, |_| {});
                    });
                });
                boxed(b, b"stbl", |b| {
                    full(b, b"stsd", 0, 0, |b| {
                        b.put_u32(1);
                        sample_entry(b, &t.kind);
                    });
                    full(b, b"stts", 0, 0, |b| b.put_u32(0));
                    full(b, b"stsc", 0, 0, |b| b.put_u32(0));
                    full(b, b"stsz", 0, 0, |b| {
                        b.put_u32(0);
                        b.put_u32(0);
                    });
                    full(b, b"stco", 0, 0, |b| b.put_u32(0));
                });
            });
        });
    });
}

fn sample_entry(b: &mut BytesMut, kind: &TrackKind) {
    match kind {
        TrackKind::Video {
            config,
            width,
            height,
        } => {
            let (entry, cfg_box) = match config.codec {
                VideoCodec::H264 => (b"avc1", b"avcC"),
                VideoCodec::H265 => (b"hvc1", b"hvcC"),
            };
            boxed(b, entry, |b| {
                b.put_bytes(0, 6);
                b.put_u16(1); // data reference index
                b.put_bytes(0, 16);
                b.put_u16(*width);
                b.put_u16(*height);
                b.put_u32(0x0048_0000); // 72 dpi
                b.put_u32(0x0048_0000);
                b.put_u32(0);
                b.put_u16(1); // frame count
                b.put_bytes(0, 32); // compressor name
                b.put_u16(0x0018); // depth
                b.put_i16(-1);
                boxed(b, cfg_box, |b| b.put_slice(&config.record));
            });
        }
        TrackKind::Audio(a) => {
            boxed(b, b"mp4a", |b| {
                b.put_bytes(0, 6);
                b.put_u16(1);
                b.put_bytes(0, 8);
                b.put_u16(u16::from(a.channels.max(1)));
                b.put_u16(16);
                b.put_u32(0);
                // 16.16 sample rate; rates above 65535 Hz do not fit and are written as 0.
                b.put_u32(if a.sample_rate <= 0xFFFF {
                    a.sample_rate << 16
                } else {
                    0
                });
                esds(b, a);
            });
        }
    }
}

fn descriptor(b: &mut BytesMut, tag: u8, body: &[u8]) {
    b.put_u8(tag);
    // Four-byte size form, accepted everywhere and easy to write.
    let n = body.len() as u32;
    b.put_u8(0x80 | ((n >> 21) & 0x7f) as u8);
    b.put_u8(0x80 | ((n >> 14) & 0x7f) as u8);
    b.put_u8(0x80 | ((n >> 7) & 0x7f) as u8);
    b.put_u8((n & 0x7f) as u8);
    b.put_slice(body);
}

fn esds(b: &mut BytesMut, a: &AudioConfig) {
    full(b, b"esds", 0, 0, |b| {
        let mut dsi = BytesMut::new();
        descriptor(&mut dsi, 0x05, &a.config);
        let mut dcd = BytesMut::new();
        dcd.put_u8(match a.codec {
            AudioCodec::Aac => 0x40,
            AudioCodec::Mp3 => 0x6B,
        });
        dcd.put_u8(0x15); // audio stream
        dcd.put_slice(&[0, 0, 0]); // buffer size
        dcd.put_u32(0); // max bitrate
        dcd.put_u32(0); // average bitrate
        if a.codec == AudioCodec::Aac {
            dcd.put_slice(&dsi);
        }
        let mut es = BytesMut::new();
        es.put_u16(1); // ES id
        es.put_u8(0);
        descriptor(&mut es, 0x04, &dcd);
        descriptor(&mut es, 0x06, &[0x02]);
        descriptor(b, 0x03, &es);
    });
}

/// Sample flags (ISO 14496-12 §8.8.3.1): sync samples depend on nothing; others are
/// non-sync and depend on others.
fn sample_flags(sync: bool) -> u32 {
    if sync {
        0x0200_0000
    } else {
        0x0101_0000
    }
}

/// One moof+mdat with sequence number `seq` holding `runs` (one traf per run).
pub fn fragment(seq: u32, runs: &[TrackRun]) -> Bytes {
    let data_len: usize = runs
        .iter()
        .flat_map(|r| r.samples.iter())
        .map(|s| s.data.len())
        .sum();
    let mut out = BytesMut::with_capacity(256 + 16 * runs.len() + data_len);
    let mut offset_slots = vec![];
    boxed(&mut out, b"moof", |b| {
        full(b, b"mfhd", 0, 0, |b| b.put_u32(seq));
        for r in runs {
            boxed(b, b"traf", |b| {
                // default-base-is-moof
                full(b, b"tfhd", 0, 0x02_0000, |b| b.put_u32(r.track_id));
                full(b, b"tfdt", 1, 0, |b| b.put_u64(r.base_decode_time));
                // data offset, duration, size, flags, composition offset present (version 1:
                // signed offsets).
                full(
                    b,
                    b"trun",
                    1,
                    0x0001 | 0x0100 | 0x0200 | 0x0400 | 0x0800,
                    |b| {
                        b.put_u32(r.samples.len() as u32);
                        offset_slots.push(b.len());
                        b.put_i32(0); // data offset, patched below
                        for s in &r.samples {
                            b.put_u32(s.duration);
                            b.put_u32(s.data.len() as u32);
                            b.put_u32(sample_flags(s.sync));
                            b.put_i32(s.cts_offset);
                        }
                    },
                );
            });
        }
    });
    let moof_len = out.len();
    out.put_u32((8 + data_len) as u32);
    out.put_slice(b"mdat");
    // Data offsets are relative to the start of the moof (default-base-is-moof).
    let mut pos = moof_len + 8;
    for (r, slot) in runs.iter().zip(offset_slots) {
        out[slot..slot + 4].copy_from_slice(&(pos as i32).to_be_bytes());
        for s in &r.samples {
            out.put_slice(&s.data);
            pos += s.data.len();
        }
    }
    out.freeze()
}

/// RFC 6381 codec string of a video configuration (e.g. `avc1.64001f`).
pub fn video_codec_string(c: &VideoConfig) -> String {
    match c.codec {
        VideoCodec::H264 if c.record.len() >= 4 => {
            format!(
                "avc1.{:02x}{:02x}{:02x}",
                c.record[1], c.record[2], c.record[3]
            )
        }
        VideoCodec::H264 => "avc1".into(),
        VideoCodec::H265 => hevc_codec_string(&c.record),
    }
}

/// `hvc1.P.C.TL.B` from an HEVCDecoderConfigurationRecord (ISO 14496-15 annex E.3).
fn hevc_codec_string(r: &[u8]) -> String {
    if r.len() < 13 {
        return "hvc1".into();
    }
    let space = match r[1] >> 6 {
        1 => "A",
        2 => "B",
        3 => "C",
        _ => "",
    };
    let tier = if r[1] & 0x20 != 0 { "H" } else { "L" };
    let profile = r[1] & 0x1f;
    // Compatibility flags are written bit-reversed.
    let compat = u32::from_be_bytes([r[2], r[3], r[4], r[5]]).reverse_bits();
    let level = r[12];
    let mut s = format!("hvc1.{space}{profile}.{compat:X}.{tier}{level}");
    let mut constraints: Vec<u8> = r[6..12].to_vec();
    while constraints.last() == Some(&0) {
        constraints.pop();
    }
    for c in constraints {
        s += &format!(".{c:X}");
    }
    s
}

/// RFC 6381 codec string of an audio configuration (e.g. `mp4a.40.2`).
pub fn audio_codec_string(a: &AudioConfig) -> String {
    match a.codec {
        AudioCodec::Aac => {
            let aot = crate::media::parse_aac_config(&a.config)
                .map(|i| i.object_type)
                .unwrap_or(2);
            format!("mp4a.40.{aot}")
        }
        AudioCodec::Mp3 => "mp4a.40.34".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(b: &[u8], kind: &[u8; 4]) -> Option<usize> {
        b.windows(4).position(|w| w == kind)
    }

    #[test]
    fn fragment_layout_and_data_offsets() {
        let runs = vec![
            TrackRun {
                track_id: 1,
                base_decode_time: 90_000,
                samples: vec![
                    Sample {
                        duration: 3000,
                        cts_offset: 3000,
                        sync: true,
                        data: Bytes::from_static(b"AAAA"),
                    },
                    Sample {
                        duration: 3000,
                        cts_offset: -3000,
                        sync: false,
                        data: Bytes::from_static(b"BB"),
                    },
                ],
            },
            TrackRun {
                track_id: 2,
                base_decode_time: 48_000,
                samples: vec![Sample {
                    duration: 1024,
                    cts_offset: 0,
                    sync: true,
                    data: Bytes::from_static(b"CCC"),
                }],
            },
        ];
        let f = fragment(7, &runs);
        assert_eq!(&f[4..8], b"moof");
        let moof_len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(&f[moof_len + 4..moof_len + 8], b"mdat");
        assert_eq!(&f[moof_len + 8..], b"AAAABBCCC");
        // The first trun's data offset points at "AAAA", the second's at "CCC".
        let t1 = find(&f, b"trun").unwrap();
        let off1 = i32::from_be_bytes(f[t1 + 12..t1 + 16].try_into().unwrap()) as usize;
        assert_eq!(&f[off1..off1 + 4], b"AAAA");
        let t2 = t1 + 4 + find(&f[t1 + 4..], b"trun").unwrap();
        let off2 = i32::from_be_bytes(f[t2 + 12..t2 + 16].try_into().unwrap()) as usize;
        assert_eq!(&f[off2..off2 + 3], b"CCC");
        // mfhd sequence number
        let m = find(&f, b"mfhd").unwrap();
        assert_eq!(u32::from_be_bytes(f[m + 8..m + 12].try_into().unwrap()), 7);
    }

    #[test]
    fn codec_strings() {
        let v = VideoConfig {
            codec: VideoCodec::H264,
            record: Bytes::from_static(&[1, 0x64, 0x00, 0x1f, 0xff]),
        };
        assert_eq!(video_codec_string(&v), "avc1.64001f");
        let a = AudioConfig {
            codec: AudioCodec::Aac,
            config: Bytes::from_static(&[0x12, 0x10]),
            sample_rate: 44100,
            channels: 2,
        };
        assert_eq!(audio_codec_string(&a), "mp4a.40.2");
        // HEVC Main, level 3.1 (93), general_profile_compatibility_flags 0x60000000.
        let mut rec = vec![1u8, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 93];
        rec.extend_from_slice(&[0; 10]);
        let h = VideoConfig {
            codec: VideoCodec::H265,
            record: Bytes::from(rec),
        };
        assert_eq!(video_codec_string(&h), "hvc1.1.6.L93.90");
    }
}
