//! Property tests for what an attacker controls byte for byte: the frame
//! reader and the token extraction. `cargo test -p gateway --test properties`
//! (PROPTEST_CASES=10000 for a longer run).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use contract::token::{TokenError, extract};
use gateway::frame::{self, ClientFrame, FrameReader, ReadError};
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

#[path = "common/wire.rs"]
mod wire;
use wire::client_frame;

/// Hands out `data` in the given chunk sizes (cycled), as a network would.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let size = self.sizes[self.turn % self.sizes.len()].max(1);
        self.turn += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn read_all(data: Vec<u8>, sizes: Vec<usize>, max: usize) -> Vec<Result<ClientFrame, ReadError>> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut rd = Chunked { data, pos: 0, sizes, turn: 0 };
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
    })
}

/// A valid client frame and what the reader must make of it.
fn valid_frame() -> impl Strategy<Value = (Vec<u8>, ClientFrame)> {
    let mask = any::<[u8; 4]>();
    prop_oneof![
        (proptest::collection::vec(any::<u8>(), 0..=125), mask)
            .prop_map(|(p, m)| (client_frame(true, frame::OP_PING, &p, m), ClientFrame::Ping(Bytes::from(p)))),
        (proptest::collection::vec(any::<u8>(), 0..=125), mask)
            .prop_map(|(p, m)| (client_frame(true, frame::OP_PONG, &p, m), ClientFrame::Pong)),
        (proptest::collection::vec(any::<u8>(), 0..2000), mask).prop_map(|(p, m)| (
            client_frame(true, frame::OP_BINARY, &p, m),
            ClientFrame::Data { opcode: frame::OP_BINARY, fin: true, payload: Bytes::from(p) }
        )),
        (".{0,300}", mask).prop_map(|(s, m)| (
            client_frame(true, frame::OP_TEXT, s.as_bytes(), m),
            ClientFrame::Data { opcode: frame::OP_TEXT, fin: true, payload: Bytes::from(s.into_bytes()) }
        )),
    ]
}

proptest! {
    /// Any bytes at all: the reader ends with an error or EOF, never
    /// panics, never hangs, and never yields a data payload over the limit.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096),
                                   sizes in proptest::collection::vec(1usize..64, 1..8)) {
        let got = read_all(data, sizes, 1024);
        prop_assert!(got.last().unwrap().is_err());
        for r in &got {
            if let Ok(ClientFrame::Data { payload, .. }) = r {
                prop_assert!(payload.len() <= 1024);
            }
        }
    }

    /// Valid frames, delivered in any chunking, come out as sent.
    #[test]
    fn valid_frames_round_trip(frames in proptest::collection::vec(valid_frame(), 0..12),
                               sizes in proptest::collection::vec(1usize..200, 1..8)) {
        let bytes: Vec<u8> = frames.iter().flat_map(|(b, _)| b.clone()).collect();
        let got = read_all(bytes, sizes, 4096);
        let want: Vec<_> = frames.into_iter().map(|(_, f)| Ok(f)).chain([Err(ReadError::Eof)]).collect();
        prop_assert_eq!(got, want);
    }

    /// A valid UTF-8 text message is accepted however it is fragmented,
    /// and one with a byte that is never UTF-8 (0xFF) is refused with the
    /// UTF-8 error however it is fragmented.
    #[test]
    fn utf8_is_checked_across_any_fragmentation(text in ".{1,80}", cuts in proptest::collection::vec(any::<usize>(), 0..6),
                                                bad in any::<bool>(), at in any::<usize>()) {
        let mut bytes = text.into_bytes();
        if bad {
            let i = at % (bytes.len() + 1);
            bytes.insert(i, 0xFF);
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort();
        cuts.dedup();
        let mut stream = Vec::new();
        let mut start = 0;
        let bounds: Vec<usize> = cuts.into_iter().chain([bytes.len()]).collect();
        for (i, &end) in bounds.iter().enumerate() {
            let end = end.max(start);
            let op = if i == 0 { frame::OP_TEXT } else { frame::OP_CONTINUATION };
            stream.extend(client_frame(i + 1 == bounds.len(), op, &bytes[start..end], [9, 8, 7, 6]));
            start = end;
        }
        let got = read_all(stream, vec![7], 4096);
        let failed = got.iter().any(|r| matches!(r, Err(ReadError::Utf8(_))));
        prop_assert_eq!(failed, bad);
        prop_assert!(got.iter().all(|r| !matches!(r, Err(ReadError::Protocol(_)))));
    }

    /// Tokens in any places: one distinct value is the token, two distinct
    /// values are ambiguous, none is missing.
    #[test]
    fn token_extraction_is_unambiguous(placed in proptest::collection::vec((0u8..3, 0u8..3), 0..6)) {
        let names = ["tokA", "tokB", "tokC"];
        let mut headers = hyper::HeaderMap::new();
        let mut query = Vec::new();
        for (place, which) in &placed {
            let t = names[*which as usize];
            match place {
                0 => { headers.append("authorization", format!("Bearer {t}").parse().unwrap()); }
                1 => { headers.append("x-auth", t.parse().unwrap()); }
                _ => query.push(format!("token={t}")),
            }
        }
        let query = query.join("&");
        let distinct: std::collections::BTreeSet<u8> = placed.iter().map(|(_, w)| *w).collect();
        let want = match distinct.len() {
            0 => Err(TokenError::Missing),
            1 => Ok(names[*distinct.iter().next().unwrap() as usize]),
            _ => Err(TokenError::Ambiguous),
        };
        prop_assert_eq!(extract(&headers, Some(&query)), want);
    }
}
