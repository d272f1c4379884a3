//! The part of the protobuf wire format that NRI's, ttrpc's and CRI's
//! messages use: varints (wire type 0) and length-delimited fields (wire
//! type 2: strings, bytes, nested messages, map entries). Written from the
//! format's definition, so that no code generator and no protobuf crate is
//! needed for the handful of messages rulebpf's NRI plugin and the CRI
//! test read and write.
//! https://protobuf.dev/programming-guides/encoding/

/// Why a message could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: message ends inside a field")]
    Truncated,
    #[error("protobuf: varint longer than 10 bytes")]
    VarintTooLong,
    #[error("protobuf: field {field} has wire type {wire_type}, which no NRI message uses")]
    UnknownWireType { field: u32, wire_type: u8 },
    #[error("protobuf: field {field} is not valid UTF-8")]
    NotUtf8 { field: u32 },
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A message being written, field by field (in any order: readers accept
/// any, and the last of a repeated scalar wins).
#[derive(Debug, Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn tag(&mut self, field: u32, wire_type: u8) {
        self.raw_varint((u64::from(field) << 3) | u64::from(wire_type));
    }

    fn raw_varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.bytes.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.bytes.push(value as u8);
    }

    /// An integer field (int32, int64, uint32, uint64, bool, enum); zero is
    /// the default and is left out, as proto3 writers do.
    pub fn varint(&mut self, field: u32, value: u64) -> &mut Self {
        if value != 0 {
            self.tag(field, VARINT);
            self.raw_varint(value);
        }
        self
    }

    /// A bytes field, written even when empty (a present nested message
    /// may be empty).
    pub fn bytes(&mut self, field: u32, value: &[u8]) -> &mut Self {
        self.tag(field, LEN);
        self.raw_varint(value.len() as u64);
        self.bytes.extend_from_slice(value);
        self
    }

    /// A string field; empty is the default and is left out.
    pub fn string(&mut self, field: u32, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.bytes(field, value.as_bytes());
        }
        self
    }

    /// A nested message.
    pub fn message(&mut self, field: u32, message: Writer) -> &mut Self {
        self.bytes(field, &message.bytes)
    }

    /// One entry of a `map<string, string>` field: a nested message with
    /// the key in field 1 and the value in field 2.
    pub fn map_entry(&mut self, field: u32, key: &str, value: &str) -> &mut Self {
        let mut entry = Writer::new();
        entry.string(1, key).string(2, value);
        self.message(field, entry)
    }
}

/// One field as read: its number and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed-width fields are skipped by every reader here.
    Fixed,
}

/// The fields of a message, in the order they were written.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        Self { rest: message }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.rest.split_first().ok_or(DecodeError::Truncated)?;
            self.rest = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn field(&mut self) -> Result<(u32, Value<'a>), DecodeError> {
        let tag = self.varint()?;
        let field = (tag >> 3) as u32;
        let value = match (tag & 7) as u8 {
            VARINT => Value::Varint(self.varint()?),
            LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
                Value::Bytes(self.take(len)?)
            }
            FIXED64 => {
                self.take(8)?;
                Value::Fixed
            }
            FIXED32 => {
                self.take(4)?;
                Value::Fixed
            }
            wire_type => return Err(DecodeError::UnknownWireType { field, wire_type }),
        };
        Ok((field, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            // Nothing after a malformed field can be trusted.
            self.rest = &[];
        }
        Some(item)
    }
}

/// A string field's value.
pub fn string(field: u32, bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { field })
}

/// A `map<string, string>` entry's key and value.
pub fn map_entry(field: u32, entry: &[u8]) -> Result<(String, String), DecodeError> {
    let (mut key, mut value) = (String::new(), String::new());
    for item in Fields::new(entry) {
        match item? {
            (1, Value::Bytes(b)) => key = string(field, b)?,
            (2, Value::Bytes(b)) => value = string(field, b)?,
            _ => {}
        }
    }
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for value in [
            1u64,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX.into(),
            u64::MAX,
        ] {
            let mut w = Writer::new();
            w.varint(4, value);
            let bytes = w.into_bytes();
            let fields: Vec<_> = Fields::new(&bytes).collect::<Result<_, _>>().unwrap();
            assert_eq!(fields, [(4, Value::Varint(value))], "{value}");
        }
    }

    /// The encoding's own example: field 1 = 150 is `08 96 01`; field 2 =
    /// "testing" is `12 07 74 65 73 74 69 6e 67`.
    #[test]
    fn matches_the_specification_examples() {
        let mut w = Writer::new();
        w.varint(1, 150).string(2, "testing");
        assert_eq!(
            w.into_bytes(),
            [
                0x08, 0x96, 0x01, 0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g'
            ]
        );
    }

    #[test]
    fn defaults_are_left_out_but_an_empty_message_is_written() {
        let mut w = Writer::new();
        w.varint(1, 0).string(2, "").message(3, Writer::new());
        assert_eq!(w.into_bytes(), [0x1a, 0x00]);
    }

    #[test]
    fn map_entries_round_trip() {
        let mut w = Writer::new();
        w.map_entry(6, "io.rulebpf.instance", "web");
        let bytes = w.into_bytes();
        let Some(Ok((6, Value::Bytes(entry)))) = Fields::new(&bytes).next() else {
            panic!("{bytes:?}");
        };
        assert_eq!(
            map_entry(6, entry).unwrap(),
            ("io.rulebpf.instance".into(), "web".into())
        );
    }

    #[test]
    fn fixed_fields_are_skipped_and_bad_input_is_an_error() {
        // field 1 fixed64, field 2 fixed32, field 3 varint 1.
        let bytes = [0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x15, 0, 0, 0, 0, 0x18, 0x01];
        let fields: Vec<_> = Fields::new(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            fields,
            [(1, Value::Fixed), (2, Value::Fixed), (3, Value::Varint(1))]
        );
        // A length past the end.
        let truncated = [0x12, 0x05, b'a'];
        assert_eq!(
            Fields::new(&truncated).next(),
            Some(Err(DecodeError::Truncated))
        );
        // Wire type 3 (a group), which no NRI message has.
        let group = [0x0b];
        assert_eq!(
            Fields::new(&group).next(),
            Some(Err(DecodeError::UnknownWireType {
                field: 1,
                wire_type: 3
            }))
        );
        let long = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_eq!(
            Fields::new(&long).next(),
            Some(Err(DecodeError::VarintTooLong))
        );
    }
}
