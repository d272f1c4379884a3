//! NRI's transport: ttrpc messages over two logical connections
//! multiplexed on one unix socket.
//!
//! **The multiplexer** (containerd/nri `pkg/net/multiplex/mux.go`): every
//! frame is a big-endian u32 connection id, a big-endian u32 length, then
//! that many bytes of the connection's byte stream. Connection 1 carries
//! the plugin's service (the runtime calls Configure, Synchronize,
//! StateChange...), connection 2 the runtime's (the plugin calls
//! RegisterPlugin). The runtime reads a frame into a 4 KiB buffer and fails
//! the connection on a bigger one, so what the plugin sends is cut into
//! frames of at most [`MAX_FRAME`] bytes; what it receives is a byte stream
//! per connection, a message possibly spread over frames.
//!
//! **ttrpc** (containerd/ttrpc `channel.go`): a 10-byte header (big-endian
//! u32 payload length, big-endian u32 stream id, type, flags), then the
//! protobuf payload: a `Request` (type 1) or a `Response` (type 2, same
//! stream id). Client stream ids are odd and increasing, per connection.
//! https://github.com/containerd/nri/blob/v0.8.0/pkg/net/multiplex/mux.go
//! https://github.com/containerd/ttrpc/blob/v1.2.7/channel.go

use std::collections::HashMap;

use rulebpf_protobuf::{self as protobuf, DecodeError, Fields, Value, Writer};

/// The logical connection the runtime calls the plugin on.
pub const PLUGIN_CONN: u32 = 1;
/// The logical connection the plugin calls the runtime on.
pub const RUNTIME_CONN: u32 = 2;

/// The largest frame the plugin sends (the runtime's read buffer).
pub const MAX_FRAME: usize = 4096;
/// The largest ttrpc message either side accepts (ttrpc's own limit).
pub const MAX_MESSAGE: usize = 4 << 20;

const MUX_HEADER: usize = 8;
const TTRPC_HEADER: usize = 10;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;

/// gRPC status codes the plugin answers with.
pub const CODE_UNKNOWN: u32 = 2;
pub const CODE_UNIMPLEMENTED: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("ttrpc: a message of {0} bytes is over the 4 MiB limit")]
    TooLarge(usize),
    #[error("ttrpc: message type {0} (only unary calls are spoken here)")]
    UnknownType(u8),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// One ttrpc message of a logical connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request { stream: u32, request: Request },
    Response { stream: u32, response: Response },
}

/// `ttrpc.Request`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    pub method: String,
    pub payload: Vec<u8>,
    pub timeout_nano: u64,
}

/// `ttrpc.Response`: `status` absent (or code 0) means OK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub status: Option<Status>,
    pub payload: Vec<u8>,
}

/// `google.rpc.Status`, without details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.string(1, &self.service)
            .string(2, &self.method)
            .bytes(3, &self.payload)
            .varint(4, self.timeout_nano);
        w.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut request = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(b)) => request.service = protobuf::string(1, b)?,
                (2, Value::Bytes(b)) => request.method = protobuf::string(2, b)?,
                (3, Value::Bytes(b)) => request.payload = b.to_vec(),
                (4, Value::Varint(v)) => request.timeout_nano = v,
                _ => {}
            }
        }
        Ok(request)
    }
}

impl Response {
    pub fn ok(payload: Vec<u8>) -> Self {
        Self {
            status: None,
            payload,
        }
    }

    pub fn error(code: u32, message: impl Into<String>) -> Self {
        Self {
            status: Some(Status {
                code,
                message: message.into(),
            }),
            payload: Vec::new(),
        }
    }

    /// The error status, if the call failed.
    pub fn failure(&self) -> Option<&Status> {
        self.status.as_ref().filter(|s| s.code != 0)
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        if let Some(status) = &self.status {
            let mut s = Writer::new();
            s.varint(1, status.code.into()).string(2, &status.message);
            w.message(1, s);
        }
        if !self.payload.is_empty() {
            w.bytes(2, &self.payload);
        }
        w.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut response = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(b)) => {
                    let mut status = Status {
                        code: 0,
                        message: String::new(),
                    };
                    for field in Fields::new(b) {
                        match field? {
                            (1, Value::Varint(code)) => status.code = code as u32,
                            (2, Value::Bytes(m)) => status.message = protobuf::string(2, m)?,
                            _ => {}
                        }
                    }
                    response.status = Some(status);
                }
                (2, Value::Bytes(b)) => response.payload = b.to_vec(),
                _ => {}
            }
        }
        Ok(response)
    }
}

impl Message {
    /// The bytes to write on the socket: the ttrpc message on connection
    /// `conn`, in frames of at most [`MAX_FRAME`] bytes.
    pub fn frames(&self, conn: u32) -> Vec<u8> {
        let (stream, kind, payload) = match self {
            Self::Request { stream, request } => (*stream, TYPE_REQUEST, request.encode()),
            Self::Response { stream, response } => (*stream, TYPE_RESPONSE, response.encode()),
        };
        let mut message = Vec::with_capacity(TTRPC_HEADER + payload.len());
        message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        message.extend_from_slice(&stream.to_be_bytes());
        message.extend_from_slice(&[kind, 0]);
        message.extend_from_slice(&payload);
        let mut out = Vec::with_capacity(message.len() + MUX_HEADER * 2);
        for chunk in message.chunks(MAX_FRAME) {
            out.extend_from_slice(&conn.to_be_bytes());
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

/// Reassembles what arrives on the socket into `(connection, message)`
/// pairs: frames into per-connection streams, streams into messages.
#[derive(Debug, Default)]
pub struct Demux {
    trunk: Vec<u8>,
    streams: HashMap<u32, Vec<u8>>,
}

impl Demux {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the bytes just read; returns the messages they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(u32, Message)>, WireError> {
        self.trunk.extend_from_slice(bytes);
        let mut at = 0;
        while let Some(header) = self.trunk.get(at..at + MUX_HEADER) {
            let conn = u32::from_be_bytes(header[..4].try_into().unwrap());
            let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
            if len > MAX_MESSAGE + TTRPC_HEADER {
                return Err(WireError::TooLarge(len));
            }
            let Some(payload) = self.trunk.get(at + MUX_HEADER..at + MUX_HEADER + len) else {
                break;
            };
            self.streams
                .entry(conn)
                .or_default()
                .extend_from_slice(payload);
            at += MUX_HEADER + len;
        }
        self.trunk.drain(..at);
        let mut messages = Vec::new();
        for (&conn, stream) in &mut self.streams {
            while let Some(message) = take_message(stream)? {
                messages.push((conn, message));
            }
        }
        Ok(messages)
    }
}

/// The first whole ttrpc message of `stream`, removed from it.
fn take_message(stream: &mut Vec<u8>) -> Result<Option<Message>, WireError> {
    let Some(header) = stream.get(..TTRPC_HEADER) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let stream_id = u32::from_be_bytes(header[4..8].try_into().unwrap());
    let kind = header[8];
    let Some(payload) = stream.get(TTRPC_HEADER..TTRPC_HEADER + len) else {
        return Ok(None);
    };
    let message = match kind {
        TYPE_REQUEST => Message::Request {
            stream: stream_id,
            request: Request::decode(payload)?,
        },
        TYPE_RESPONSE => Message::Response {
            stream: stream_id,
            response: Response::decode(payload)?,
        },
        other => return Err(WireError::UnknownType(other)),
    };
    stream.drain(..TTRPC_HEADER + len);
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register() -> Message {
        let mut payload = Writer::new();
        payload.string(1, "rulebpf").string(2, "50");
        Message::Request {
            stream: 1,
            request: Request {
                service: "nri.pkg.api.v1alpha1.Runtime".into(),
                method: "RegisterPlugin".into(),
                payload: payload.into_bytes(),
                timeout_nano: 5_000_000_000,
            },
        }
    }

    /// RegisterPlugin as NRI's Go stub writes it: mux header (connection 2,
    /// 77 bytes), ttrpc header (67 bytes, stream 1, request), then the
    /// request's fields. Worked out from mux.go, channel.go and the
    /// messages' .proto definitions.
    #[test]
    fn register_plugin_has_the_layout_of_the_go_stub() {
        let bytes = register().frames(RUNTIME_CONN);
        let mut expected = vec![0, 0, 0, 2, 0, 0, 0, 77, 0, 0, 0, 67, 0, 0, 0, 1, 1, 0];
        expected.extend_from_slice(b"\x0a\x1cnri.pkg.api.v1alpha1.Runtime");
        expected.extend_from_slice(b"\x12\x0eRegisterPlugin");
        expected.extend_from_slice(b"\x1a\x0d\x0a\x07rulebpf\x12\x0250");
        expected.extend_from_slice(&[0x20, 0x80, 0xe4, 0x97, 0xd0, 0x12]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn an_empty_ok_reply_is_a_bare_header() {
        let reply = Message::Response {
            stream: 5,
            response: Response::ok(Vec::new()),
        };
        assert_eq!(
            reply.frames(PLUGIN_CONN),
            [0, 0, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 5, 2, 0]
        );
    }

    #[test]
    fn messages_come_back_whatever_the_reads_cut() {
        let error = Message::Response {
            stream: 3,
            response: Response::error(CODE_UNKNOWN, "attach failed"),
        };
        let mut big = register();
        if let Message::Request { request, .. } = &mut big {
            request.payload = vec![7; 10_000];
        }
        let mut bytes = register().frames(RUNTIME_CONN);
        bytes.extend(error.frames(PLUGIN_CONN));
        bytes.extend(big.frames(RUNTIME_CONN));
        for cut in [1, 3, 8, 9, 100, 4096, bytes.len()] {
            let mut demux = Demux::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                got.extend(demux.feed(chunk).unwrap());
            }
            got.sort_by_key(|(conn, _)| *conn);
            assert_eq!(
                got,
                [
                    (PLUGIN_CONN, error.clone()),
                    (RUNTIME_CONN, register()),
                    (RUNTIME_CONN, big.clone())
                ],
                "reads of {cut} bytes"
            );
        }
        // Frames of at most 4 KiB.
        let frames = big.frames(RUNTIME_CONN);
        let first_len = u32::from_be_bytes(frames[4..8].try_into().unwrap());
        assert_eq!(first_len as usize, MAX_FRAME);
    }

    #[test]
    fn a_failed_status_is_told_from_ok() {
        assert!(Response::ok(vec![1]).failure().is_none());
        let failed = Response::error(CODE_UNIMPLEMENTED, "no such method");
        assert_eq!(failed.failure().map(|s| s.code), Some(CODE_UNIMPLEMENTED));
    }
}
