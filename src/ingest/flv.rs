//! FLV audio and video tag bodies (as carried in RTMP messages) into `media` values.
//!
//! Legacy FLV (H.264 codec id 7, AAC sound format 10, MP3 2) and enhanced RTMP for HEVC
//! (FourCC `hvc1`). Pure functions; anything unexpected is an error the session reports.

use crate::media::{self, AudioCodec, AudioConfig, VideoCodec, VideoConfig};
use bytes::Bytes;

/// A parsed video message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoTag {
    /// A decoder configuration record (sequence header).
    Config(VideoConfig),
    /// A coded frame.
    Frame {
        /// Keyframe (random access point).
        keyframe: bool,
        /// Composition time offset (pts - dts), milliseconds.
        cts: i32,
        /// Length-prefixed NAL units.
        data: Bytes,
    },
    /// End of sequence, or a message with nothing to decode (e.g. video info/command frame).
    Nothing,
}

/// A parsed audio message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioTag {
    /// AudioSpecificConfig (sequence header).
    Config(AudioConfig),
    /// A coded frame.
    Frame(Bytes),
    /// An empty sequence header: nothing to use.
    Nothing,
}

/// Why a tag body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    /// Too short for its header.
    #[error("{0} message is truncated")]
    Truncated(&'static str),
    /// A codec livepop does not carry.
    #[error("unsupported {kind} codec {id}")]
    Unsupported {
        /// "video" or "audio".
        kind: &'static str,
        /// The codec id or FourCC.
        id: String,
    },
    /// A bad codec configuration.
    #[error("bad codec configuration: {0}")]
    Config(#[from] media::ConfigParseError),
}

fn si24(b: &[u8]) -> i32 {
    let v = (i32::from(b[0]) << 16) | (i32::from(b[1]) << 8) | i32::from(b[2]);
    (v << 8) >> 8
}

/// Parses the body of an RTMP video message.
pub fn parse_video(body: &Bytes) -> Result<VideoTag, FlvError> {
    if body.is_empty() {
        return Err(FlvError::Truncated("video"));
    }
    let b0 = body[0];
    if b0 & 0x80 != 0 {
        return parse_enhanced_video(body);
    }
    let frame_type = b0 >> 4;
    let codec = b0 & 0x0f;
    if frame_type == 5 {
        return Ok(VideoTag::Nothing); // video info / command frame
    }
    if codec != 7 {
        return Err(FlvError::Unsupported {
            kind: "video",
            id: codec.to_string(),
        });
    }
    if body.len() < 5 {
        return Err(FlvError::Truncated("video"));
    }
    match body[1] {
        0 => {
            let record = body.slice(5..);
            if record.is_empty() {
                // FFmpeg's tee muxer sends an empty header before the real one: nothing to use.
                return Ok(VideoTag::Nothing);
            }
            media::parse_avc_record(&record)?;
            Ok(VideoTag::Config(VideoConfig {
                codec: VideoCodec::H264,
                record,
            }))
        }
        1 => Ok(VideoTag::Frame {
            keyframe: frame_type == 1,
            cts: si24(&body[2..5]),
            data: body.slice(5..),
        }),
        _ => Ok(VideoTag::Nothing),
    }
}

fn parse_enhanced_video(body: &Bytes) -> Result<VideoTag, FlvError> {
    if body.len() < 5 {
        return Err(FlvError::Truncated("video"));
    }
    let frame_type = (body[0] >> 4) & 0x07;
    let packet_type = body[0] & 0x0f;
    let fourcc = &body[1..5];
    if fourcc != b"hvc1" {
        return Err(FlvError::Unsupported {
            kind: "video",
            id: String::from_utf8_lossy(fourcc).into_owned(),
        });
    }
    if frame_type == 5 {
        return Ok(VideoTag::Nothing);
    }
    match packet_type {
        0 => Ok(VideoTag::Config(VideoConfig {
            codec: VideoCodec::H265,
            record: body.slice(5..),
        })),
        1 => {
            if body.len() < 8 {
                return Err(FlvError::Truncated("video"));
            }
            Ok(VideoTag::Frame {
                keyframe: frame_type == 1,
                cts: si24(&body[5..8]),
                data: body.slice(8..),
            })
        }
        3 => Ok(VideoTag::Frame {
            keyframe: frame_type == 1,
            cts: 0,
            data: body.slice(5..),
        }),
        _ => Ok(VideoTag::Nothing),
    }
}

/// Parses the body of an RTMP audio message.
pub fn parse_audio(body: &Bytes) -> Result<AudioTag, FlvError> {
    if body.is_empty() {
        return Err(FlvError::Truncated("audio"));
    }
    let format = body[0] >> 4;
    match format {
        10 => {
            if body.len() < 2 {
                return Err(FlvError::Truncated("audio"));
            }
            if body[1] == 0 {
                let config = body.slice(2..);
                if config.is_empty() {
                    return Ok(AudioTag::Nothing);
                }
                let info = media::parse_aac_config(&config)?;
                Ok(AudioTag::Config(AudioConfig {
                    codec: AudioCodec::Aac,
                    config,
                    sample_rate: info.sample_rate,
                    channels: info.channels,
                }))
            } else {
                Ok(AudioTag::Frame(body.slice(2..)))
            }
        }
        2 => Ok(AudioTag::Frame(body.slice(1..))),
        other => Err(FlvError::Unsupported {
            kind: "audio",
            id: other.to_string(),
        }),
    }
}

/// The MP3 configuration implied by an FLV audio header byte.
pub fn mp3_config(b0: u8) -> AudioConfig {
    let rate = match (b0 >> 2) & 0x03 {
        0 => 5512,
        1 => 11025,
        2 => 22050,
        _ => 44100,
    };
    AudioConfig {
        codec: AudioCodec::Mp3,
        config: Bytes::new(),
        sample_rate: rate,
        channels: if b0 & 1 == 1 { 2 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avc_sequence_header_and_frames() {
        let seq = Bytes::from_static(&[0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1f, 0xff, 0xe1, 0]);
        match parse_video(&seq).unwrap() {
            VideoTag::Config(c) => {
                assert_eq!(c.codec, VideoCodec::H264);
                assert_eq!(c.record.len(), 7);
            }
            other => panic!("{other:?}"),
        }
        let key = Bytes::from_static(&[0x17, 1, 0, 0, 66, 0, 0, 0, 1, 0x65]);
        assert_eq!(
            parse_video(&key).unwrap(),
            VideoTag::Frame {
                keyframe: true,
                cts: 66,
                data: Bytes::from_static(&[0, 0, 0, 1, 0x65])
            }
        );
        let inter = Bytes::from_static(&[0x27, 1, 0xff, 0xff, 0xfe, 0, 0, 0, 1, 0x41]);
        assert!(matches!(
            parse_video(&inter).unwrap(),
            VideoTag::Frame {
                keyframe: false,
                cts: -2,
                ..
            }
        ));
        assert_eq!(
            parse_video(&Bytes::from_static(&[0x17, 1])),
            Err(FlvError::Truncated("video"))
        );
        assert_eq!(
            parse_video(&Bytes::from_static(&[0x12, 1, 0, 0, 0])), // H.263
            Err(FlvError::Unsupported {
                kind: "video",
                id: "2".into()
            })
        );
        assert_eq!(
            parse_video(&Bytes::new()),
            Err(FlvError::Truncated("video"))
        );
        assert_eq!(
            parse_video(&Bytes::from_static(&[0x17, 0, 0, 0, 0])).unwrap(),
            VideoTag::Nothing
        );
    }

    #[test]
    fn aac_config_and_frames() {
        match parse_audio(&Bytes::from_static(&[0xAF, 0, 0x12, 0x10])).unwrap() {
            AudioTag::Config(c) => {
                assert_eq!((c.sample_rate, c.channels), (44100, 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_audio(&Bytes::from_static(&[0xAF, 1, 9, 9])).unwrap(),
            AudioTag::Frame(Bytes::from_static(&[9, 9]))
        );
        assert!(matches!(
            parse_audio(&Bytes::from_static(&[0xAF, 0, 0x12])),
            Err(FlvError::Config(media::ConfigParseError::Truncated {
                len: 1,
                ..
            }))
        ));
        assert_eq!(
            parse_audio(&Bytes::from_static(&[0x7F, 0])), // G.711
            Err(FlvError::Unsupported {
                kind: "audio",
                id: "7".into()
            })
        );
    }

    #[test]
    fn enhanced_hevc() {
        let mut v = vec![0x90, b'h', b'v', b'c', b'1'];
        v.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            parse_video(&Bytes::from(v)).unwrap(),
            VideoTag::Config(VideoConfig {
                codec: VideoCodec::H265,
                ..
            })
        ));
        let v = Bytes::from_static(&[0x91, b'h', b'v', b'c', b'1', 0, 0, 0, 7]);
        assert!(matches!(
            parse_video(&v).unwrap(),
            VideoTag::Frame { keyframe: true, .. }
        ));
        let v = Bytes::from_static(&[0x90, b'a', b'v', b'0', b'1']);
        assert_eq!(
            parse_video(&v),
            Err(FlvError::Unsupported {
                kind: "video",
                id: "av01".into()
            })
        );
    }
}
