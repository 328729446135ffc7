//! FLV audio/video tag bodies on arbitrary input.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use livepop::ingest::flv::{parse_audio, parse_video};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    let _ = parse_video(&b);
    let _ = parse_audio(&b);
});
