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
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
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
    /// The close code the client sent, if any.
    Close(Option<u16>),
    /// A text, binary or continuation frame. The feed is push-only, so its
    /// content is read and dropped; only its size is checked.
    Data,
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
            OP_CLOSE => match payload.len() {
                0 => Ok(ClientFrame::Close(None)),
                1 => Err(ReadError::Protocol("close frame of one byte")),
                _ => Ok(ClientFrame::Close(Some(u16::from_be_bytes([payload[0], payload[1]])))),
            },
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                let continuation = opcode == OP_CONTINUATION;
                if continuation != self.in_fragmented_message {
                    return Err(ReadError::Protocol("unexpected continuation state"));
                }
                if fin {
                    self.in_fragmented_message = false;
                    self.message_len = 0;
                } else {
                    self.in_fragmented_message = true;
                    self.message_len += len;
                }
                Ok(ClientFrame::Data)
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

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
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
                Ok(ClientFrame::Data),
                Ok(ClientFrame::Data),
                Ok(ClientFrame::Data),
                Ok(ClientFrame::Close(Some(1000))),
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
        assert_eq!(got, vec![Ok(ClientFrame::Data), Err(ReadError::TooBig)]);
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
        let c = close(4001, &"é".repeat(100));
        assert!(c.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert_eq!(&c[2..4], &4001u16.to_be_bytes());
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }
}
