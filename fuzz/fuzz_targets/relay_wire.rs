//! The relay decoders (control messages, group streams) on arbitrary input.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use livepop::relay::wire::{Control, GroupDecoder};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(m)) = Control::decode(&mut buf) {
        if let Some(m) = m {
            // Whatever decodes must re-encode into something that decodes.
            let mut again = BytesMut::new();
            m.encode(&mut again);
            assert!(matches!(Control::decode(&mut again), Ok(Some(Some(_)))));
        }
    }
    let mut d = GroupDecoder::new();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = d.decode(&mut buf) {}
});
