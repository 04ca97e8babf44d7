//! An echo server made of the gateway's own WebSocket parts, for the
//! Autobahn conformance cases (the feed is push-only, so the cases need
//! something to echo). Not part of the gateway binary; no auth.
//!
//! The handshake check (`http::check_handshake`), the frame reader
//! (`frame::FrameReader`), the frame encoder and the close-code rules
//! (`close`) are the gateway's; only the message assembly is here.
//! Run it and the cases with `scripts/autobahn.sh` (see `autobahn/`).

use std::net::SocketAddr;

use bytes::Bytes;
use gateway::frame::{self, ClientFrame, FrameReader};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Autobahn's largest messages (case 9.x) are 16 MiB.
const MAX_MESSAGE: usize = 16 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into()).parse()?;
    let listener = TcpListener::bind(addr).await?;
    eprintln!("autobahn echo on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|mut req| async move {
                if let Some(refusal) = gateway::http::check_handshake(&req) {
                    return Ok::<_, std::convert::Infallible>(refusal);
                }
                let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
                    Ok(pair) => pair,
                    Err(e) => return Ok(gateway::http::message(hyper::StatusCode::BAD_REQUEST, &e.to_string())),
                };
                tokio::spawn(async move {
                    if let Ok(ws) = upgrade.await {
                        let io: TokioIo<hyper::upgrade::Upgraded> = ws.into_inner();
                        if let Ok(parts) = io.into_inner().downcast::<TokioIo<TcpStream>>() {
                            echo(parts.io.into_inner(), parts.read_buf).await;
                        }
                    }
                });
                Ok(resp.map(|_| Full::new(Bytes::new())))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
        });
    }
}

async fn echo(stream: TcpStream, pre_read: Bytes) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(pre_read), rd);
    let mut reader = FrameReader::new(MAX_MESSAGE);
    let mut message: Vec<u8> = Vec::new();
    let mut message_opcode = frame::OP_TEXT;
    loop {
        let out = match reader.next(&mut rd).await {
            Ok(ClientFrame::Ping(p)) => frame::encode(frame::OP_PONG, &p),
            Ok(ClientFrame::Pong) => continue,
            Ok(ClientFrame::Data { opcode, fin, payload }) => {
                if opcode != frame::OP_CONTINUATION {
                    message_opcode = opcode;
                }
                message.extend_from_slice(&payload);
                if !fin {
                    continue;
                }
                frame::encode(message_opcode, &std::mem::take(&mut message))
            }
            Ok(ClientFrame::Close(code)) => {
                let _ = wr.write_all(&frame::close(code, "")).await;
                break;
            }
            Err(e) => {
                if let Some(code) = e.close_code() {
                    let _ = wr.write_all(&frame::close(code, &e.to_string())).await;
                }
                break;
            }
        };
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
    // Let the peer read our close before the socket goes.
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut rd, &mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
