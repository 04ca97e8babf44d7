//! An event that reaches a user's node by a detour (re-published by a peer
//! whose ring or publisher was stale) after a newer event of that user came
//! straight, while the user's device was between nodes, still reaches the
//! device when it reconnects with `since` = the newer id.
//!
//! What the fault suite's gateway hang lost (62 of 12,860 in one run, 8 of
//! 15,960 in another): a device on the old owner got event N+1 directly,
//! N was re-published by a peer, the device was moved (4001) and
//! reconnected to its new owner with `since` = N+1 after N had arrived
//! there; N was older than `since`, so no replay had it.

mod common;

use std::time::Duration;

use common::procs::*;
use common::*;
use contract::event::HEADER_HOPS;
use contract::slot::slot_of;
use lapin::types::{AMQPValue, FieldTable};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn connect_since(addr: std::net::SocketAddr, user: &str, since: Option<&str>) -> Ws {
    let q = since.map(|s| format!("?since={s}")).unwrap_or_default();
    let mut req = format!("ws://{addr}/post/feed/posted{q}").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token_for(user)).parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("websocket connects").0
}

#[tokio::test]
async fn an_older_event_that_came_by_a_detour_while_the_device_was_away_is_in_its_replay() {
    let services = Services::shared(&unique("ring"));
    let node = GatewayProc::spawn(&services);
    node.wait_ready().await;
    let user = unique("u");
    let (older, newer) = (post(&post_id(1)), post(&post_id(2)));
    assert!(older.id < newer.id);
    // Both are in the user's feed, as the backend writes before publishing.
    let mut redis = redis_conn().await;
    let publisher = Publisher::new().await;
    for ev in [&older, &newer] {
        use contract::feedcache::{CachedPost, feed_key, post_key};
        let body = CachedPost { id: ev.id.clone(), text: ev.data.post_text.clone(), author_user_id: "a".into() };
        let mut pipe = redis::pipe();
        pipe.set(post_key(&ev.id), serde_json::to_string(&body).unwrap()).ignore();
        pipe.zadd(feed_key(&user), &ev.id, 0).ignore();
        pipe.query_async::<()>(&mut redis).await.unwrap();
    }

    // The newer one comes straight to the device.
    let mut ws = connect_since(node.addr, &user, None).await;
    publisher.publish(&[&user], &newer).await;
    assert_eq!(next_event_within(&mut ws, Duration::from_secs(10)).await.map(|e| e.id), Some(newer.id.clone()));

    // The device leaves (moved, say); meanwhile the older one arrives here
    // re-published by a peer (one hop behind it).
    ws.close(None).await.unwrap();
    drop(ws);
    let addr = node.addr;
    wait_for("the device gone", || async move { metric(addr, "gateway_connections").await == 0.0 }).await;
    let before = metric(addr, "gateway_broker_messages_total").await;
    let mut headers = FieldTable::default();
    headers.insert(HEADER_HOPS.into(), AMQPValue::LongLongInt(1));
    let body = contract::event::encode(&[user.as_str()], &older);
    publisher.publish_with_headers(slot_of(&user), &body, headers).await;
    wait_for("the detour consumed", || async move { metric(addr, "gateway_broker_messages_total").await > before })
        .await;

    // Back with `since` = the newer id: the older one is in the replay.
    let mut ws = connect_since(node.addr, &user, Some(&newer.id)).await;
    let got = next_event_within(&mut ws, Duration::from_secs(5)).await.map(|e| e.id);
    assert_eq!(got, Some(older.id.clone()), "the detoured older event reaches the device");
}
