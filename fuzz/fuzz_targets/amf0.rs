//! The bounded AMF0 check on arbitrary bodies, with rml_amf0 behind it as in the session
//! (`check_amf0` in src/ingest/session.rs): what `check` passes at the production bound,
//! rml_amf0 must read without panicking or overflowing the stack (fuzz/run.sh runs every target
//! on a 2 MiB stack, a tokio worker's), and nothing nested deeper than the bound may pass.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livepop::ingest::amf0::{check, Amf0Error, MAX_DEPTH};
use rml_amf0::Amf0Value;
use std::io::Cursor;

/// Deepest nesting of objects and arrays among `values` (a scalar at the top level is 0, an
/// object holding a number 1), computed without recursion.
fn depth(values: &[Amf0Value]) -> usize {
    let mut deepest = 0;
    let mut todo: Vec<(&Amf0Value, usize)> = values.iter().map(|v| (v, 1)).collect();
    while let Some((v, d)) = todo.pop() {
        match v {
            Amf0Value::Object(props) => {
                deepest = deepest.max(d);
                todo.extend(props.values().map(|c| (c, d + 1)));
            }
            Amf0Value::StrictArray(items) => {
                deepest = deepest.max(d);
                todo.extend(items.iter().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

fuzz_target!(|data: &[u8]| {
    if let Ok(count) = check(data, MAX_DEPTH) {
        // Only what the check passes reaches rml_amf0, which recurses once per level.
        if let Ok(values) = rml_amf0::deserialize(&mut Cursor::new(data)) {
            assert_eq!(values.len(), count, "top-level values");
            // rml_amf0 read nothing deeper than the bound, and the check saw at least that
            // depth: one level less is refused. (Not equality: rml_amf0 keeps one of several
            // properties with the same name, so it may hold a shallower tree than the bytes.)
            let d = depth(&values);
            assert!(d <= MAX_DEPTH, "rml_amf0 read {d} levels");
            if d > 0 {
                assert_eq!(check(data, d - 1), Err(Amf0Error::TooDeep { limit: d - 1 }));
            }
        }
    }

    // Inside MAX_DEPTH one-element strict arrays, a body whose first value opens an object or
    // array is one level too deep, whatever follows: refused for its depth, not for a later
    // fault. (ECMA and strict arrays need their 4-byte count before they count as open.)
    let opens = matches!(data, [0x03, ..] | [0x08 | 0x0A, _, _, _, _, ..]);
    if opens {
        let mut deeper = Vec::with_capacity(MAX_DEPTH * 5 + data.len());
        for _ in 0..MAX_DEPTH {
            deeper.extend_from_slice(&[0x0A, 0, 0, 0, 1]);
        }
        deeper.extend_from_slice(data);
        assert_eq!(
            check(&deeper, MAX_DEPTH),
            Err(Amf0Error::TooDeep { limit: MAX_DEPTH })
        );
    }
});
