//! The RTMP chunk reader on arbitrary input, fed in two pieces split at the first byte's value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livepop::ingest::chunk::{ChunkLimits, ChunkReader};

fuzz_target!(|data: &[u8]| {
    let mut r = ChunkReader::new(ChunkLimits {
        max_message_bytes: 64 * 1024,
        max_chunk_size: 64 * 1024,
        max_buffered_bytes: 256 * 1024,
    });
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    for part in [&data[..split], &data[split..]] {
        if r.push(part).is_err() {
            return;
        }
        loop {
            match r.next_message() {
                Ok(Some(m)) => assert!(m.payload.len() <= 64 * 1024),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
