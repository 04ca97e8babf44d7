//! The nginx + Nchan peer: what a benchmark needs to drive it with the same
//! devices as our gateway (see `bench/nchan/nginx.conf`, started by
//! `scripts/nchan.sh start`).
//!
//! - One Nchan channel per user, named by the user id.
//! - A device subscribes with a WebSocket, either at [`subscribe_url`]
//!   (`/sub/<user>`), or at any other path with the user id as its bearer
//!   token. [`crate::client::connect`] always asks for `/post/feed/posted`
//!   with `Authorization: Bearer <token>` and takes only `ws://host:port`,
//!   so today a device connects with `client::connect(source, base, user)`.
//! - The publisher POSTs the event JSON to `/pub/<user>,<user>,...`: Nchan
//!   publishes one request to up to [`MAX_CHANNELS_PER_REQUEST`] channels
//!   (multiplexed publishing), as our publisher sends one message per node.
//! - Nchan sends the POST body unchanged as one text frame (no metadata:
//!   that comes only with the `ws+meta.nchan` subprotocol), so devices parse
//!   what they get exactly as they parse our gateway's frames.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Nchan's limit on channels in one multiplexed id (`NCHAN_MULTITAG_MAX`).
pub const MAX_CHANNELS_PER_REQUEST: usize = 255;
/// Longest channel list put in one request path. The config allows 16 KB
/// for the request line (`large_client_header_buffers`) and for the id
/// (`nchan_max_channel_id_length`); this leaves room for the rest.
const MAX_PATH_BYTES: usize = 12_000;
/// A publish request that takes longer than this fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The WebSocket URL a device of `user` connects to: `base` is the server,
/// `ws://host:port` (an `http://` base is turned into `ws://`; a trailing
/// slash is ignored).
pub fn subscribe_url(base: &str, user: &str) -> String {
    format!("ws://{}/sub/{}", host_port(base), encode_id(user))
}

/// `host:port` of a base URL given as `ws://`, `http://` or bare.
fn host_port(base: &str) -> &str {
    let rest = base.strip_prefix("ws://").or_else(|| base.strip_prefix("http://")).unwrap_or(base);
    rest.split('/').next().unwrap_or(rest)
}

/// Percent-encodes a channel id for a path segment (nginx decodes it back
/// before the location regex captures it): everything but RFC 3986's
/// unreserved characters.
fn encode_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Channel ids that cannot travel in the path: the list separator, path
/// separators and dot segments (nginx would resolve them), NUL.
fn check_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains([',', '/', '\0']) {
        bail!("user id {id:?} cannot be an Nchan channel id here (empty, '.', '..', or contains ',', '/', NUL)");
    }
    Ok(())
}

/// Splits the recipients into publish paths, `/pub/a,b,c`, each within
/// Nchan's channel limit and the request-line budget.
fn publish_paths(recipients: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut paths = Vec::new();
    let mut path = String::new();
    let mut n = 0;
    for r in recipients {
        check_id(r)?;
        let enc = encode_id(r);
        anyhow::ensure!(enc.len() + 5 <= MAX_PATH_BYTES, "user id of {} bytes is too long", r.len());
        if n == MAX_CHANNELS_PER_REQUEST || path.len() + 1 + enc.len() > MAX_PATH_BYTES {
            paths.push(std::mem::take(&mut path));
            n = 0;
        }
        path.push_str(if n == 0 { "/pub/" } else { "," });
        path.push_str(&enc);
        n += 1;
    }
    if n > 0 {
        paths.push(path);
    }
    Ok(paths)
}

/// Publishes events to Nchan over a few keep-alive HTTP/1.1 connections.
/// At most `connections` requests are in flight; further publishes wait.
pub struct Publisher {
    host_port: String,
    idle: parking_lot::Mutex<Vec<SendRequest<Full<Bytes>>>>,
    permits: Semaphore,
}

impl Publisher {
    /// A publisher to the server at `base` (`http://host:port`, `ws://...`
    /// or `host:port`) over at most `connections` connections, opened when
    /// first needed.
    pub fn new(base: &str, connections: usize) -> Publisher {
        Publisher {
            host_port: host_port(base).to_string(),
            idle: parking_lot::Mutex::new(Vec::new()),
            permits: Semaphore::new(connections.max(1)),
        }
    }

    /// Publishes `body` (sent unchanged to every device) to the channel of
    /// every recipient: one request per [`MAX_CHANNELS_PER_REQUEST`]
    /// recipients. Fails on a transport error, a timeout or a non-2xx
    /// answer (Nchan answers 201 when some subscriber got it, 202 when none
    /// was there).
    pub async fn publish(&self, recipients: &[&str], body: &[u8]) -> anyhow::Result<()> {
        let body = Bytes::copy_from_slice(body);
        for path in publish_paths(recipients)? {
            self.post(&path, body.clone()).await?;
        }
        Ok(())
    }

    async fn post(&self, path: &str, body: Bytes) -> anyhow::Result<()> {
        let _permit = self.permits.acquire().await?;
        let mut sender = match self.take_idle().await {
            Some(s) => s,
            None => self.connect().await?,
        };
        let req = Request::post(path)
            .header("host", &self.host_port)
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let exchange = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            // Read the whole answer so the connection can be reused.
            let text = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, text))
        };
        let (status, text) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("POST {path}: no answer in {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("POST {path}"))?;
        if !status.is_success() {
            bail!("POST {}: {status}: {}", short(path), String::from_utf8_lossy(&text).trim());
        }
        self.idle.lock().push(sender);
        Ok(())
    }

    /// An idle connection that is still open, if any.
    async fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let mut s = self.idle.lock().pop()?;
            if s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(&self.host_port)
            .await
            .with_context(|| format!("connect to Nchan at {}", self.host_port))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("Nchan publisher connection: {e}");
            }
        });
        Ok(sender)
    }
}

/// The start of a long path, for error messages.
fn short(path: &str) -> &str {
    match path.char_indices().nth(80) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}

/// Resident memory (RSS) of nginx: the master whose pid is in `pid_file`
/// plus all its children (the workers), from `/proc`. Nchan's shared memory
/// is counted in each worker that touched it, as RSS does; see
/// [`nginx_pss_bytes`] for the proportional figure.
pub fn nginx_rss_bytes(pid_file: &Path) -> anyhow::Result<u64> {
    sum_over_nginx(pid_file, "status", "VmRSS:")
}

/// Proportional set size (PSS) of nginx, master plus workers: shared pages
/// divided among the processes that map them, so shared memory and the
/// binary's pages are counted once in the sum.
pub fn nginx_pss_bytes(pid_file: &Path) -> anyhow::Result<u64> {
    sum_over_nginx(pid_file, "smaps_rollup", "Pss:")
}

/// The master's pid and its children's.
pub fn nginx_pids(pid_file: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(pid_file).with_context(|| format!("read {}", pid_file.display()))?;
    let master: u32 = text.trim().parse().with_context(|| format!("pid in {}", pid_file.display()))?;
    anyhow::ensure!(Path::new(&format!("/proc/{master}")).exists(), "nginx master {master} is not running");
    let mut pids = vec![master];
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else { continue };
        // A process may exit while we look: skip it.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && parent_of(&stat) == Some(master)
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The parent pid from `/proc/<pid>/stat` (after the command in parens,
/// which may itself contain spaces and parens).
fn parent_of(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

fn sum_over_nginx(pid_file: &Path, file: &str, field: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in nginx_pids(pid_file)? {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/{file}")).with_context(|| format!("/proc/{pid}/{file}"))?;
        total += kb_field(&text, field).with_context(|| format!("{field} in /proc/{pid}/{file}"))? * 1024;
    }
    Ok(total)
}

/// The value of a `Name:   1234 kB` line.
fn kb_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_urls_name_the_users_channel() {
        assert_eq!(subscribe_url("ws://127.0.0.1:8090", "alice"), "ws://127.0.0.1:8090/sub/alice");
        assert_eq!(subscribe_url("http://127.0.0.1:8090/", "lt-7"), "ws://127.0.0.1:8090/sub/lt-7");
        assert_eq!(subscribe_url("127.0.0.1:8090", "a b%é"), "ws://127.0.0.1:8090/sub/a%20b%25%C3%A9");
    }

    #[test]
    fn one_request_per_255_channels() {
        let users: Vec<String> = (0..600).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let paths = publish_paths(&refs).unwrap();
        assert_eq!(paths.len(), 3);
        let ids: Vec<Vec<&str>> = paths.iter().map(|p| p.strip_prefix("/pub/").unwrap().split(',').collect()).collect();
        assert_eq!(ids.iter().map(Vec::len).collect::<Vec<_>>(), [255, 255, 90]);
        assert_eq!(ids.concat(), refs);
        assert_eq!(publish_paths(&["a", "b"]).unwrap(), ["/pub/a,b"]);
        assert!(publish_paths(&[]).unwrap().is_empty());
    }

    #[test]
    fn long_ids_split_by_path_length() {
        let long = "x".repeat(5000);
        let paths = publish_paths(&[&long, &long, &long]).unwrap();
        assert_eq!(paths.len(), 2);
        assert!(paths.iter().all(|p| p.len() <= MAX_PATH_BYTES));
        assert!(publish_paths(&[&"y".repeat(MAX_PATH_BYTES)]).is_err());
    }

    #[test]
    fn ids_that_cannot_be_channels_are_refused() {
        for bad in ["", ".", "..", "a,b", "a/b", "a\0"] {
            assert!(publish_paths(&["ok", bad]).is_err(), "{bad:?}");
        }
        assert!(publish_paths(&["0f8fad5b-d9cb-469f-a165-70867728950e", "lt-1", "a.b"]).is_ok());
    }

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_of("123 (nginx) S 45 123 123 0"), Some(45));
        assert_eq!(parent_of("123 (a) b (c) S 7 1"), Some(7));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn memory_of_a_process_tree_from_proc() {
        // This test process stands in for a master (its children, if any,
        // are counted too): the sum is at least its own RSS.
        let dir = std::env::temp_dir().join(format!("nchan-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("nginx.pid");
        std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
        let own = kb_field(&std::fs::read_to_string("/proc/self/status").unwrap(), "VmRSS:").unwrap() * 1024;
        let rss = nginx_rss_bytes(&pid_file).unwrap();
        let pss = nginx_pss_bytes(&pid_file).unwrap();
        assert!(rss >= own / 2 && own > 0, "rss {rss}, own {own}");
        assert!(pss > 0 && pss <= rss * 2, "pss {pss}, rss {rss}");
        std::fs::write(&pid_file, "4194304999\n").unwrap();
        assert!(nginx_rss_bytes(&pid_file).is_err());
        assert!(nginx_rss_bytes(&dir.join("missing.pid")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kb_fields() {
        assert_eq!(kb_field("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234));
        assert_eq!(kb_field("Rss: 1 kB\nPss:  99 kB\n", "Pss:"), Some(99));
        assert_eq!(kb_field("Rss: 1 kB\n", "Pss:"), None);
    }
}
