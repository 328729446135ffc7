//! One RTMP publishing session, sans-IO: bytes in, events and bytes out.
//!
//! Incoming bytes go through our `ChunkReader` (correct, bounded reassembly); each whole message
//! is re-chunked as a single type 0 chunk for rml_rtmp's `ServerSession`, which runs the
//! connect/createStream/publish workflow. Media messages are turned into `media` values here.
//! No sockets, no clocks: the caller passes the arrival time.

use super::chunk::{ChunkError, ChunkLimits, ChunkReader};
use super::flv::{self, AudioTag, FlvError, VideoTag};
use crate::media::{AudioConfig, Frame, Metadata, TimestampUnwrapper, TrackKind, VideoConfig};
use bytes::Bytes;
use rml_amf0::Amf0Value;
use rml_rtmp::chunk_io::ChunkSerializer;
use rml_rtmp::messages::{MessagePayload, RtmpMessage};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionError, ServerSessionEvent, ServerSessionResult,
};
use rml_rtmp::time::RtmpTimestamp;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What the connection task must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// Bytes to send to the peer, in order.
    Send(Bytes),
    /// The peer asks to publish with this key; answer with `accept_publish` or `reject_publish`.
    PublishRequested {
        /// Pass back to accept/reject.
        request_id: u32,
        /// The stream key (secret: never log it).
        key: String,
    },
    /// onMetaData.
    Metadata(Metadata),
    /// A video sequence header.
    VideoConfig(VideoConfig),
    /// An audio sequence header.
    AudioConfig(AudioConfig),
    /// A media frame.
    Frame(Frame),
    /// The peer stopped publishing (FCUnpublish/deleteStream).
    PublishFinished,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Chunk layer.
    #[error("chunk stream: {0}")]
    Chunk(#[from] ChunkError),
    /// RTMP message layer (rml_rtmp).
    #[error("rtmp: {0}")]
    Rtmp(String),
    /// Media payload.
    #[error("media: {0}")]
    Flv(#[from] FlvError),
}

impl From<ServerSessionError> for SessionError {
    fn from(e: ServerSessionError) -> Self {
        SessionError::Rtmp(e.to_string())
    }
}

/// The RTMP server side of one publishing connection.
pub struct IngestSession {
    reader: ChunkReader,
    rechunk: ChunkSerializer,
    rml: ServerSession,
    app: String,
    video_ts: TimestampUnwrapper,
    audio_ts: TimestampUnwrapper,
    mp3_config_sent: bool,
    /// Message stream id of each publish request not yet answered.
    publish_streams: Vec<(u32, u32)>,
    /// Message stream id of the message being handed to rml_rtmp.
    command_stream: u32,
}

/// Checks an AMF0-bearing message before rml_rtmp parses it. rml_amf0 recurses once per
/// nesting level with no bound (a deep body overflows the worker's stack and aborts the
/// process), so every command and data message (types 15, 17, 18, 20, which rml_rtmp all reads
/// as AMF0) is first walked by our bounded, non-recursive `amf0::check`. rml_rtmp 0.8 also
/// panics on a command with fewer than three values (found by the `rtmp_session` fuzz target).
fn check_amf0(type_id: u8, payload: &[u8]) -> Result<(), SessionError> {
    let command = match type_id {
        17 | 20 => true,
        15 | 18 => false,
        _ => return Ok(()),
    };
    // rml_rtmp skips the leading zero of an AMF3-flagged command.
    let data = match payload.first() {
        Some(0) if type_id == 17 => &payload[1..],
        _ => payload,
    };
    let values = super::amf0::check(data, super::amf0::MAX_DEPTH)
        .map_err(|e| SessionError::Rtmp(format!("malformed AMF0 message (type {type_id}): {e}")))?;
    if command && values < 3 {
        return Err(SessionError::Rtmp(format!(
            "AMF0 command with {values} values, at least 3 required"
        )));
    }
    // rml_rtmp takes the metadata of `@setDataFrame` as the third decoded value without looking
    // (it panics on fewer). Counted as rml_amf0 decodes them (an object-end marker at the top
    // level ends its list early), after the depth check above made decoding safe.
    if !command && data.starts_with(SET_DATA_FRAME) {
        let decoded = rml_amf0::deserialize(&mut std::io::Cursor::new(data))
            .map_err(|e| SessionError::Rtmp(format!("malformed @setDataFrame: {e}")))?;
        if decoded.len() < 3 {
            return Err(SessionError::Rtmp(format!(
                "@setDataFrame with {} values, at least 3 required",
                decoded.len()
            )));
        }
    }
    Ok(())
}

/// An AMF0 string "@setDataFrame", as a data message begins with it.
const SET_DATA_FRAME: &[u8] = b"\x02\x00\x0d@setDataFrame";

/// The chunk size of what we send to the client.
const OUT_CHUNK_SIZE: u32 = 4096;

/// The chunk size used between our chunk layer and rml_rtmp: each message is one chunk.
const RECHUNK_SIZE: u32 = 0xFF_FFFF;

impl IngestSession {
    /// A session that accepts publishers on application `app`; returns the bytes to send first.
    pub fn new(app: &str, limits: ChunkLimits) -> Result<(Self, Vec<Bytes>), SessionError> {
        let mut cfg = ServerSessionConfig::new();
        cfg.chunk_size = OUT_CHUNK_SIZE;
        let (mut rml, initial) = ServerSession::new(cfg)?;
        let mut rechunk = ChunkSerializer::new();
        // Tell rml_rtmp's deserializer that every message arrives as one chunk.
        let packet = rechunk
            .set_max_chunk_size(RECHUNK_SIZE, RtmpTimestamp::new(0))
            .map_err(|e| SessionError::Rtmp(e.to_string()))?;
        let extra = rml.handle_input(&packet.bytes)?;
        let mut out: Vec<Bytes> = vec![];
        for r in initial.into_iter().chain(extra) {
            if let ServerSessionResult::OutboundResponse(p) = r {
                out.push(Bytes::from(p.bytes));
            }
        }
        Ok((
            IngestSession {
                reader: ChunkReader::new(limits),
                rechunk,
                rml,
                app: app.to_string(),
                video_ts: TimestampUnwrapper::default(),
                audio_ts: TimestampUnwrapper::default(),
                mp3_config_sent: false,
                publish_streams: Vec::new(),
                command_stream: 0,
            },
            out,
        ))
    }

    /// Bytes held by the chunk layer.
    pub fn buffered(&self) -> usize {
        self.reader.buffered()
    }

    /// Feeds received bytes; `arrival_us` stamps every frame they complete.
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        arrival_us: u64,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        self.reader.push(bytes)?;
        let mut events = vec![];
        while let Some(msg) = self.reader.next_message()? {
            check_amf0(msg.type_id, &msg.payload)?;
            let payload = MessagePayload {
                timestamp: RtmpTimestamp::new(msg.timestamp),
                type_id: msg.type_id,
                message_stream_id: msg.stream_id,
                data: msg.payload,
            };
            let packet = self
                .rechunk
                .serialize(&payload, true, false)
                .map_err(|e| SessionError::Rtmp(e.to_string()))?;
            self.command_stream = payload.message_stream_id;
            let results = self.rml_call(|rml| rml.handle_input(&packet.bytes))?;
            self.process(results, arrival_us, &mut events)?;
        }
        Ok(events)
    }

    /// Accepts a publish request.
    pub fn accept_publish(&mut self, request_id: u32) -> Result<Vec<SessionEvent>, SessionError> {
        let results = self.rml_call(|rml| rml.accept_request(request_id))?;
        let mut events = vec![];
        self.process(results, 0, &mut events)?;
        Ok(events)
    }

    /// Rejects a publish request with an RTMP error status (`code`, `description`): an
    /// `onStatus` with level `error` on the request's stream, as nginx-rtmp and SRS send it and
    /// FFmpeg and OBS (librtmp) read it. rml_rtmp would send an `_error` result with level
    /// `_error` instead, which librtmp does not take as the publish's answer. The connection
    /// must end after this: the bytes bypass rml_rtmp's header compression state.
    pub fn reject_publish(
        &mut self,
        request_id: u32,
        code: &str,
        description: &str,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        // Let rml_rtmp forget the request; its own answer is not sent.
        self.rml_call(|rml| rml.reject_request(request_id, code, description))?;
        let stream_id = self
            .publish_streams
            .iter()
            .find(|(r, _)| *r == request_id)
            .map_or(1, |(_, s)| *s);
        self.publish_streams.retain(|(r, _)| *r != request_id);
        let info: std::collections::HashMap<String, Amf0Value> = [
            ("level", "error"),
            ("code", code),
            ("description", description),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Amf0Value::Utf8String(v.to_string())))
        .collect();
        let msg = RtmpMessage::Amf0Command {
            command_name: "onStatus".into(),
            transaction_id: 0.0,
            command_object: Amf0Value::Null,
            additional_arguments: vec![Amf0Value::Object(info)],
        };
        let rtmp = |e: &dyn std::fmt::Display| SessionError::Rtmp(e.to_string());
        let payload = msg
            .into_message_payload(RtmpTimestamp::new(0), stream_id)
            .map_err(|e| rtmp(&e))?;
        // Chunked at the size rml_rtmp announced to the client (its SetChunkSize was sent).
        let mut ser = ChunkSerializer::new();
        ser.set_max_chunk_size(OUT_CHUNK_SIZE, RtmpTimestamp::new(0))
            .map_err(|e| rtmp(&e))?;
        let packet = ser.serialize(&payload, true, false).map_err(|e| rtmp(&e))?;
        Ok(vec![SessionEvent::Send(Bytes::from(packet.bytes))])
    }

    /// rml_rtmp must not take the process down on input we have not anticipated.
    fn rml_call(
        &mut self,
        f: impl FnOnce(&mut ServerSession) -> Result<Vec<ServerSessionResult>, ServerSessionError>,
    ) -> Result<Vec<ServerSessionResult>, SessionError> {
        match catch_unwind(AssertUnwindSafe(|| f(&mut self.rml))) {
            Ok(r) => Ok(r?),
            Err(_) => Err(SessionError::Rtmp("rml_rtmp panicked on input".into())),
        }
    }

    fn process(
        &mut self,
        results: Vec<ServerSessionResult>,
        arrival_us: u64,
        events: &mut Vec<SessionEvent>,
    ) -> Result<(), SessionError> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => {
                    events.push(SessionEvent::Send(Bytes::from(p.bytes)))
                }
                ServerSessionResult::RaisedEvent(e) => self.on_event(e, arrival_us, events)?,
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    fn on_event(
        &mut self,
        e: ServerSessionEvent,
        arrival_us: u64,
        events: &mut Vec<SessionEvent>,
    ) -> Result<(), SessionError> {
        match e {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                let results = if app_name.trim_end_matches('/') == self.app {
                    self.rml_call(|rml| rml.accept_request(request_id))?
                } else {
                    let desc = format!("unknown application; publish to /{}/KEY", self.app);
                    self.rml_call(|rml| {
                        rml.reject_request(request_id, "NetConnection.Connect.Rejected", &desc)
                    })?
                };
                self.process(results, arrival_us, events)?;
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => {
                // rml_rtmp answers on the message stream the publish command came on.
                let stream_id = self.command_stream;
                // Bounded: rml_rtmp allows one publish per stream id, and a refusal ends the
                // connection.
                if self.publish_streams.len() < 16 {
                    self.publish_streams.push((request_id, stream_id));
                }
                // Encoders may append query parameters to the key; they are not part of it.
                let key = stream_key.split('?').next().unwrap_or("").to_string();
                events.push(SessionEvent::PublishRequested { request_id, key });
            }
            ServerSessionEvent::PublishStreamFinished { .. } => {
                events.push(SessionEvent::PublishFinished)
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                events.push(SessionEvent::Metadata(Metadata {
                    width: metadata.video_width,
                    height: metadata.video_height,
                    frame_rate: metadata.video_frame_rate,
                    video_kbps: metadata.video_bitrate_kbps,
                    encoder: metadata.encoder,
                }))
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => match flv::parse_video(&data)? {
                VideoTag::Config(c) => events.push(SessionEvent::VideoConfig(c)),
                VideoTag::Frame {
                    keyframe,
                    cts,
                    data,
                } => {
                    let dts = self.video_ts.unwrap(timestamp.value);
                    events.push(SessionEvent::Frame(Frame {
                        track: TrackKind::Video,
                        dts,
                        pts: dts + i64::from(cts),
                        keyframe,
                        arrival_us,
                        data,
                    }));
                }
                VideoTag::Nothing => {}
            },
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                let tag = flv::parse_audio(&data)?;
                match tag {
                    AudioTag::Config(c) => events.push(SessionEvent::AudioConfig(c)),
                    AudioTag::Nothing => {}
                    AudioTag::Frame(payload) => {
                        if data[0] >> 4 == 2 && !self.mp3_config_sent {
                            self.mp3_config_sent = true;
                            events.push(SessionEvent::AudioConfig(flv::mp3_config(data[0])));
                        }
                        let dts = self.audio_ts.unwrap(timestamp.value);
                        events.push(SessionEvent::Frame(Frame {
                            track: TrackKind::Audio,
                            dts,
                            pts: dts,
                            keyframe: true,
                            arrival_us,
                            data: payload,
                        }));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::chunk::write;

    #[test]
    fn short_amf0_command_is_an_error_not_a_panic() {
        let (mut s, _) = IngestSession::new("live", ChunkLimits::default()).unwrap();
        // AMF0 command holding only the string "connect": rml_rtmp alone panics on it.
        let body = [0x02, 0x00, 0x07, b'c', b'o', b'n', b'n', b'e', b'c', b't'];
        let bytes = write::message(3, 0, 20, 0, &body, 128);
        let err = s.handle_input(&bytes, 0).unwrap_err();
        assert!(err.to_string().contains("at least 3"), "{err}");
    }

    /// Found by the fuzz run in the test command: connect, createStream, publish, then
    /// `@setDataFrame` "onMetaData" and object-end markers where the metadata should be. The
    /// connection ends with an error; rml_rtmp is never handed the message (it panicked).
    #[test]
    fn set_data_frame_without_metadata_is_an_error_not_a_panic() {
        let data = include_bytes!("testdata/set_data_frame_without_metadata.bin");
        let (mut s, _) = IngestSession::new("live", ChunkLimits::default()).unwrap();
        let mut published = false;
        let mut end = None;
        for piece in data.chunks(97) {
            match s.handle_input(piece, 0) {
                Ok(events) => {
                    for e in events {
                        if let SessionEvent::PublishRequested { request_id, .. } = e {
                            s.accept_publish(request_id).unwrap();
                            published = true;
                        }
                    }
                }
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        assert!(published);
        let e = end.expect("the message is refused");
        assert!(e.to_string().contains("@setDataFrame with 2 values"), "{e}");
    }
}
