//! A bounded AMF0 structure check, run on every AMF0-bearing RTMP message (command and data,
//! types 15, 17, 18, 20) before rml_amf0 sees it.
//!
//! rml_amf0 parses nested values by recursion with no depth limit: a 1 MB message of nested
//! strict arrays overflows a tokio worker's stack and aborts the whole process (no unwinding to
//! catch). This scanner walks the same grammar with an explicit stack, in one linear pass, and
//! refuses nesting deeper than a bound, so the recursive parser is only ever given shallow input.
//! It follows rml_amf0's reading of the format (object end marker ends the top level and strict
//! arrays; ECMA arrays read as objects) so that it never passes what rml_amf0 would read deeper.
//! Pure: bytes in, a verdict out.

/// Deepest nesting of objects and arrays accepted. Real commands and metadata nest 1–3 levels
/// (connect's command object, onMetaData's ECMA array, an OBS encoder object inside it).
pub const MAX_DEPTH: usize = 32;

const NUMBER: u8 = 0x00;
const BOOLEAN: u8 = 0x01;
const STRING: u8 = 0x02;
const OBJECT: u8 = 0x03;
const NULL: u8 = 0x05;
const UNDEFINED: u8 = 0x06;
const ECMA_ARRAY: u8 = 0x08;
const OBJECT_END: u8 = 0x09;
const STRICT_ARRAY: u8 = 0x0A;

/// Why an AMF0 body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Amf0Error {
    /// Objects or arrays nested deeper than the bound.
    #[error("AMF0 values nested deeper than {limit} levels")]
    TooDeep {
        /// The bound.
        limit: usize,
    },
    /// The body ends inside a value.
    #[error("AMF0 body truncated at byte {at}")]
    Truncated {
        /// Offset of the read that failed.
        at: usize,
    },
    /// A type marker rml_amf0 does not read (references, dates, long strings, AMF3, ...).
    #[error("unsupported AMF0 marker 0x{marker:02x} at byte {at}")]
    UnknownMarker {
        /// The marker.
        marker: u8,
        /// Its offset.
        at: usize,
    },
    /// An object property without a value, or an empty name not followed by the end marker.
    #[error("malformed AMF0 object at byte {at}")]
    BadObject {
        /// Offset of the fault.
        at: usize,
    },
}

enum Frame {
    /// Inside an object (or ECMA array): properties until the empty name and end marker.
    Object,
    /// Inside a strict array: this many values still to read.
    Array(u32),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Amf0Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(Amf0Error::Truncated { at: self.pos })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Amf0Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Amf0Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Amf0Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Checks that `data` is a sequence of AMF0 values nested at most `max_depth` deep; returns how
/// many top-level values it holds.
pub fn check(data: &[u8], max_depth: usize) -> Result<usize, Amf0Error> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Frame> = Vec::new();
    let mut top_level = 0;
    loop {
        let marker = match stack.last_mut() {
            None => {
                if r.at_end() {
                    return Ok(top_level);
                }
                let m = r.u8()?;
                if m == OBJECT_END {
                    // rml_amf0 stops reading at a top-level end marker.
                    return Ok(top_level);
                }
                top_level += 1;
                m
            }
            Some(Frame::Object) => {
                let at = r.pos;
                let len = r.u16()?;
                if len == 0 {
                    if r.u8()? != OBJECT_END {
                        return Err(Amf0Error::BadObject { at });
                    }
                    stack.pop();
                    continue;
                }
                r.take(usize::from(len))?;
                let at = r.pos;
                let m = r.u8()?;
                if m == OBJECT_END {
                    return Err(Amf0Error::BadObject { at });
                }
                m
            }
            Some(Frame::Array(left)) => {
                if *left == 0 || r.at_end() {
                    stack.pop();
                    continue;
                }
                *left -= 1;
                let m = r.u8()?;
                if m == OBJECT_END {
                    // rml_amf0 ends the array early here.
                    stack.pop();
                    continue;
                }
                m
            }
        };
        let at = r.pos.saturating_sub(1);
        let opens = match marker {
            NUMBER => {
                r.take(8)?;
                None
            }
            BOOLEAN => {
                r.take(1)?;
                None
            }
            STRING => {
                let len = r.u16()?;
                r.take(usize::from(len))?;
                None
            }
            NULL | UNDEFINED => None,
            OBJECT => Some(Frame::Object),
            ECMA_ARRAY => {
                r.u32()?; // the count is advisory: properties end with the end marker
                Some(Frame::Object)
            }
            STRICT_ARRAY => Some(Frame::Array(r.u32()?)),
            marker => return Err(Amf0Error::UnknownMarker { marker, at }),
        };
        if let Some(f) = opens {
            if stack.len() >= max_depth {
                return Err(Amf0Error::TooDeep { limit: max_depth });
            }
            stack.push(f);
        }
    }
}

/// Test inputs: nestings of every container kind, for unit tests, the attack tests and the fuzz
/// seeds.
pub mod nest {
    /// Every container kind below, for tests and benchmarks that try them all.
    pub const KINDS: [fn(usize) -> Vec<u8>; 4] = [strict_arrays, objects, ecma_arrays, mixed];

    /// `levels` strict arrays of one element each, around a number.
    pub fn strict_arrays(levels: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(levels * 5 + 9);
        for _ in 0..levels {
            v.extend_from_slice(&[0x0A, 0, 0, 0, 1]);
        }
        v.push(0x00);
        v.extend_from_slice(&0f64.to_be_bytes());
        v
    }

    /// `levels` objects, each the value of property "a" of the one outside it.
    pub fn objects(levels: usize) -> Vec<u8> {
        let mut v = vec![0x03];
        for _ in 1..levels {
            v.extend_from_slice(&[0, 1, b'a', 0x03]);
        }
        for _ in 0..levels {
            v.extend_from_slice(&[0, 0, 0x09]);
        }
        v
    }

    /// `levels` ECMA arrays, each the value of property "a" of the one outside it.
    pub fn ecma_arrays(levels: usize) -> Vec<u8> {
        let mut v = vec![0x08, 0, 0, 0, 1];
        for _ in 1..levels {
            v.extend_from_slice(&[0, 1, b'a', 0x08, 0, 0, 0, 1]);
        }
        for _ in 0..levels {
            v.extend_from_slice(&[0, 0, 0x09]);
        }
        v
    }

    /// Object, ECMA array and strict array in turn, `levels` deep; nothing is closed (a
    /// truncated body must be refused for its depth before its end is noticed).
    pub fn mixed(levels: usize) -> Vec<u8> {
        let mut v = vec![];
        for i in 0..levels {
            match i % 3 {
                0 => v.push(0x03),
                1 => v.extend_from_slice(&[0x08, 0, 0, 0, 1]),
                _ => v.extend_from_slice(&[0x0A, 0, 0, 0, 1]),
            }
            // Inside an object or ECMA array the next value needs a property name.
            if i % 3 != 2 && i + 1 < levels {
                v.extend_from_slice(&[0, 1, b'k']);
            }
        }
        v
    }

    /// An AMF0 command: name, transaction id, then `arg` as the command object.
    pub fn command(name: &str, arg: &[u8]) -> Vec<u8> {
        let mut v = vec![0x02];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(0x00);
        v.extend_from_slice(&1f64.to_be_bytes());
        v.extend_from_slice(arg);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shallow_values_pass_with_their_count() {
        // connect(1, {app: "live", tcUrl: "rtmp://x/live"}, null)
        let mut obj = vec![0x03];
        for (k, v) in [("app", "live"), ("tcUrl", "rtmp://x/live")] {
            obj.extend_from_slice(&(k.len() as u16).to_be_bytes());
            obj.extend_from_slice(k.as_bytes());
            obj.push(0x02);
            obj.extend_from_slice(&(v.len() as u16).to_be_bytes());
            obj.extend_from_slice(v.as_bytes());
        }
        obj.extend_from_slice(&[0, 0, 0x09, 0x05]);
        let body = nest::command("connect", &obj);
        assert_eq!(check(&body, MAX_DEPTH), Ok(4));
        // And rml_amf0 agrees on the count.
        let rml = rml_amf0::deserialize(&mut std::io::Cursor::new(&body)).unwrap();
        assert_eq!(rml.len(), 4);
        assert_eq!(check(&[], MAX_DEPTH), Ok(0));
        assert_eq!(check(&[0x01, 1, 0x06, 0x05], MAX_DEPTH), Ok(3));
    }

    #[test]
    fn every_container_kind_is_bounded() {
        type Make = fn(usize) -> Vec<u8>;
        let kinds: [(&str, Make); 4] = [
            ("strict arrays", nest::strict_arrays),
            ("objects", nest::objects),
            ("ECMA arrays", nest::ecma_arrays),
            ("mixed", nest::mixed),
        ];
        for (name, make) in kinds {
            if name != "mixed" {
                // At the bound: accepted, and rml_amf0 reads it without trouble.
                let ok = make(MAX_DEPTH);
                assert_eq!(check(&ok, MAX_DEPTH), Ok(1), "{name}");
                assert!(rml_amf0::deserialize(&mut std::io::Cursor::new(&ok)).is_ok());
            }
            // One past it, and the 200,000-level attack: refused, without recursion.
            for levels in [MAX_DEPTH + 1, 200_000] {
                assert_eq!(
                    check(&make(levels), MAX_DEPTH),
                    Err(Amf0Error::TooDeep { limit: MAX_DEPTH }),
                    "{name} {levels}"
                );
            }
        }
        // Nested inside a command's arguments too.
        let deep = nest::command("connect", &nest::strict_arrays(200_000));
        assert!(matches!(
            check(&deep, MAX_DEPTH),
            Err(Amf0Error::TooDeep { .. })
        ));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert_eq!(
            check(&[0x02, 0, 5, b'a'], MAX_DEPTH),
            Err(Amf0Error::Truncated { at: 3 })
        );
        assert_eq!(
            check(&[0x00, 1, 2], MAX_DEPTH),
            Err(Amf0Error::Truncated { at: 1 })
        );
        assert_eq!(
            check(&[0x0B, 0, 0], MAX_DEPTH),
            Err(Amf0Error::UnknownMarker {
                marker: 0x0B,
                at: 0
            })
        );
        // Empty property name not followed by the end marker; a property without a value.
        assert!(matches!(
            check(&[0x03, 0, 0, 0x05], MAX_DEPTH),
            Err(Amf0Error::BadObject { .. })
        ));
        assert!(matches!(
            check(&[0x03, 0, 1, b'a', 0x09], MAX_DEPTH),
            Err(Amf0Error::BadObject { .. })
        ));
        // A huge declared array count costs nothing: the array ends with the input.
        assert_eq!(check(&[0x0A, 0xFF, 0xFF, 0xFF, 0xFF], MAX_DEPTH), Ok(1));
        // A top-level end marker ends the values, as in rml_amf0.
        assert_eq!(check(&[0x05, 0x09, 0xFF], MAX_DEPTH), Ok(1));
    }

    /// Whatever the scanner passes, rml_amf0 reads without recursing deeper than the bound:
    /// for random bodies the two agree on acceptance whenever the scanner accepts.
    #[test]
    fn passes_only_what_rml_amf0_reads() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet = [
            0x00, 0x01, 0x02, 0x03, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x00, 0x01,
        ];
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut v = vec![];
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(if x % 3 == 0 {
                    alphabet[(x >> 8) as usize % alphabet.len()]
                } else {
                    (x >> 16) as u8 % 4
                });
            }
            if let Ok(n) = check(&v, 4) {
                accepted += 1;
                if let Ok(values) = rml_amf0::deserialize(&mut std::io::Cursor::new(&v)) {
                    assert_eq!(values.len(), n, "{v:02x?}");
                }
            }
        }
        assert!(accepted > 100, "only {accepted} random bodies accepted");
    }
}
