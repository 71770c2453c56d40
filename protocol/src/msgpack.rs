//! MessagePack held to the protocol's data model (PROTOCOL.md §1).
//!
//! rmp-serde reads more than the data model holds: a binary value passes for a string (and
//! sixteen raw bytes for a UUID), a float32 for a float64, and an unknown marker is reported
//! like a mistyped field. So every MessagePack input is walked marker by marker with
//! `rmp::decode` before it is decoded, and every codec path follows one rule:
//!
//! - bytes that are not MessagePack (the reserved marker `0xc1`), that end early, or that go on
//!   after the value are `malformed`;
//! - binary, extension and float32 values, and map keys that are not strings, are well-formed
//!   MessagePack outside the data model: `invalid_field`.
//!
//! The walk keeps no value and allocates only for nesting, so it costs a small fraction of the
//! decode it guards.

use rmp::Marker;

use crate::error::DecodeError;

/// Deepest nesting of maps and arrays accepted, as rmp-serde's own limit.
const MAX_DEPTH: usize = 1024;

/// Checks that `bytes` is exactly one MessagePack value inside the data model.
pub fn check(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut rest = bytes;
    let (_, outside) = split_value(&mut rest)?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the value",
            rest.len()
        )));
    }
    outside.map_or(Ok(()), Err)
}

/// Moves past the MessagePack value at the start of `rest` and returns its bytes, with the
/// first thing in it that is outside the data model (an `invalid_field` error), if any.
///
/// Only what is not MessagePack at all is an error here, so that a caller splitting a batch
/// can refuse one event for a binary value and keep the others.
pub fn split_value<'a>(
    rest: &mut &'a [u8],
) -> Result<(&'a [u8], Option<DecodeError>), DecodeError> {
    let start = *rest;
    let mut open: Vec<Container> = Vec::new();
    let mut outside = None;
    loop {
        let is_key = open.last().is_some_and(|c| c.map && c.left % 2 == 0);
        let marker = rmp::decode::read_marker(rest).map_err(|_| DecodeError::Truncated)?;
        if is_key
            && !matches!(
                marker,
                Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32
            )
        {
            outside.get_or_insert_with(|| outside_model("a map key that is not a string"));
        }
        let items = match marker {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                None
            }
            Marker::U8 | Marker::I8 => skip(rest, 1)?,
            Marker::U16 | Marker::I16 => skip(rest, 2)?,
            Marker::U32 | Marker::I32 => skip(rest, 4)?,
            Marker::U64 | Marker::I64 | Marker::F64 => skip(rest, 8)?,
            Marker::F32 => {
                outside.get_or_insert_with(|| outside_model("a float32 value"));
                skip(rest, 4)?
            }
            Marker::FixStr(n) => skip(rest, usize::from(n))?,
            Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = length(rest, marker)?;
                skip(rest, n)?
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                outside.get_or_insert_with(|| outside_model("a binary value"));
                let n = length(rest, marker)?;
                skip(rest, n)?
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => {
                outside.get_or_insert_with(|| outside_model("an extension value"));
                let n = match marker {
                    Marker::FixExt1 => 1,
                    Marker::FixExt2 => 2,
                    Marker::FixExt4 => 4,
                    Marker::FixExt8 => 8,
                    Marker::FixExt16 => 16,
                    _ => length(rest, marker)?,
                };
                // The extension's type byte, then its data.
                skip(rest, n + 1)?
            }
            Marker::FixArray(n) => Some(Container::new(u64::from(n), false)),
            Marker::Array16 | Marker::Array32 => {
                Some(Container::new(length(rest, marker)? as u64, false))
            }
            Marker::FixMap(n) => Some(Container::new(u64::from(n), true)),
            Marker::Map16 | Marker::Map32 => {
                Some(Container::new(length(rest, marker)? as u64, true))
            }
            Marker::Reserved => {
                return Err(DecodeError::Malformed(
                    "0xc1 is not a MessagePack marker".into(),
                ));
            }
        };
        match items {
            Some(container) if container.left > 0 => {
                if open.len() == MAX_DEPTH {
                    return Err(DecodeError::Malformed("nesting too deep".into()));
                }
                open.push(container);
            }
            // A scalar or an empty container: one value done, and maybe the ones around it.
            _ => loop {
                let Some(parent) = open.last_mut() else {
                    let len = start.len() - rest.len();
                    return Ok((&start[..len], outside));
                };
                parent.left -= 1;
                if parent.left > 0 {
                    break;
                }
                open.pop();
            },
        }
    }
}

/// A map or array being walked: how many values (keys and values, for a map) are left.
struct Container {
    left: u64,
    map: bool,
}

impl Container {
    fn new(len: u64, map: bool) -> Self {
        Self {
            left: if map { len * 2 } else { len },
            map,
        }
    }
}

fn outside_model(what: &str) -> DecodeError {
    DecodeError::InvalidField(format!(
        "{what} is outside the protocol's data model (PROTOCOL.md §1)"
    ))
}

/// Moves `rest` past `n` bytes; `None` for the caller's `match`, which holds no container.
fn skip(rest: &mut &[u8], n: usize) -> Result<Option<Container>, DecodeError> {
    if rest.len() < n {
        return Err(DecodeError::Truncated);
    }
    *rest = &rest[n..];
    Ok(None)
}

/// Reads the big-endian length that follows a sized marker.
fn length(rest: &mut &[u8], marker: Marker) -> Result<usize, DecodeError> {
    let width = match marker {
        Marker::Str8 | Marker::Bin8 | Marker::Ext8 => 1,
        Marker::Str16 | Marker::Bin16 | Marker::Ext16 | Marker::Array16 | Marker::Map16 => 2,
        _ => 4,
    };
    if rest.len() < width {
        return Err(DecodeError::Truncated);
    }
    let (head, tail) = rest.split_at(width);
    *rest = tail;
    let n = head.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec(value).unwrap()
    }

    #[test]
    fn values_of_the_data_model_pass_and_are_split_exactly() {
        let value = serde_json::json!({
            "type": "publish",
            "n": [1, -1, 300, -300, 70_000, -70_000, 5_000_000_000u64, -5_000_000_000i64, 1.5],
            "nested": {"a": {"b": [[], {}, null, true, false, "x".repeat(300)]}},
        });
        let bytes = encode(&value);
        check(&bytes).unwrap();
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let mut rest = &two[..];
        let (first, outside) = split_value(&mut rest).unwrap();
        assert_eq!((first, outside, rest), (&bytes[..], None, &bytes[..]));
    }

    #[test]
    fn values_outside_the_model_are_invalid_fields() {
        let map_with = |value: &[u8]| {
            let mut bytes = vec![0x81, 0xa1, b'v'];
            bytes.extend_from_slice(value);
            check(&bytes).unwrap_err().code()
        };
        use crate::ErrorCode::InvalidField;
        assert_eq!(map_with(&[0xc4, 2, 1, 2]), InvalidField, "bin8");
        assert_eq!(map_with(&[0xd4, 1, 0]), InvalidField, "fixext1");
        assert_eq!(map_with(&[0xc7, 1, 5, 0]), InvalidField, "ext8");
        assert_eq!(map_with(&[0xca, 0, 0, 0, 0]), InvalidField, "float32");
        // {1: 2}: a key that is not a string.
        assert_eq!(check(&[0x81, 0x01, 0x02]).unwrap_err().code(), InvalidField);
        // Outside the model is not a syntax error: the value is still split.
        let mut rest = &[0x92, 0xc4, 1, 9, 0x07, 0xc0][..];
        let (value, outside) = split_value(&mut rest).unwrap();
        assert_eq!((value.len(), rest), (5, &[0xc0][..]));
        assert!(outside.is_some());
    }

    #[test]
    fn bytes_that_are_not_one_value_are_malformed() {
        use crate::ErrorCode::Malformed;
        for bytes in [
            &[0xc1][..],
            &[0x81, 0xa1, b'v', 0xc1],
            &[0x81, 0xa1],
            &[0xdc, 0xff],
            &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0xd9, 10, b'a'],
            &[0x01, 0x02],
            &[],
        ] {
            assert_eq!(check(bytes).unwrap_err().code(), Malformed, "{bytes:x?}");
        }
        let deep = vec![0x91; MAX_DEPTH + 1];
        assert_eq!(check(&deep).unwrap_err().code(), Malformed);
    }
}
