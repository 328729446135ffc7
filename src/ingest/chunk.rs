//! RTMP chunk stream reassembly (RTMP spec §5.3), sans-IO, in front of rml_rtmp.
//!
//! rml_rtmp 0.8 keeps one reassembly buffer for all chunk streams, so two messages interleaved
//! on different chunk streams are mis-assembled, and some malformed lengths panic. This reader
//! keeps state per chunk stream, enforces size limits before allocating, and applies Set Chunk
//! Size and Abort itself. It hands out whole messages; the session re-chunks each one as a
//! single chunk for rml_rtmp, which then never sees interleaving or hostile framing.
//!
//! Timestamp semantics follow FFmpeg's reader and writer (the de-facto reference): a type 3
//! chunk that starts a new message adds the previous header's timestamp field again.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;

/// A complete RTMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// The chunk stream it arrived on.
    pub csid: u32,
    /// Absolute timestamp (32-bit, wrapping), milliseconds.
    pub timestamp: u32,
    /// Message type id.
    pub type_id: u8,
    /// Message stream id.
    pub stream_id: u32,
    /// The payload.
    pub payload: Bytes,
}

/// Limits that protect the reader from hostile peers.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Largest chunk size a peer may set.
    pub max_chunk_size: u32,
    /// Largest total of partly received messages plus unparsed input.
    pub max_buffered_bytes: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_message_bytes: 8 * 1024 * 1024,
            max_chunk_size: 1024 * 1024,
            max_buffered_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why the chunk stream cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A message larger than `max_message_bytes`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Declared message length.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Set Chunk Size outside 1..=max_chunk_size (or with the reserved top bit set).
    #[error("peer set chunk size {size}, allowed 1..={limit}")]
    BadChunkSize {
        /// The requested size.
        size: u32,
        /// The limit.
        limit: u32,
    },
    /// More bytes held in partial messages than allowed.
    #[error("{held} bytes buffered in partial messages, limit {limit}")]
    BufferLimit {
        /// Bytes held.
        held: usize,
        /// The limit.
        limit: usize,
    },
    /// A compressed header on a chunk stream that has no previous header.
    #[error("chunk stream {csid}: type {fmt} header without a previous type 0 header")]
    NoPreviousHeader {
        /// Chunk stream id.
        csid: u32,
        /// Header type.
        fmt: u8,
    },
    /// A new message header while the previous message on that chunk stream is unfinished.
    #[error("chunk stream {csid}: new message header before the previous message finished")]
    UnfinishedMessage {
        /// Chunk stream id.
        csid: u32,
    },
    /// A malformed protocol control message.
    #[error("malformed {0} message")]
    BadControl(&'static str),
}

#[derive(Debug, Default)]
struct ChunkStream {
    has_header: bool,
    timestamp: u32,
    ts_field: u32,
    extended: bool,
    length: u32,
    type_id: u8,
    stream_id: u32,
    partial: Option<BytesMut>,
}

/// Reassembles RTMP messages from chunk bytes.
#[derive(Debug)]
pub struct ChunkReader {
    limits: ChunkLimits,
    chunk_size: u32,
    buf: BytesMut,
    streams: HashMap<u32, ChunkStream>,
    partial_bytes: usize,
}

/// RTMP message type ids handled by the chunk layer.
const SET_CHUNK_SIZE: u8 = 1;
const ABORT: u8 = 2;
/// At most this many chunk streams may hold state (the protocol allows 65599).
const MAX_CHUNK_STREAMS: usize = 256;

impl ChunkReader {
    /// A reader with the RTMP default chunk size of 128.
    pub fn new(limits: ChunkLimits) -> Self {
        ChunkReader {
            limits,
            chunk_size: 128,
            buf: BytesMut::with_capacity(64 * 1024),
            streams: HashMap::new(),
            partial_bytes: 0,
        }
    }

    /// The chunk size in force for incoming chunks.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Bytes held: unparsed input plus partial messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.partial_bytes
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ChunkError> {
        self.buf.extend_from_slice(bytes);
        self.check_buffer()
    }

    fn check_buffer(&self) -> Result<(), ChunkError> {
        let held = self.buffered();
        if held > self.limits.max_buffered_bytes {
            return Err(ChunkError::BufferLimit {
                held,
                limit: self.limits.max_buffered_bytes,
            });
        }
        Ok(())
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    ///
    /// Set Chunk Size and Abort are applied here and not returned.
    pub fn next_message(&mut self) -> Result<Option<RawMessage>, ChunkError> {
        loop {
            let Some(msg) = self.next_chunk()? else {
                return Ok(None);
            };
            match msg.type_id {
                SET_CHUNK_SIZE => {
                    if msg.payload.len() < 4 {
                        return Err(ChunkError::BadControl("Set Chunk Size"));
                    }
                    let size = u32::from_be_bytes([
                        msg.payload[0],
                        msg.payload[1],
                        msg.payload[2],
                        msg.payload[3],
                    ]);
                    if size == 0 || size > self.limits.max_chunk_size || size & 0x8000_0000 != 0 {
                        return Err(ChunkError::BadChunkSize {
                            size,
                            limit: self.limits.max_chunk_size,
                        });
                    }
                    self.chunk_size = size;
                }
                ABORT => {
                    if msg.payload.len() < 4 {
                        return Err(ChunkError::BadControl("Abort"));
                    }
                    let csid = u32::from_be_bytes([
                        msg.payload[0],
                        msg.payload[1],
                        msg.payload[2],
                        msg.payload[3],
                    ]);
                    if let Some(cs) = self.streams.get_mut(&csid) {
                        if let Some(p) = cs.partial.take() {
                            self.partial_bytes -= p.len();
                        }
                    }
                }
                _ => return Ok(Some(msg)),
            }
        }
    }

    /// Parses chunks until one completes a message or the input runs out.
    fn next_chunk(&mut self) -> Result<Option<RawMessage>, ChunkError> {
        loop {
            let b = &self.buf[..];
            if b.is_empty() {
                return Ok(None);
            }
            let fmt = b[0] >> 6;
            let (csid, mut pos) = match b[0] & 0x3f {
                0 => {
                    if b.len() < 2 {
                        return Ok(None);
                    }
                    (64 + u32::from(b[1]), 2)
                }
                1 => {
                    if b.len() < 3 {
                        return Ok(None);
                    }
                    (64 + u32::from(b[1]) + 256 * u32::from(b[2]), 3)
                }
                n => (u32::from(n), 1),
            };
            let header_len = [11usize, 7, 3, 0][fmt as usize];
            if b.len() < pos + header_len {
                return Ok(None);
            }
            let h = &b[pos..pos + header_len];
            pos += header_len;
            let be24 =
                |s: &[u8]| (u32::from(s[0]) << 16) | (u32::from(s[1]) << 8) | u32::from(s[2]);

            if !self.streams.contains_key(&csid) && self.streams.len() >= MAX_CHUNK_STREAMS {
                return Err(ChunkError::BufferLimit {
                    held: self.streams.len(),
                    limit: MAX_CHUNK_STREAMS,
                });
            }
            let cs = self.streams.entry(csid).or_default();
            if fmt != 0 && !cs.has_header {
                return Err(ChunkError::NoPreviousHeader { csid, fmt });
            }

            // Decode the header into local values; commit only when the whole chunk is here.
            let mut ts_field = cs.ts_field;
            let mut length = cs.length;
            let mut type_id = cs.type_id;
            let mut stream_id = cs.stream_id;
            let extended;
            if fmt <= 2 {
                ts_field = be24(&h[0..3]);
                extended = ts_field == 0xFF_FFFF;
                if fmt <= 1 {
                    length = be24(&h[3..6]);
                    type_id = h[6];
                }
                if fmt == 0 {
                    stream_id = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
                }
            } else {
                extended = cs.extended;
            }
            if extended {
                if b.len() < pos + 4 {
                    return Ok(None);
                }
                let ext = u32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
                pos += 4;
                if fmt <= 2 {
                    ts_field = ext;
                }
            }
            // A full header in the middle of a message: FFmpeg's reader continues the message
            // when the header describes the same message (rml_rtmp's writer sends every chunk
            // of an uncompressed message with a type 0 header); anything else is an error.
            let resumed = fmt != 3 && cs.partial.is_some();
            if resumed && (length, type_id, stream_id) != (cs.length, cs.type_id, cs.stream_id) {
                return Err(ChunkError::UnfinishedMessage { csid });
            }
            if length as usize > self.limits.max_message_bytes {
                return Err(ChunkError::MessageTooLarge {
                    size: length as usize,
                    limit: self.limits.max_message_bytes,
                });
            }
            let have = cs.partial.as_ref().map_or(0, |p| p.len());
            let chunk_len = (length as usize - have).min(self.chunk_size as usize);
            if b.len() < pos + chunk_len {
                // Wait for the whole chunk; the buffer limit bounds how long that can grow.
                return Ok(None);
            }

            // Commit the header.
            let starting = cs.partial.is_none();
            if starting {
                cs.timestamp = match fmt {
                    0 => ts_field,
                    _ => cs.timestamp.wrapping_add(ts_field),
                };
            }
            if fmt <= 2 && !resumed {
                cs.ts_field = ts_field;
                cs.extended = extended;
            }
            cs.has_header = true;
            cs.length = length;
            cs.type_id = type_id;
            cs.stream_id = stream_id;

            self.buf.advance(pos);
            let data = self.buf.split_to(chunk_len);
            let complete = have + chunk_len == length as usize;
            if complete && have == 0 {
                return Ok(Some(RawMessage {
                    csid,
                    timestamp: cs.timestamp,
                    type_id,
                    stream_id,
                    payload: data.freeze(),
                }));
            }
            let partial = cs
                .partial
                .get_or_insert_with(|| BytesMut::with_capacity(length as usize));
            partial.extend_from_slice(&data);
            self.partial_bytes += chunk_len;
            if complete {
                let payload = cs.partial.take().unwrap_or_default().freeze();
                self.partial_bytes -= payload.len();
                return Ok(Some(RawMessage {
                    csid,
                    timestamp: cs.timestamp,
                    type_id,
                    stream_id,
                    payload,
                }));
            }
            self.check_buffer()?;
        }
    }
}

/// Writes chunks (for tests, fuzzing and the load generator's publishers).
pub mod write {
    /// Basic header bytes for a chunk stream id.
    pub fn basic_header(fmt: u8, csid: u32) -> Vec<u8> {
        match csid {
            2..=63 => vec![(fmt << 6) | csid as u8],
            64..=319 => vec![fmt << 6, (csid - 64) as u8],
            _ => {
                let v = csid - 64;
                vec![(fmt << 6) | 1, (v & 0xff) as u8, (v >> 8) as u8]
            }
        }
    }

    /// A type 0 chunk header.
    pub fn type0(csid: u32, ts: u32, len: usize, type_id: u8, stream_id: u32) -> Vec<u8> {
        let mut v = basic_header(0, csid);
        let field = ts.min(0xFF_FFFF);
        v.extend_from_slice(&field.to_be_bytes()[1..]);
        v.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        v.push(type_id);
        v.extend_from_slice(&stream_id.to_le_bytes());
        if field == 0xFF_FFFF {
            v.extend_from_slice(&ts.to_be_bytes());
        }
        v
    }

    /// A whole message as chunks of `chunk_size`, continuation chunks as type 3.
    pub fn message(
        csid: u32,
        ts: u32,
        type_id: u8,
        stream_id: u32,
        payload: &[u8],
        chunk_size: usize,
    ) -> Vec<u8> {
        let mut v = type0(csid, ts, payload.len(), type_id, stream_id);
        for (i, c) in payload.chunks(chunk_size).enumerate() {
            if i > 0 {
                v.extend_from_slice(&basic_header(3, csid));
                if ts >= 0xFF_FFFF {
                    v.extend_from_slice(&ts.to_be_bytes());
                }
            }
            v.extend_from_slice(c);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::write::*;
    use super::*;

    fn all(r: &mut ChunkReader) -> Vec<RawMessage> {
        let mut out = vec![];
        while let Some(m) = r.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn single_message_split_anywhere() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let bytes = message(6, 1234, 9, 1, &payload, 128);
        for split in 0..bytes.len() {
            let mut r = ChunkReader::new(ChunkLimits::default());
            r.push(&bytes[..split]).unwrap();
            let mut got = all(&mut r);
            r.push(&bytes[split..]).unwrap();
            got.extend(all(&mut r));
            assert_eq!(got.len(), 1, "split at {split}");
            assert_eq!(got[0].payload.as_ref(), &payload[..]);
            assert_eq!(
                (got[0].timestamp, got[0].type_id, got[0].stream_id),
                (1234, 9, 1)
            );
        }
    }

    #[test]
    fn interleaved_chunk_streams_reassemble() {
        // Video on csid 6 and audio on csid 4, chunks alternating mid-message: the case
        // rml_rtmp 0.8 gets wrong.
        let video: Vec<u8> = vec![0xAA; 300];
        let audio: Vec<u8> = vec![0xBB; 200];
        let v = message(6, 40, 9, 1, &video, 128);
        let a = message(4, 42, 8, 1, &audio, 128);
        // Split each message into its chunks: header+128, 1+128, 1+44 (video); header+128, 1+72.
        let (v1, rest) = v.split_at(12 + 128);
        let (v2, v3) = rest.split_at(1 + 128);
        let (a1, a2) = a.split_at(12 + 128);
        let mut wire = vec![];
        for part in [v1, a1, v2, a2, v3] {
            wire.extend_from_slice(part);
        }
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&wire).unwrap();
        let got = all(&mut r);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].type_id, got[0].payload.len()), (8, 200));
        assert!(got[0].payload.iter().all(|&b| b == 0xBB));
        assert_eq!((got[1].type_id, got[1].payload.len()), (9, 300));
        assert!(got[1].payload.iter().all(|&b| b == 0xAA));
        assert_eq!((got[0].timestamp, got[1].timestamp), (42, 40));
    }

    #[test]
    fn compressed_headers_and_deltas() {
        let mut wire = type0(4, 1000, 2, 8, 1);
        wire.extend_from_slice(&[1, 2]);
        // Type 1: delta 23, new length 3.
        wire.extend_from_slice(&basic_header(1, 4));
        wire.extend_from_slice(&[0, 0, 23, 0, 0, 3, 8]);
        wire.extend_from_slice(&[3, 4, 5]);
        // Type 2: delta 20.
        wire.extend_from_slice(&basic_header(2, 4));
        wire.extend_from_slice(&[0, 0, 20]);
        wire.extend_from_slice(&[6, 7, 8]);
        // Type 3 starting a new message: repeats delta 20.
        wire.extend_from_slice(&basic_header(3, 4));
        wire.extend_from_slice(&[9, 10, 11]);
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&wire).unwrap();
        let ts: Vec<u32> = all(&mut r).iter().map(|m| m.timestamp).collect();
        assert_eq!(ts, vec![1000, 1023, 1043, 1063]);
    }

    #[test]
    fn extended_timestamps() {
        let payload = vec![7u8; 300];
        let bytes = message(5, 0x0100_0000, 9, 1, &payload, 128);
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&bytes).unwrap();
        let m = all(&mut r);
        assert_eq!(m[0].timestamp, 0x0100_0000);
        assert_eq!(m[0].payload.len(), 300);
    }

    #[test]
    fn set_chunk_size_applies_and_is_bounded() {
        let mut wire = message(2, 0, 1, 0, &4096u32.to_be_bytes(), 128);
        let payload = vec![1u8; 4000];
        wire.extend(message(6, 0, 9, 1, &payload, 4096));
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&wire).unwrap();
        let m = all(&mut r);
        assert_eq!(m.len(), 1);
        assert_eq!(r.chunk_size(), 4096);

        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&message(2, 0, 1, 0, &0x7FFF_FFFFu32.to_be_bytes(), 128))
            .unwrap();
        assert!(matches!(
            r.next_message(),
            Err(ChunkError::BadChunkSize {
                size: 0x7FFF_FFFF,
                ..
            })
        ));
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&message(2, 0, 1, 0, &0u32.to_be_bytes(), 128))
            .unwrap();
        assert!(matches!(
            r.next_message(),
            Err(ChunkError::BadChunkSize { size: 0, .. })
        ));
    }

    #[test]
    fn oversized_message_rejected_before_buffering() {
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&type0(6, 0, 0xFF_FFFF, 9, 1)).unwrap();
        assert!(matches!(
            r.next_message(),
            Err(ChunkError::MessageTooLarge {
                size: 0xFF_FFFF,
                ..
            })
        ));
    }

    #[test]
    fn abort_discards_partial() {
        let mut wire = message(6, 0, 9, 1, &[1u8; 300], 128);
        wire.truncate(12 + 128); // first chunk only
        wire.extend(message(2, 0, 2, 0, &6u32.to_be_bytes(), 128));
        wire.extend(message(6, 5, 9, 1, &[2u8; 10], 128));
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&wire).unwrap();
        let m = all(&mut r);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].payload.as_ref(), &[2u8; 10]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn compressed_header_without_history_is_an_error() {
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&[0xC6, 1, 2, 3]).unwrap();
        assert!(matches!(
            r.next_message(),
            Err(ChunkError::NoPreviousHeader { csid: 6, fmt: 3 })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz; cargo-fuzz covers this properly (fuzz/).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut r = ChunkReader::new(ChunkLimits {
                max_message_bytes: 4096,
                max_chunk_size: 4096,
                max_buffered_bytes: 65536,
            });
            let mut bytes = vec![];
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            if r.push(&bytes).is_ok() {
                while let Ok(Some(_)) = r.next_message() {}
            }
        }
    }

    /// Chunks written by an independent writer (rml_rtmp's serializer, as its client sessions
    /// send them), not by this module's own helper: header compression (types 1, 2 and 3),
    /// timestamps across the 24-bit field into the extended timestamp, deltas across the 32-bit
    /// wrap, Set Chunk Size changes between messages, messages of one byte to several chunks,
    /// all fed in uneven pieces.
    #[test]
    fn an_independent_writers_chunks_reassemble() {
        use rml_rtmp::chunk_io::ChunkSerializer;
        use rml_rtmp::messages::MessagePayload;
        use rml_rtmp::time::RtmpTimestamp;

        let mut ser = ChunkSerializer::new();
        let mut wire = Vec::new();
        let mut want = Vec::new();
        let mut n = 0u32;
        let mut send =
            |ser: &mut ChunkSerializer, wire: &mut Vec<u8>, ts: u32, type_id: u8, len: usize| {
                n += 1;
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u32 ^ n.wrapping_mul(97)) as u8)
                    .collect();
                let m = MessagePayload {
                    timestamp: RtmpTimestamp::new(ts),
                    type_id,
                    message_stream_id: 1,
                    data: Bytes::from(data.clone()),
                };
                wire.extend(ser.serialize(&m, false, false).unwrap().bytes);
                want.push((ts, type_id, data));
            };
        // Before and across 0xFFFFFF (16777.215 s), with a fixed delta (type 3 headers), a
        // varying one (type 2) and a new length (type 1).
        let mut ts = 0xFF_FF00u32;
        for i in 0..20 {
            send(&mut ser, &mut wire, ts, 9, 100 + (i % 3) * 50);
            send(&mut ser, &mut wire, ts + 5, 8, 20);
            ts += 33;
        }
        // Far past it: deltas themselves extended.
        for t in [0x0200_0000u32, 0x0400_0000, 0x7FFF_FFFF] {
            send(&mut ser, &mut wire, t, 9, 300);
        }
        wire.extend(
            ser.set_max_chunk_size(4096, RtmpTimestamp::new(0))
                .unwrap()
                .bytes,
        );
        // Across the 32-bit wrap: the writer sends wrapped deltas.
        let mut ts = 0xFFFF_FF00u32;
        for _ in 0..12 {
            send(&mut ser, &mut wire, ts, 9, 5000);
            send(&mut ser, &mut wire, ts.wrapping_add(3), 8, 1);
            ts = ts.wrapping_add(40);
        }
        wire.extend(
            ser.set_max_chunk_size(1, RtmpTimestamp::new(0))
                .unwrap()
                .bytes,
        );
        send(&mut ser, &mut wire, 1000, 18, 37);
        wire.extend(
            ser.set_max_chunk_size(65_536, RtmpTimestamp::new(0))
                .unwrap()
                .bytes,
        );
        send(&mut ser, &mut wire, 1040, 9, 200_000);
        send(&mut ser, &mut wire, 1080, 9, 65_536);

        let mut r = ChunkReader::new(ChunkLimits::default());
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut step = 1;
        while !rest.is_empty() {
            let k = step.min(rest.len());
            r.push(&rest[..k]).unwrap();
            rest = &rest[k..];
            got.extend(all(&mut r));
            step = step % 997 + 13;
        }
        assert_eq!(r.chunk_size(), 65_536);
        assert_eq!(got.len(), want.len());
        for (i, (m, (ts, type_id, data))) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                (m.timestamp, m.type_id, m.stream_id),
                (*ts, *type_id, 1),
                "message {i}"
            );
            assert_eq!(m.payload.as_ref(), &data[..], "message {i}");
        }
        assert_eq!(r.buffered(), 0);
    }

    /// A full header mid-message continues the message only if it describes the same message.
    #[test]
    fn a_full_header_mid_message_must_describe_that_message() {
        let payload = vec![7u8; 200];
        let first = &message(6, 10, 9, 1, &payload, 128)[..12 + 128];
        // The rest under a type 0 header of the same message: accepted (FFmpeg does).
        let mut same = first.to_vec();
        same.extend(type0(6, 10, 200, 9, 1));
        same.extend(&payload[128..]);
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&same).unwrap();
        let got = all(&mut r);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].timestamp, got[0].payload.len()), (10, 200));
        // A header of another length: the unfinished message is an error, not spliced.
        let mut other = first.to_vec();
        other.extend(type0(6, 10, 72, 9, 1));
        other.extend(&payload[128..]);
        let mut r = ChunkReader::new(ChunkLimits::default());
        r.push(&other).unwrap();
        assert_eq!(
            r.next_message(),
            Err(ChunkError::UnfinishedMessage { csid: 6 })
        );
    }
}
