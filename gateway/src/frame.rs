//! Server-side WebSocket framing (RFC 6455), kept lean for idle devices.
//!
//! fastwebsockets does the upgrade handshake, but its frame reader
//! allocates an 8 KiB buffer per connection up front and dirties it on the
//! first pong. That is 4 KiB of RSS per idle device, the whole memory
//! budget. So reading here uses no buffer between frames: the header
//! goes into 14 bytes of state and a payload is allocated only while it is
//! read. Clients only send pongs, pings and closes to a push-only feed, so
//! a few extra small reads per client frame cost nothing that matters.
//!
//! Server frames are encoded whole, once per event, into a `Bytes` that
//! every device shares.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::close::{self, CloseCode};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Control frame payloads are at most this long (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Encodes one unmasked server frame with FIN set.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    buf.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => buf.put_u8(n as u8),
        n if n <= 0xFFFF => {
            buf.put_u8(126);
            buf.put_u16(n as u16);
        }
        n => {
            buf.put_u8(127);
            buf.put_u64(n as u64);
        }
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a text frame.
pub fn text(payload: &[u8]) -> Bytes {
    encode(OP_TEXT, payload)
}

/// The payload of a frame made by [`encode`] (a whole, unmasked frame).
pub fn payload(frame: &[u8]) -> Option<&[u8]> {
    let start = match *frame.get(1)? & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(start..)
}

/// Encodes a close frame; the reason is cut to fit a control frame.
pub fn close(code: CloseCode, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.code().to_be_bytes());
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// What a client sent, reduced to what the gateway acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Ping(Bytes),
    Pong,
    /// A valid close frame, and the code to answer it with.
    Close(CloseCode),
    /// A text, binary or continuation frame. The feed is push-only, so the
    /// gateway drops its content (the echo mode for conformance tests
    /// sends it back); its size and, for text, its UTF-8 are checked.
    Data {
        /// The frame's opcode (text, binary or continuation).
        opcode: u8,
        fin: bool,
        payload: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("connection closed")]
    Eof,
    #[error("i/o error: {0}")]
    Io(std::io::ErrorKind),
    #[error("frame or message larger than the limit")]
    TooBig,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8: {0}")]
    Utf8(&'static str),
}

impl ReadError {
    /// The close code to answer with, if a close frame can still be sent.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ReadError::Eof | ReadError::Io(_) => None,
            ReadError::TooBig => Some(CloseCode::TooBig),
            ReadError::Protocol(_) => Some(CloseCode::Protocol),
            ReadError::Utf8(_) => Some(CloseCode::InvalidPayload),
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e.kind())
    }
}

/// Reads client frames one at a time. Every await point is a single
/// `read` whose progress is kept in `self`, so `next` is cancel-safe: it
/// can sit in a `select!` and be resumed after losing a race.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    head: [u8; 14],
    head_len: usize,
    /// Payload of the frame being read; empty (no allocation) otherwise.
    payload: Vec<u8>,
    payload_len: usize,
    /// Bytes of the current fragmented message so far.
    message_len: usize,
    in_fragmented_message: bool,
    /// The message being read is text, so its bytes must be UTF-8.
    message_is_text: bool,
    /// The start of a UTF-8 sequence cut by a fragment boundary.
    utf8: Utf8Tail,
}

impl FrameReader {
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message,
            head: [0; 14],
            head_len: 0,
            payload: Vec::new(),
            payload_len: 0,
            message_len: 0,
            in_fragmented_message: false,
            message_is_text: false,
            utf8: Utf8Tail::default(),
        }
    }

    pub async fn next<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<ClientFrame, ReadError> {
        // Header: 2 bytes, then the extended length and the mask.
        while self.head_len < 2 {
            self.fill_head(rd, 2).await?;
        }
        let (b0, b1) = (self.head[0], self.head[1]);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let extra = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let head_total = 2 + extra + 4;
        while self.head_len < head_total {
            self.fill_head(rd, head_total).await?;
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let len = match extra {
            0 => u64::from(b1 & 0x7F),
            2 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            _ => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
        };
        let is_control = opcode & 0x8 != 0;
        if is_control {
            if !fin {
                return Err(ReadError::Protocol("fragmented control frame"));
            }
            if len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ReadError::Protocol("control frame too long"));
            }
        } else if len > self.max_message as u64 || self.message_len as u64 + len > self.max_message as u64 {
            return Err(ReadError::TooBig);
        }
        let len = len as usize;

        // Payload: allocated now, exactly as long as announced.
        if self.payload_len == 0 && len > 0 && self.payload.is_empty() {
            self.payload = vec![0; len];
        }
        while self.payload_len < len {
            let n = rd.read(&mut self.payload[self.payload_len..]).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            self.payload_len += n;
        }
        let mask: [u8; 4] = self.head[head_total - 4..head_total].try_into().expect("4 bytes");
        let mut payload = std::mem::take(&mut self.payload);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        self.head_len = 0;
        self.payload_len = 0;

        match opcode {
            OP_PING => Ok(ClientFrame::Ping(Bytes::from(payload))),
            OP_PONG => Ok(ClientFrame::Pong),
            OP_CLOSE => match close::answer_to_client_close(&payload) {
                Ok(code) => Ok(ClientFrame::Close(code)),
                Err((CloseCode::InvalidPayload, why)) => Err(ReadError::Utf8(why)),
                Err((_, why)) => Err(ReadError::Protocol(why)),
            },
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                let continuation = opcode == OP_CONTINUATION;
                if continuation != self.in_fragmented_message {
                    return Err(ReadError::Protocol("unexpected continuation state"));
                }
                if !continuation {
                    self.message_is_text = opcode == OP_TEXT;
                }
                if self.message_is_text && !self.utf8.check(&payload, fin) {
                    return Err(ReadError::Utf8("text message is not UTF-8"));
                }
                if fin {
                    self.in_fragmented_message = false;
                    self.message_len = 0;
                } else {
                    self.in_fragmented_message = true;
                    self.message_len += len;
                }
                Ok(ClientFrame::Data { opcode, fin, payload: Bytes::from(payload) })
            }
            _ => Err(ReadError::Protocol("unknown opcode")),
        }
    }

    async fn fill_head<R: AsyncRead + Unpin>(&mut self, rd: &mut R, upto: usize) -> Result<(), ReadError> {
        let n = rd.read(&mut self.head[self.head_len..upto]).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        self.head_len += n;
        Ok(())
    }
}

/// Checks a text message fragment by fragment: a fragment may end inside
/// a multi-byte sequence, whose first bytes (at most 3) wait here for the
/// next fragment.
#[derive(Debug, Default)]
struct Utf8Tail {
    bytes: [u8; 4],
    len: u8,
}

impl Utf8Tail {
    /// Whether the message is still valid UTF-8 after `data`; `fin` ends it.
    fn check(&mut self, mut data: &[u8], fin: bool) -> bool {
        if self.len > 0 {
            let need = match self.bytes[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            while usize::from(self.len) < need && !data.is_empty() {
                self.bytes[usize::from(self.len)] = data[0];
                self.len += 1;
                data = &data[1..];
            }
            match std::str::from_utf8(&self.bytes[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                // Still a valid start, and this fragment had no more bytes.
                Err(e) if e.error_len().is_none() => return !fin,
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() && !fin => {
                let tail = &data[e.valid_up_to()..];
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_found_behind_every_header_length() {
        for n in [0, 125, 126, 70_000] {
            let body = vec![b'x'; n];
            assert_eq!(payload(&text(&body)), Some(&body[..]), "{n} bytes");
        }
        assert_eq!(payload(&[0x81]), None);
    }

    // The same encoder the integration tests use.
    mod wire {
        include!("../tests/common/wire.rs");
    }

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        wire::client_frame(fin, opcode, payload, [1, 2, 3, 4])
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<ClientFrame, ReadError>> {
        let mut rd = std::io::Cursor::new(bytes);
        let mut reader = FrameReader::new(max);
        let mut out = Vec::new();
        loop {
            let r = reader.next(&mut rd).await;
            let end = r.is_err();
            out.push(r);
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_control_and_data_frames() {
        let mut bytes = client_frame(true, OP_PING, b"hi");
        bytes.extend(client_frame(true, OP_PONG, b""));
        bytes.extend(client_frame(false, OP_TEXT, b"ab"));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"cd"));
        bytes.extend(client_frame(true, OP_BINARY, &[0u8; 300]));
        bytes.extend(client_frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        let got = read_all(bytes, 4096).await;
        assert_eq!(
            got,
            vec![
                Ok(ClientFrame::Ping(Bytes::from_static(b"hi"))),
                Ok(ClientFrame::Pong),
                Ok(ClientFrame::Data { opcode: OP_TEXT, fin: false, payload: Bytes::from_static(b"ab") }),
                Ok(ClientFrame::Data { opcode: OP_CONTINUATION, fin: true, payload: Bytes::from_static(b"cd") }),
                Ok(ClientFrame::Data { opcode: OP_BINARY, fin: true, payload: Bytes::from(vec![0u8; 300]) }),
                Ok(ClientFrame::Close(CloseCode::from_client(1000).unwrap())),
                Err(ReadError::Eof),
            ]
        );
    }

    #[tokio::test]
    async fn refuses_oversized_frames_and_messages() {
        let got = read_all(client_frame(true, OP_TEXT, &[b'x'; 4097]), 4096).await;
        assert_eq!(got, vec![Err(ReadError::TooBig)]);
        let mut bytes = client_frame(false, OP_TEXT, &[b'x'; 3000]);
        bytes.extend(client_frame(true, OP_CONTINUATION, &[b'x'; 3000]));
        let got = read_all(bytes, 4096).await;
        assert!(matches!(got[..], [Ok(ClientFrame::Data { .. }), Err(ReadError::TooBig)]), "{got:?}");
        // A 64-bit length must not allocate before it is refused.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(huge, 4096).await, vec![Err(ReadError::TooBig)]);
    }

    #[tokio::test]
    async fn refuses_protocol_violations() {
        let unmasked = vec![0x81, 0x01, b'x'];
        assert_eq!(read_all(unmasked, 4096).await, vec![Err(ReadError::Protocol("client frames must be masked"))]);
        let stray = client_frame(true, OP_CONTINUATION, b"x");
        assert!(matches!(read_all(stray, 4096).await[0], Err(ReadError::Protocol(_))));
        let long_ping = client_frame(true, OP_PING, &[0; 126]);
        assert!(matches!(read_all(long_ping, 4096).await[0], Err(ReadError::Protocol(_))));
    }

    #[tokio::test]
    async fn refuses_invalid_utf8_and_close_codes() {
        let utf8 = |r: &Result<ClientFrame, ReadError>| matches!(r, Err(ReadError::Utf8(_)));
        assert!(utf8(&read_all(client_frame(true, OP_TEXT, &[0xCE, 0xBA, 0xFF]), 4096).await[0]));
        // Binary frames carry anything.
        assert!(read_all(client_frame(true, OP_BINARY, &[0xFF]), 4096).await[0].is_ok());
        // "κόσμε" cut inside a character by each fragment boundary: valid.
        let text = "κόσμε".as_bytes();
        for cut in 1..text.len() {
            let mut bytes = client_frame(false, OP_TEXT, &text[..cut]);
            bytes.extend(client_frame(true, OP_CONTINUATION, &text[cut..]));
            let got = read_all(bytes, 4096).await;
            assert!(got[0].is_ok() && got[1].is_ok(), "cut at {cut}: {got:?}");
        }
        // One byte per fragment, a message ending inside a character.
        let mut bytes = client_frame(false, OP_TEXT, &[0xCE]);
        bytes.extend(client_frame(true, OP_CONTINUATION, b""));
        assert!(utf8(&read_all(bytes, 4096).await[1]));
        // A code point above U+10FFFF split across fragments.
        let mut bytes = client_frame(false, OP_TEXT, &[0xF4]);
        bytes.extend(client_frame(false, OP_CONTINUATION, &[0x90]));
        assert!(utf8(&read_all(bytes, 4096).await[1]));
        // A close code a client may not send, and a reason that is not UTF-8.
        let got = read_all(client_frame(true, OP_CLOSE, &1005u16.to_be_bytes()), 4096).await;
        assert!(matches!(got[0], Err(ReadError::Protocol(_))));
        let got = read_all(client_frame(true, OP_CLOSE, &[0x03, 0xE8, 0xFF]), 4096).await;
        assert!(utf8(&got[0]));
    }

    #[tokio::test]
    async fn survives_byte_by_byte_delivery() {
        // A reader that returns one byte per read exercises every resume point.
        let bytes = client_frame(true, OP_PING, b"hello");
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&bytes).await.unwrap();
        });
        let mut reader = FrameReader::new(4096);
        assert_eq!(reader.next(&mut rx).await, Ok(ClientFrame::Ping(Bytes::from_static(b"hello"))));
        writer.await.unwrap();
    }

    #[test]
    fn encodes_lengths_and_close_reasons() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(&text(&[0; 200])[..4], &[0x81, 126, 0, 200]);
        assert_eq!(&text(&vec![0; 70_000])[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        let c = close(CloseCode::Moved, &"é".repeat(100));
        assert!(c.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert_eq!(&c[2..4], &4001u16.to_be_bytes());
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }
}
