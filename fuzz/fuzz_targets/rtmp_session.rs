//! A whole ingest session (our chunk layer, rml_rtmp's session, FLV parsing) on arbitrary bytes
//! after the handshake: must return errors, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livepop::ingest::chunk::ChunkLimits;
use livepop::ingest::session::{IngestSession, SessionEvent};

fuzz_target!(|data: &[u8]| {
    let limits = ChunkLimits {
        max_message_bytes: 64 * 1024,
        max_chunk_size: 64 * 1024,
        max_buffered_bytes: 256 * 1024,
    };
    let Ok((mut s, _)) = IngestSession::new("live", limits) else {
        return;
    };
    for piece in data.chunks(97) {
        match s.handle_input(piece, 0) {
            Ok(events) => {
                for e in events {
                    if let SessionEvent::PublishRequested { request_id, .. } = e {
                        let _ = s.accept_publish(request_id);
                    }
                }
            }
            Err(_) => return,
        }
    }
});
