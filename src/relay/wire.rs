//! The relay wire codec (docs/relay-protocol.md), sans-IO.
//!
//! Encoders append to a `BytesMut`; decoders take a `BytesMut` that holds what has arrived and
//! either consume one whole item or return `Ok(None)` ("incomplete") without consuming, so the
//! async readers only loop on them. Every length is checked against a limit before use.

use crate::media::{
    AudioCodec, AudioConfig, Frame, Metadata, StreamInfo, TrackKind, VideoCodec, VideoConfig,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol version spoken by this build.
pub const VERSION: u64 = 1;
/// ALPN of the relay.
pub const ALPN: &[u8] = b"livepop-relay/1";
/// First byte of every group stream.
pub const GROUP_MAGIC: u8 = 0x47;
/// Largest frame payload accepted.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest control message body accepted.
pub const MAX_CONTROL: usize = 256 * 1024;
/// Largest string (names) accepted.
pub const MAX_STRING: usize = 1024;

/// A malformed or over-limit input; the peer's stream (or connection) is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length above its limit.
    #[error("{what} of {len} bytes exceeds the limit of {limit}")]
    TooLong {
        /// What.
        what: &'static str,
        /// Declared length.
        len: u64,
        /// Limit.
        limit: usize,
    },
    /// A field with an invalid value.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

// ---- primitives -------------------------------------------------------------------------

/// Appends a QUIC-style variable-length integer (RFC 9000 §16); values above 2^62-1 saturate.
pub fn put_varint(buf: &mut BytesMut, v: u64) {
    if v < 1 << 6 {
        buf.put_u8(v as u8);
    } else if v < 1 << 14 {
        buf.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        buf.put_u32(0x8000_0000 | v as u32);
    } else {
        buf.put_u64(0xC000_0000_0000_0000 | v.min((1 << 62) - 1));
    }
}

/// Reads a varint at the front of `b`: `(value, bytes used)`, or None if incomplete.
pub fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    if b.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &x in &b[1..len] {
        v = (v << 8) | u64::from(x);
    }
    Some((v, len))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A cursor over a complete body: every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, WireError> {
        let (v, n) = get_varint(self.b).ok_or(WireError::Invalid("truncated varint"))?;
        self.b = &self.b[n..];
        Ok(v)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        let (&v, rest) = self
            .b
            .split_first()
            .ok_or(WireError::Invalid("truncated body"))?;
        self.b = rest;
        Ok(v)
    }
    fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        if len > limit as u64 {
            return Err(WireError::TooLong { what, len, limit });
        }
        let len = len as usize;
        if self.b.len() < len {
            return Err(WireError::Invalid("truncated body"));
        }
        let (v, rest) = self.b.split_at(len);
        self.b = rest;
        Ok(v)
    }
    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let b = self.bytes(what, MAX_STRING)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid("non-UTF-8 string"))
    }
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.put_slice(b);
}

// ---- control stream -----------------------------------------------------------------------

/// A message on the control stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Edge → core, first message: who is speaking.
    Hello {
        /// Protocol version.
        version: u64,
        /// The edge's node id.
        node_id: String,
    },
    /// Core → edge answer to Hello.
    HelloAck {
        /// Protocol version.
        version: u64,
        /// The core's node id.
        node_id: String,
    },
    /// Edge → core: a stream exists (or its codec configuration changed).
    Announce(Announce),
    /// Edge → core: the publisher stopped; no more groups follow.
    End {
        /// Connection-local stream id.
        stream_id: u64,
    },
    /// Core → edge: the announced stream is refused (owned by another edge, too many streams,
    /// a bad epoch); the edge ends the publication and tells the publisher.
    Refuse {
        /// Connection-local stream id (from Announce).
        stream_id: u64,
        /// Why, for the edge's log.
        reason: String,
    },
}

/// A stream announcement.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    /// Connection-local stream id, used by group streams.
    pub stream_id: u64,
    /// Public stream name.
    pub name: String,
    /// Identifies one publishing session: a resume keeps it, a new publish changes it.
    pub epoch: u64,
    /// Increases with each codec configuration change; groups name the version they use.
    pub config_version: u64,
    /// The first group this connection will carry: earlier groups will not come on it.
    pub start_seq: u64,
    /// Codec configuration and metadata.
    pub info: StreamInfo,
}

const T_HELLO: u64 = 1;
const T_HELLO_ACK: u64 = 2;
const T_ANNOUNCE: u64 = 3;
const T_END: u64 = 4;
const T_REFUSE: u64 = 5;

fn video_codec_id(c: VideoCodec) -> u8 {
    match c {
        VideoCodec::H264 => 1,
        VideoCodec::H265 => 2,
    }
}
fn audio_codec_id(c: AudioCodec) -> u8 {
    match c {
        AudioCodec::Aac => 1,
        AudioCodec::Mp3 => 2,
    }
}

fn put_opt_u32(buf: &mut BytesMut, v: Option<u32>) {
    put_varint(buf, v.map_or(0, |x| u64::from(x) + 1));
}
fn get_opt_u32(r: &mut Reader) -> Result<Option<u32>, WireError> {
    let v = r.varint()?;
    Ok(if v == 0 {
        None
    } else {
        Some(u32::try_from(v - 1).map_err(|_| WireError::Invalid("metadata value"))?)
    })
}

impl Control {
    /// Appends this message: type, body length, body.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        let t = match self {
            Control::Hello { version, node_id } => {
                put_varint(&mut body, *version);
                put_bytes(&mut body, node_id.as_bytes());
                T_HELLO
            }
            Control::HelloAck { version, node_id } => {
                put_varint(&mut body, *version);
                put_bytes(&mut body, node_id.as_bytes());
                T_HELLO_ACK
            }
            Control::Announce(a) => {
                put_varint(&mut body, a.stream_id);
                put_bytes(&mut body, a.name.as_bytes());
                put_varint(&mut body, a.epoch);
                put_varint(&mut body, a.config_version);
                put_varint(&mut body, a.start_seq);
                match &a.info.video {
                    Some(v) => {
                        body.put_u8(video_codec_id(v.codec));
                        put_bytes(&mut body, &v.record);
                    }
                    None => body.put_u8(0),
                }
                match &a.info.audio {
                    Some(au) => {
                        body.put_u8(audio_codec_id(au.codec));
                        put_bytes(&mut body, &au.config);
                        put_varint(&mut body, u64::from(au.sample_rate));
                        body.put_u8(au.channels);
                    }
                    None => body.put_u8(0),
                }
                let m = &a.info.metadata;
                put_opt_u32(&mut body, m.width);
                put_opt_u32(&mut body, m.height);
                put_opt_u32(&mut body, m.frame_rate.map(|f| (f * 1000.0).round() as u32));
                put_opt_u32(&mut body, m.video_kbps);
                put_bytes(&mut body, m.encoder.as_deref().unwrap_or("").as_bytes());
                T_ANNOUNCE
            }
            Control::End { stream_id } => {
                put_varint(&mut body, *stream_id);
                T_END
            }
            Control::Refuse { stream_id, reason } => {
                put_varint(&mut body, *stream_id);
                put_bytes(&mut body, reason.as_bytes());
                T_REFUSE
            }
        };
        put_varint(out, t);
        put_varint(out, body.len() as u64);
        out.put_slice(&body);
    }

    /// Decodes one message from the front of `buf`. Unknown message types are skipped
    /// (returned as `Ok(Some(None))`) so that newer peers can add messages.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Option<Control>>, WireError> {
        let Some((t, n1)) = get_varint(buf) else {
            return Ok(None);
        };
        let Some((len, n2)) = get_varint(&buf[n1..]) else {
            return Ok(None);
        };
        if len > MAX_CONTROL as u64 {
            return Err(WireError::TooLong {
                what: "control message",
                len,
                limit: MAX_CONTROL,
            });
        }
        let start = n1 + n2;
        let end = start + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let body = buf.split_to(end).split_off(start).freeze();
        let mut r = Reader { b: &body };
        let msg = match t {
            T_HELLO => Some(Control::Hello {
                version: r.varint()?,
                node_id: r.string("node id")?,
            }),
            T_HELLO_ACK => Some(Control::HelloAck {
                version: r.varint()?,
                node_id: r.string("node id")?,
            }),
            T_ANNOUNCE => {
                let stream_id = r.varint()?;
                let name = r.string("stream name")?;
                let epoch = r.varint()?;
                let config_version = r.varint()?;
                let start_seq = r.varint()?;
                let video = match r.u8()? {
                    0 => None,
                    id => {
                        let codec = match id {
                            1 => VideoCodec::H264,
                            2 => VideoCodec::H265,
                            _ => return Err(WireError::Invalid("video codec")),
                        };
                        let record = Bytes::copy_from_slice(r.bytes("video config", 65536)?);
                        Some(VideoConfig { codec, record })
                    }
                };
                let audio = match r.u8()? {
                    0 => None,
                    id => {
                        let codec = match id {
                            1 => AudioCodec::Aac,
                            2 => AudioCodec::Mp3,
                            _ => return Err(WireError::Invalid("audio codec")),
                        };
                        let config = Bytes::copy_from_slice(r.bytes("audio config", 1024)?);
                        let sample_rate = u32::try_from(r.varint()?)
                            .map_err(|_| WireError::Invalid("sample rate"))?;
                        let channels = r.u8()?;
                        Some(AudioConfig {
                            codec,
                            config,
                            sample_rate,
                            channels,
                        })
                    }
                };
                let width = get_opt_u32(&mut r)?;
                let height = get_opt_u32(&mut r)?;
                let frame_rate = get_opt_u32(&mut r)?.map(|v| v as f32 / 1000.0);
                let video_kbps = get_opt_u32(&mut r)?;
                let encoder = r.string("encoder")?;
                Some(Control::Announce(Announce {
                    stream_id,
                    name,
                    epoch,
                    config_version,
                    start_seq,
                    info: StreamInfo {
                        video,
                        audio,
                        metadata: Metadata {
                            width,
                            height,
                            frame_rate,
                            video_kbps,
                            encoder: (!encoder.is_empty()).then_some(encoder),
                        },
                    },
                }))
            }
            T_REFUSE => Some(Control::Refuse {
                stream_id: r.varint()?,
                reason: r.string("reason")?,
            }),
            T_END => Some(Control::End {
                stream_id: r.varint()?,
            }),
            _ => None,
        };
        Ok(Some(msg))
    }
}

// ---- group streams --------------------------------------------------------------------------

/// The header that opens a group stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHeader {
    /// Connection-local stream id (from Announce).
    pub stream_id: u64,
    /// Group sequence number within the epoch; a video group starts at a keyframe.
    pub seq: u64,
    /// Which track this stream carries.
    pub track: TrackKind,
    /// The Announce config_version these frames decode with.
    pub config_version: u64,
}

impl GroupHeader {
    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(GROUP_MAGIC);
        put_varint(out, self.stream_id);
        put_varint(out, self.seq);
        out.put_u8(match self.track {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        });
        put_varint(out, self.config_version);
    }
}

/// Appends one frame; `prev_dts` is the previous frame's dts on this stream (0 for the first).
pub fn encode_frame(out: &mut BytesMut, f: &Frame, prev_dts: i64) {
    put_varint(out, u64::from(f.keyframe));
    put_varint(out, zigzag(f.dts.wrapping_sub(prev_dts)));
    put_varint(out, zigzag(f.pts.wrapping_sub(f.dts)));
    put_varint(out, f.arrival_us);
    put_varint(out, f.data.len() as u64);
    out.put_slice(&f.data);
}

/// An item read from a group stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupItem {
    /// The header (always first).
    Header(GroupHeader),
    /// The next frame.
    Frame(Frame),
}

/// Decodes one group stream: the header, then frames.
#[derive(Debug, Default)]
pub struct GroupDecoder {
    header: Option<GroupHeader>,
    prev_dts: i64,
}

impl GroupDecoder {
    /// A decoder for a new stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next item, or `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<GroupItem>, WireError> {
        match self.header {
            None => {
                let Some(&magic) = buf.first() else {
                    return Ok(None);
                };
                if magic != GROUP_MAGIC {
                    return Err(WireError::Invalid("group stream magic"));
                }
                let mut pos = 1;
                let mut vals = [0u64; 2];
                for v in &mut vals {
                    let Some((x, n)) = get_varint(&buf[pos..]) else {
                        return Ok(None);
                    };
                    *v = x;
                    pos += n;
                }
                let Some(&t) = buf.get(pos) else {
                    return Ok(None);
                };
                pos += 1;
                let track = match t {
                    0 => TrackKind::Video,
                    1 => TrackKind::Audio,
                    _ => return Err(WireError::Invalid("track kind")),
                };
                let Some((config_version, n)) = get_varint(&buf[pos..]) else {
                    return Ok(None);
                };
                pos += n;
                buf.advance(pos);
                let h = GroupHeader {
                    stream_id: vals[0],
                    seq: vals[1],
                    track,
                    config_version,
                };
                self.header = Some(h);
                Ok(Some(GroupItem::Header(h)))
            }
            Some(h) => {
                let mut pos = 0;
                let mut vals = [0u64; 5];
                for v in &mut vals {
                    let Some((x, n)) = get_varint(&buf[pos..]) else {
                        return Ok(None);
                    };
                    *v = x;
                    pos += n;
                }
                let [flags, dts_delta, cts, arrival_us, len] = vals;
                if len > MAX_FRAME as u64 {
                    return Err(WireError::TooLong {
                        what: "frame",
                        len,
                        limit: MAX_FRAME,
                    });
                }
                if flags > 1 {
                    return Err(WireError::Invalid("frame flags"));
                }
                let end = pos + len as usize;
                if buf.len() < end {
                    return Ok(None);
                }
                buf.advance(pos);
                let data = buf.split_to(len as usize).freeze();
                let dts = self.prev_dts.wrapping_add(unzigzag(dts_delta));
                self.prev_dts = dts;
                Ok(Some(GroupItem::Frame(Frame {
                    track: h.track,
                    dts,
                    pts: dts.wrapping_add(unzigzag(cts)),
                    keyframe: flags == 1,
                    arrival_us,
                    data,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_byte_vectors() {
        // RFC 9000 appendix A.1 examples.
        for (v, bytes) in [
            (37u64, vec![0x25]),
            (15293, vec![0x7b, 0xbd]),
            (494_878_333, vec![0x9d, 0x7f, 0x3e, 0x7d]),
            (
                151_288_809_941_952_652,
                vec![0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            ),
        ] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(b.as_ref(), &bytes[..]);
            assert_eq!(get_varint(&bytes), Some((v, bytes.len())));
            assert_eq!(get_varint(&bytes[..bytes.len() - 1]), None);
        }
    }

    #[test]
    fn zigzag_roundtrip() {
        for v in [0i64, 1, -1, 33, -33, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn hello_byte_vector() {
        let mut b = BytesMut::new();
        Control::Hello {
            version: 1,
            node_id: "e1".into(),
        }
        .encode(&mut b);
        // type 1, body length 4, version 1, string length 2, "e1"
        assert_eq!(b.as_ref(), &[0x01, 0x04, 0x01, 0x02, b'e', b'1']);
        assert_eq!(
            Control::decode(&mut b).unwrap(),
            Some(Some(Control::Hello {
                version: 1,
                node_id: "e1".into()
            }))
        );
        assert!(b.is_empty());
    }

    fn sample_announce() -> Control {
        Control::Announce(Announce {
            stream_id: 7,
            name: "demo".into(),
            epoch: 1_700_000_000_123,
            config_version: 2,
            start_seq: 70,
            info: StreamInfo {
                video: Some(VideoConfig {
                    codec: VideoCodec::H264,
                    record: Bytes::from_static(&[1, 0x64, 0, 0x1f, 0xff, 0xe1, 0]),
                }),
                audio: Some(AudioConfig {
                    codec: AudioCodec::Aac,
                    config: Bytes::from_static(&[0x12, 0x10]),
                    sample_rate: 44100,
                    channels: 2,
                }),
                metadata: Metadata {
                    width: Some(1280),
                    height: Some(720),
                    frame_rate: Some(30.0),
                    video_kbps: None,
                    encoder: Some("Lavf".into()),
                },
            },
        })
    }

    #[test]
    fn control_roundtrip_split_anywhere() {
        let msgs = vec![
            sample_announce(),
            Control::End { stream_id: 7 },
            Control::Refuse {
                stream_id: 7,
                reason: "published from another edge".into(),
            },
            Control::HelloAck {
                version: 1,
                node_id: "core-1".into(),
            },
        ];
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        for split in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = vec![];
            while let Some(m) = Control::decode(&mut buf).unwrap() {
                got.push(m.unwrap());
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(m) = Control::decode(&mut buf).unwrap() {
                got.push(m.unwrap());
            }
            assert_eq!(got, msgs, "split at {split}");
        }
    }

    #[test]
    fn unknown_control_type_is_skipped() {
        let mut b = BytesMut::from(&[0x3f, 0x02, 0xaa, 0xbb][..]);
        Control::End { stream_id: 1 }.encode(&mut b);
        assert_eq!(Control::decode(&mut b).unwrap(), Some(None));
        assert_eq!(
            Control::decode(&mut b).unwrap(),
            Some(Some(Control::End { stream_id: 1 }))
        );
    }

    #[test]
    fn oversized_control_rejected() {
        let mut b = BytesMut::new();
        put_varint(&mut b, T_ANNOUNCE);
        put_varint(&mut b, (MAX_CONTROL + 1) as u64);
        assert!(matches!(
            Control::decode(&mut b),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn truncated_announce_body_is_an_error_not_a_panic() {
        let mut full = BytesMut::new();
        sample_announce().encode(&mut full);
        // Re-declare a shorter body: the body parser must notice, not read past it.
        let body = &full[2..];
        for cut in 0..body.len() {
            let mut b = BytesMut::new();
            put_varint(&mut b, T_ANNOUNCE);
            put_varint(&mut b, cut as u64);
            b.extend_from_slice(&body[..cut]);
            // Every cut ends inside a field: the body parser says so, whatever the field.
            assert!(
                matches!(Control::decode(&mut b), Err(WireError::Invalid(w)) if w.starts_with("truncated")),
                "cut {cut}: {:?}",
                Control::decode(&mut b.clone())
            );
        }
    }

    #[test]
    fn group_byte_vector_and_roundtrip() {
        let h = GroupHeader {
            stream_id: 3,
            seq: 70,
            track: TrackKind::Video,
            config_version: 1,
        };
        let mut wire = BytesMut::new();
        h.encode(&mut wire);
        assert_eq!(wire.as_ref(), &[0x47, 0x03, 0x40, 70, 0x00, 0x01]);
        let frames = vec![
            Frame {
                track: TrackKind::Video,
                dts: 1000,
                pts: 1066,
                keyframe: true,
                arrival_us: 5,
                data: Bytes::from_static(b"key"),
            },
            Frame {
                track: TrackKind::Video,
                dts: 1033,
                pts: 1033,
                keyframe: false,
                arrival_us: 6,
                data: Bytes::from_static(b"p"),
            },
        ];
        let mut prev = 0;
        for f in &frames {
            encode_frame(&mut wire, f, prev);
            prev = f.dts;
        }
        // Second frame: flags 0, dts delta +33 (zigzag 66), cts 0, arrival 6, len 1, "p".
        assert_eq!(
            &wire[wire.len() - 7..],
            &[0x00, 0x40, 66, 0x00, 0x06, 0x01, b'p']
        );
        for split in 0..wire.len() {
            let mut d = GroupDecoder::new();
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = vec![];
            while let Some(i) = d.decode(&mut buf).unwrap() {
                got.push(i);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(i) = d.decode(&mut buf).unwrap() {
                got.push(i);
            }
            assert_eq!(got[0], GroupItem::Header(h));
            assert_eq!(got[1], GroupItem::Frame(frames[0].clone()));
            assert_eq!(got[2], GroupItem::Frame(frames[1].clone()));
        }
    }

    #[test]
    fn bad_group_input() {
        let mut d = GroupDecoder::new();
        assert_eq!(
            d.decode(&mut BytesMut::from(&[0x00][..])),
            Err(WireError::Invalid("group stream magic"))
        );
        let mut d = GroupDecoder::new();
        let mut b = BytesMut::from(&[0x47, 1, 1, 9, 0][..]);
        assert_eq!(d.decode(&mut b), Err(WireError::Invalid("track kind")));
        let mut d = GroupDecoder::new();
        let mut b = BytesMut::from(&[0x47, 1, 1, 0, 0][..]);
        d.decode(&mut b).unwrap();
        let mut b = BytesMut::new();
        for v in [1u64, 0, 0, 0, (MAX_FRAME + 1) as u64] {
            put_varint(&mut b, v);
        }
        assert!(matches!(d.decode(&mut b), Err(WireError::TooLong { .. })));
    }
}
