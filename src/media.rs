//! The shared media model: tracks, codec configuration and frames.
//!
//! Plain data and small parsers only; no IO. Timestamps are milliseconds (RTMP's resolution),
//! unwrapped to i64 so that a 49-day stream does not wrap. Every frame also carries the wall
//! time at which it reached the edge (`arrival_us`, microseconds since the Unix epoch), which
//! the core uses for PROGRAM-DATE-TIME and the benchmarks use for latency.

use bytes::Bytes;

/// Which track of a stream a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    /// The video track.
    Video,
    /// The audio track.
    Audio,
}

impl TrackKind {
    /// Label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackKind::Video => "video",
            TrackKind::Audio => "audio",
        }
    }
}

/// Video codecs livepop carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    /// H.264 / AVC; the config record is an AVCDecoderConfigurationRecord (avcC).
    H264,
    /// H.265 / HEVC (enhanced RTMP); the config record is an HEVCDecoderConfigurationRecord.
    H265,
}

/// Audio codecs livepop carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioCodec {
    /// AAC; the config is an AudioSpecificConfig.
    Aac,
    /// MP3; no config.
    Mp3,
}

/// Decoder configuration of a video track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoConfig {
    /// The codec.
    pub codec: VideoCodec,
    /// The decoder configuration record exactly as the encoder sent it.
    pub record: Bytes,
}

/// Decoder configuration of an audio track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioConfig {
    /// The codec.
    pub codec: AudioCodec,
    /// AudioSpecificConfig for AAC; empty otherwise.
    pub config: Bytes,
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Channel count.
    pub channels: u8,
}

/// What the encoder said about the stream in onMetaData (informational only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// Width in pixels.
    pub width: Option<u32>,
    /// Height in pixels.
    pub height: Option<u32>,
    /// Frames per second.
    pub frame_rate: Option<f32>,
    /// Video bitrate in kbit/s.
    pub video_kbps: Option<u32>,
    /// Encoder name.
    pub encoder: Option<String>,
}

/// One access unit of one track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The track.
    pub track: TrackKind,
    /// Decode timestamp, milliseconds.
    pub dts: i64,
    /// Presentation timestamp, milliseconds (equal to dts for audio).
    pub pts: i64,
    /// A random access point (IDR for video; every audio frame).
    pub keyframe: bool,
    /// Wall time at which the frame reached the edge, microseconds since the Unix epoch.
    pub arrival_us: u64,
    /// The payload: length-prefixed NAL units for video, a raw codec frame for audio.
    pub data: Bytes,
}

/// Everything a receiver needs to decode a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamInfo {
    /// Video configuration, once known.
    pub video: Option<VideoConfig>,
    /// Audio configuration, once known.
    pub audio: Option<AudioConfig>,
    /// onMetaData values.
    pub metadata: Metadata,
}

/// Why a codec configuration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigParseError {
    /// Shorter than the format requires.
    #[error("{what} is truncated ({len} bytes)")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A field with a value the format forbids.
    #[error("{0}")]
    Invalid(&'static str),
}

/// The useful fields of an AVCDecoderConfigurationRecord.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvcRecordInfo {
    /// profile_idc.
    pub profile: u8,
    /// profile compatibility flags.
    pub compatibility: u8,
    /// level_idc.
    pub level: u8,
    /// Bytes in each NAL unit length prefix (1, 2 or 4).
    pub nal_length_size: u8,
}

/// Checks an avcC record and returns its profile, level and NAL length size.
pub fn parse_avc_record(rec: &[u8]) -> Result<AvcRecordInfo, ConfigParseError> {
    if rec.len() < 7 {
        return Err(ConfigParseError::Truncated {
            what: "AVCDecoderConfigurationRecord",
            len: rec.len(),
        });
    }
    if rec[0] != 1 {
        return Err(ConfigParseError::Invalid(
            "AVCDecoderConfigurationRecord version is not 1",
        ));
    }
    let nal_length_size = (rec[4] & 0x03) + 1;
    if nal_length_size == 3 {
        return Err(ConfigParseError::Invalid("NAL length size of 3 is invalid"));
    }
    Ok(AvcRecordInfo {
        profile: rec[1],
        compatibility: rec[2],
        level: rec[3],
        nal_length_size,
    })
}

/// The useful fields of an AAC AudioSpecificConfig.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AacInfo {
    /// Audio object type (2 = AAC-LC).
    pub object_type: u8,
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Channel configuration.
    pub channels: u8,
}

const AAC_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Parses the first fields of an AudioSpecificConfig (ISO 14496-3 §1.6.2.1).
pub fn parse_aac_config(asc: &[u8]) -> Result<AacInfo, ConfigParseError> {
    if asc.len() < 2 {
        return Err(ConfigParseError::Truncated {
            what: "AudioSpecificConfig",
            len: asc.len(),
        });
    }
    let object_type = asc[0] >> 3;
    let freq_index = ((asc[0] & 0x07) << 1) | (asc[1] >> 7);
    let (sample_rate, channel_byte, channel_shift) = if freq_index == 15 {
        if asc.len() < 5 {
            return Err(ConfigParseError::Truncated {
                what: "AudioSpecificConfig",
                len: asc.len(),
            });
        }
        let rate = (u32::from(asc[1] & 0x7f) << 17)
            | (u32::from(asc[2]) << 9)
            | (u32::from(asc[3]) << 1)
            | u32::from(asc[4] >> 7);
        (rate, asc[4], 3)
    } else {
        let rate = *AAC_RATES
            .get(freq_index as usize)
            .ok_or(ConfigParseError::Invalid(
                "reserved AAC sampling frequency index",
            ))?;
        (rate, asc[1], 3)
    };
    let channels = (channel_byte >> channel_shift) & 0x0f;
    if object_type == 0 {
        return Err(ConfigParseError::Invalid("AAC object type 0 is invalid"));
    }
    Ok(AacInfo {
        object_type,
        sample_rate,
        channels,
    })
}

/// Reads bits MSB first from an RBSP (emulation prevention bytes already removed).
struct Bits<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.b.get(self.pos / 8)?;
        let v = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(v))
    }
    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Some(v)
    }
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        Some(((1u64 << zeros) - 1 + u64::from(self.bits(zeros)?)) as u32)
    }
    fn se(&mut self) -> Option<i32> {
        let v = self.ue()?;
        Some(if v % 2 == 1 {
            v.div_ceil(2) as i32
        } else {
            -((v / 2) as i32)
        })
    }
}

fn unescape(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// Picture size (after cropping) from the first SPS of an avcC record.
pub fn avc_dimensions(rec: &[u8]) -> Option<(u32, u32)> {
    if rec.len() < 8 || rec[5] & 0x1f == 0 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([rec[6], rec[7]]));
    let sps = rec.get(8..8 + len)?;
    h264_sps_dimensions(sps)
}

/// Picture size (after cropping) from an H.264 SPS NAL unit (ITU-T H.264 §7.3.2.1.1).
pub fn h264_sps_dimensions(nal: &[u8]) -> Option<(u32, u32)> {
    let rbsp = unescape(nal.get(1..)?);
    let mut r = Bits { b: &rbsp, pos: 0 };
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // seq_parameter_set_id
    let mut chroma = 1;
    if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile) {
        chroma = r.ue()?;
        if chroma == 3 {
            r.bit()?;
        }
        r.ue()?;
        r.ue()?;
        r.bit()?;
        if r.bit()? == 1 {
            for i in 0..if chroma == 3 { 12 } else { 8 } {
                if r.bit()? == 1 {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i32, 8i32);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256) % 256;
                        }
                        if next != 0 {
                            last = next;
                        }
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            for _ in 0..r.ue()?.min(255) {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?;
    let w_mbs = r.ue()? + 1;
    let h_units = r.ue()? + 1;
    let frame_mbs_only = r.bit()?;
    if frame_mbs_only == 0 {
        r.bit()?;
    }
    r.bit()?; // direct_8x8_inference
    let (mut cl, mut cr, mut ct, mut cb) = (0, 0, 0, 0);
    if r.bit()? == 1 {
        cl = r.ue()?;
        cr = r.ue()?;
        ct = r.ue()?;
        cb = r.ue()?;
    }
    let (sub_w, sub_h) = match chroma {
        0 => (1, 1),
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let crop_x = if chroma == 0 { 1 } else { sub_w };
    let crop_y = (if chroma == 0 { 1 } else { sub_h }) * (2 - frame_mbs_only);
    let w = (w_mbs * 16).checked_sub(crop_x * (cl + cr))?;
    let h = ((2 - frame_mbs_only) * h_units * 16).checked_sub(crop_y * (ct + cb))?;
    Some((w, h))
}

/// Microseconds since the Unix epoch, now.
pub fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Extends 32-bit wrapping millisecond timestamps to i64 (RTMP wraps every 49.7 days).
#[derive(Debug, Clone, Default)]
pub struct TimestampUnwrapper {
    last: Option<(u32, i64)>,
}

impl TimestampUnwrapper {
    /// The unwrapped value of `ts`, assuming it is within ±2^31 ms of the previous one.
    pub fn unwrap(&mut self, ts: u32) -> i64 {
        let out = match self.last {
            None => i64::from(ts),
            Some((prev, prev_ext)) => prev_ext + i64::from(ts.wrapping_sub(prev) as i32),
        };
        self.last = Some((ts, out));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aac_lc_44100_stereo() {
        // 0x12 0x10: object type 2, frequency index 4 (44100), channel configuration 2.
        let i = parse_aac_config(&[0x12, 0x10]).unwrap();
        assert_eq!(
            i,
            AacInfo {
                object_type: 2,
                sample_rate: 44100,
                channels: 2
            }
        );
        // 0x11 0x90: object type 2, index 3 (48000), mono.
        let i = parse_aac_config(&[0x11, 0x88]).unwrap();
        assert_eq!((i.sample_rate, i.channels), (48000, 1));
        assert!(matches!(
            parse_aac_config(&[0x12]),
            Err(ConfigParseError::Truncated { len: 1, .. })
        ));
        // Index 15 announces an explicit 24-bit rate that is not there.
        assert!(matches!(
            parse_aac_config(&[0x17, 0x80]),
            Err(ConfigParseError::Truncated { len: 2, .. })
        ));
    }

    #[test]
    fn avc_record() {
        let r = parse_avc_record(&[1, 0x64, 0, 0x1f, 0xff, 0xe1, 0]).unwrap();
        assert_eq!((r.profile, r.level, r.nal_length_size), (0x64, 0x1f, 4));
        assert!(matches!(
            parse_avc_record(&[0, 0x64, 0, 0x1f, 0xff, 0xe1, 0]),
            Err(ConfigParseError::Invalid(_))
        ));
        assert!(matches!(
            parse_avc_record(&[1, 2]),
            Err(ConfigParseError::Truncated { len: 2, .. })
        ));
    }

    #[test]
    fn sps_dimensions() {
        // SPS written by x264 (ffmpeg testsrc2): 1280x720 High, 1920x1080 High (cropped from
        // 1088 lines), 640x360 Constrained Baseline.
        let sps_720 = [
            0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00,
            0x03, 0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
        ];
        assert_eq!(h264_sps_dimensions(&sps_720), Some((1280, 720)));
        let sps_1080 = [
            0x67, 0x64, 0x00, 0x28, 0xac, 0xd9, 0x40, 0x78, 0x02, 0x27, 0xe5, 0xc0, 0x44, 0x00,
            0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x60, 0xc6, 0x58,
        ];
        assert_eq!(h264_sps_dimensions(&sps_1080), Some((1920, 1080)));
        let sps_360 = [
            0x67, 0x42, 0xc0, 0x1e, 0xda, 0x02, 0x80, 0xbf, 0xe5, 0xc0, 0x44, 0x00, 0x00, 0x03,
            0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x58, 0xba, 0x80,
        ];
        assert_eq!(h264_sps_dimensions(&sps_360), Some((640, 360)));
        assert_eq!(h264_sps_dimensions(&[0x67, 0x64]), None);
        assert_eq!(h264_sps_dimensions(&[]), None);
    }

    #[test]
    fn unwrap_timestamps_across_wrap() {
        let mut u = TimestampUnwrapper::default();
        assert_eq!(u.unwrap(u32::MAX - 10), i64::from(u32::MAX - 10));
        assert_eq!(u.unwrap(5), i64::from(u32::MAX) + 6);
        assert_eq!(u.unwrap(3), i64::from(u32::MAX) + 4); // small step back (B-frame dts jitter)
    }
}
