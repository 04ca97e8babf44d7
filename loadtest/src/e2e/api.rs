//! The backend's HTTP API, as e2e mode uses it: a small HTTP/1.1 client
//! over keep-alive connections kept in a pool, JSON in and out, and a
//! counter read from the backend's `/metrics`.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

/// A request that has not been answered within this counts as failed. A
/// register waits behind the backend's few argon2 slots, a post behind a
/// loaded database: seconds, not minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle keep-alive connections kept for reuse; callers bound how many
/// requests are in flight, so more than this are never idle at once.
const MAX_IDLE: usize = 512;
/// The password of every user a run registers (they never log in
/// interactively; the backend only needs one).
pub const PASSWORD: &str = "loadtest-password";

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, when the status is 2xx; otherwise an error that
    /// names the status and what the backend said.
    fn json(self, what: &str) -> anyhow::Result<serde_json::Value> {
        if !(200..300).contains(&self.status) {
            anyhow::bail!("{what}: HTTP {}: {}", self.status, String::from_utf8_lossy(&self.body).trim());
        }
        serde_json::from_slice(&self.body).with_context(|| format!("{what}: the answer is not JSON"))
    }
}

/// The backend at one `http://host:port` base URL.
pub struct Api {
    /// `host:port`, for connecting and for the Host header.
    hostport: String,
    /// Keep-alive connections not in use. A std-like mutex: held only to
    /// push or pop, never across an await.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Api {
    pub fn new(base_url: &str) -> anyhow::Result<Api> {
        let hostport = base_url
            .strip_prefix("http://")
            .with_context(|| format!("--backend-url {base_url:?}: expected http://host:port"))?
            .trim_end_matches('/');
        anyhow::ensure!(
            !hostport.is_empty() && !hostport.contains('/'),
            "--backend-url {base_url:?}: expected http://host:port"
        );
        Ok(Api { hostport: hostport.to_owned(), idle: Mutex::new(Vec::new()) })
    }

    /// One request; `token` goes into `Authorization: Bearer`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_untimed(method, path, token, body))
            .await
            .with_context(|| format!("{path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn call_untimed(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let mut req = Request::builder().method(method).uri(path).header("host", &self.hostport);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b).expect("JSON serializes"))
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes)).context("request")?;
        let mut sender = self.connection().await?;
        let resp = sender.send_request(req).await.with_context(|| format!("{path}: request failed"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.with_context(|| format!("{path}: reading the answer"))?.to_bytes();
        // Only a connection whose answer was read to the end is reusable.
        let mut idle = self.idle.lock();
        if !sender.is_closed() && idle.len() < MAX_IDLE {
            idle.push(sender);
        }
        Ok(Answer { status, body })
    }

    /// An idle connection that is still open, or a new one.
    async fn connection(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        loop {
            let Some(mut s) = self.idle.lock().pop() else { break };
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let stream = tokio::net::TcpStream::connect(&self.hostport)
            .await
            .with_context(|| format!("cannot connect to the backend at {}", self.hostport))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake with the backend")?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the backend closes.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// `POST /user/register`: the new user's id.
    pub async fn register(&self, first_name: &str, second_name: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "first_name": first_name, "second_name": second_name, "birthdate": "1990-01-01",
            "biography": "loadtest", "city": "Loopback", "password": PASSWORD,
        });
        let v = self.call(Method::POST, "/user/register", None, Some(&body)).await?.json("register")?;
        v["user_id"].as_str().map(str::to_owned).context("register: no user_id in the answer")
    }

    /// `POST /login`: a token for `id`.
    pub async fn login(&self, id: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({ "id": id, "password": PASSWORD });
        let v = self.call(Method::POST, "/login", None, Some(&body)).await?.json("login")?;
        v["token"].as_str().map(str::to_owned).context("login: no token in the answer")
    }

    /// `PUT /friend/set/{user_id}`: the token's user follows `user_id`.
    pub async fn follow(&self, token: &str, user_id: &str) -> anyhow::Result<()> {
        let a = self.call(Method::PUT, &format!("/friend/set/{user_id}"), Some(token), None).await?;
        anyhow::ensure!(
            (200..300).contains(&a.status),
            "follow: HTTP {}: {}",
            a.status,
            String::from_utf8_lossy(&a.body).trim()
        );
        Ok(())
    }

    /// `POST /post/create`: the new post's id.
    pub async fn create_post(&self, token: &str, text: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({ "text": text });
        let v = self.call(Method::POST, "/post/create", Some(token), Some(&body)).await?.json("post/create")?;
        v.as_str().map(str::to_owned).context("post/create: the answer is not a post id")
    }

    /// `GET /post/feed`: the ids of one page of the token's user's feed.
    pub async fn feed_page(&self, token: &str, offset: usize, limit: usize) -> anyhow::Result<Vec<String>> {
        let path = format!("/post/feed?offset={offset}&limit={limit}");
        let v = self.call(Method::GET, &path, Some(token), None).await?.json("post/feed")?;
        let posts = v.as_array().context("post/feed: the answer is not a list")?;
        posts.iter().map(|p| p["id"].as_str().map(str::to_owned).context("post/feed: a post without id")).collect()
    }

    /// The value of an unlabelled counter or gauge on the backend's
    /// `/metrics` (0 when the backend has not recorded it yet).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics_text().await?, name).unwrap_or(0.0))
    }

    /// The backend's whole `/metrics` text.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let a = self.call(Method::GET, "/metrics", None, None).await?;
        anyhow::ensure!(a.status == 200, "/metrics: HTTP {}", a.status);
        Ok(String::from_utf8_lossy(&a.body).into_owned())
    }
}

/// `name`'s value in Prometheus text (unlabelled series only).
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_and_metrics_parse() {
        assert_eq!(Api::new("http://127.0.0.1:8080/").unwrap().hostport, "127.0.0.1:8080");
        assert!(Api::new("https://x:1").is_err());
        assert!(Api::new("http://x:1/api").is_err());
        let text = "# TYPE backend_fanout_recipients_total counter\nbackend_fanout_recipients_total 1200\n\
                    backend_fanout_recipients_total_x 5\nbackend_events_published_total 7\n";
        assert_eq!(metric_value(text, "backend_fanout_recipients_total"), Some(1200.0));
        assert_eq!(metric_value(text, "backend_events_published_total"), Some(7.0));
        assert_eq!(metric_value(text, "missing"), None);
    }
}
