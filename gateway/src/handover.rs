//! When a node that (re)joins the ring may start serving the users of its
//! slots: once every peer has adopted a ring in which they are its own.
//!
//! A joining node binds its slots, then announces itself; the peers adopt
//! it one poll later each, and until a peer has, that peer still believes
//! it owns some of those users. It delivers their events "here" (the
//! publisher routed them to it by a slot it owns in both rings, so they
//! never reach the new node's queue), and if a device of such a user were
//! already held by the new node, that event would reach nobody, and no
//! device would be told. That is how a rolling restart lost events: a
//! restarted node accepted the devices proxied to it (the others' rings
//! still had its id) before it had even bound its slots.
//!
//! So until every peer in its view routes its slots to it, a node serves
//! nobody: a device for one of its users is proxied to the owner under
//! the ring without this node (the old owner, still serving it), or told
//! to retry. The peers' rings are read from their `/v1/ring`, which shows
//! the ring each acts on (switched after its bindings, before it closes
//! moved devices). Gaining the slots of a node that left needs no such
//! wait: no ring that lacks the leaver gives its slots to anyone else.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use contract::ring::{Member, Ring};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::state::Gateway;

/// How often the peers' rings are read while waiting for them.
const POLL: Duration = Duration::from_millis(100);
/// One read of a peer's ring must take less than this; a slower peer is
/// asked again on the next poll (a hung one is dropped from the view by
/// membership after its timeout, and then no longer waited for).
const PEER_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest `/v1/ring` answer read (1024 owner ids and the members).
const MAX_RING_BODY: usize = 1 << 20;

/// The ring a node that does not serve yet hands its users over by: the
/// one the others act on until they adopt it, without itself.
pub fn without(ring: &Ring, me: &str) -> Arc<Ring> {
    Arc::new(Ring::new(ring.members().iter().filter(|m| m.node_id != me).cloned()))
}

/// Waits until every peer in this node's ring routes this node's slots to
/// it, then lets the node serve. Ends early when the node is fenced (its
/// next join waits again) or stops.
pub async fn serve_when_peers_agree(gw: Arc<Gateway>) {
    let incarnation = gw.incarnation();
    let started = tokio::time::Instant::now();
    loop {
        if gw.incarnation() != incarnation || gw.stop_consuming.is_cancelled() {
            return;
        }
        let ring = gw.ring();
        let me = gw.config.node_id();
        let mine = ring.slots_of(me);
        let peers: Vec<Member> = ring.members().iter().filter(|m| m.node_id != me).cloned().collect();
        let checks = peers.iter().map(|p| routes_to_me(&gw, p, &mine));
        let agreed = futures_util::future::join_all(checks).await.into_iter().all(|ok| ok);
        // The ring may have changed while the peers were asked.
        if agreed && Arc::ptr_eq(&ring, &gw.ring()) && gw.incarnation() == incarnation {
            gw.serve();
            tracing::info!(peers = peers.len(), waited = ?started.elapsed(), "every peer routes this node's slots to it: serving");
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `peer`'s ring gives every one of `slots` to this node.
async fn routes_to_me(gw: &Gateway, peer: &Member, slots: &[u16]) -> bool {
    let dial = gw.dial_urls.read().get(&peer.node_id).cloned().unwrap_or_else(|| peer.url.clone());
    let Some(hostport) = dial.strip_prefix("ws://").map(|r| r.split('/').next().unwrap_or(r).to_owned()) else {
        // No address to ask (a wss:// one without an internal URL): it
        // cannot be asked, so it is not waited for.
        return true;
    };
    let owners = match tokio::time::timeout(PEER_TIMEOUT, ring_of(&hostport)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            tracing::debug!(peer = peer.node_id, error = %format_args!("{e:#}"), "could not read its ring");
            return false;
        }
        Err(_) => return false,
    };
    let me = gw.config.node_id();
    slots.iter().all(|&s| owners.get(s as usize).is_some_and(|o| o == me))
}

/// The owner of every slot in the ring of the node at `hostport`.
async fn ring_of(hostport: &str) -> anyhow::Result<Vec<String>> {
    let stream = tokio::net::TcpStream::connect(hostport).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get("/v1/ring").header("host", hostport).body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let body = http_body_util::Limited::new(resp.into_body(), MAX_RING_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct RingBody {
        owners: Vec<String>,
    }
    Ok(serde_json::from_slice::<RingBody>(&body)?.owners)
}

/// Whether this node serves its users now.
pub fn serving(gw: &Gateway) -> bool {
    gw.serving.load(Ordering::Acquire)
}
