//! A raw-socket WebSocket client: every byte it sends is written here, so
//! tests can send what no well-behaved library would (bad close codes,
//! invalid UTF-8, odd handshakes) and read exactly what came back.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;
use super::wire;

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request head for `path` with `extra` header lines (each
/// ending in `\r\n`).
pub fn upgrade_head(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: {KEY}\r\n{extra}\r\n"
    )
}

/// An open raw connection: the socket and bytes read past the answer head.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

/// The answer head to a request (status, head text) and the connection.
pub async fn request(addr: SocketAddr, head: &str) -> (u16, String, Raw) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("an answer head") {
            Ok(0) | Err(_) => return (0, String::from_utf8_lossy(&buf).into_owned(), Raw { s, buf: Vec::new() }),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let rest = buf.split_off(end);
    (status, head, Raw { s, buf: rest })
}

/// Upgrades with the token in `Authorization`; panics unless 101.
pub async fn open(addr: SocketAddr, path: &str, token: &str) -> Raw {
    let (status, head, raw) = request(addr, &upgrade_head(path, &format!("authorization: Bearer {token}\r\n"))).await;
    assert_eq!(status, 101, "{head}");
    raw
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    wire::client_frame(fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// A close frame's payload: code and reason bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

impl Raw {
    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.s.write_all(&client_frame(fin, opcode, payload)).await.unwrap();
    }

    async fn fill(&mut self, n: usize, within: Duration) -> bool {
        let mut chunk = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + within;
        while self.buf.len() < n {
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => return false,
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    /// The next server frame (opcode, payload), or `None` when the socket
    /// closed or nothing came within `within`.
    pub async fn frame_within(&mut self, within: Duration) -> Option<(u8, Vec<u8>)> {
        if !self.fill(2, within).await {
            return None;
        }
        assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
        let (extra, len) = match self.buf[1] & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(n as usize)),
        };
        if !self.fill(2 + extra, within).await {
            return None;
        }
        let len = len.unwrap_or_else(|| match extra {
            2 => u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize,
            _ => u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
        });
        if !self.fill(2 + extra + len, within).await {
            return None;
        }
        let opcode = self.buf[0] & 0x0F;
        let frame: Vec<u8> = self.buf.drain(..2 + extra + len).collect();
        Some((opcode, frame[2 + extra..].to_vec()))
    }

    /// The close code the server sends next, skipping other frames; `None`
    /// if the socket ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let (op, payload) = self.frame_within(WAIT).await?;
            if op == 0x8 {
                assert!(payload.len() >= 2, "the server's close frame carries a code");
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }

    /// Whether the server ended the TCP connection (EOF or reset) within `within`.
    pub async fn ended_within(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// The value of one sample line in `/metrics` (`name{labels}`), 0 if absent.
pub async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    let (_, text) = super::http_get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
