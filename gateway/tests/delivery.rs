//! Events published to `feed.events` reach every device of each recipient,
//! and nobody else.

mod common;

use std::time::Duration;

use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn event_reaches_every_device_of_the_recipient_and_no_one_else() {
    let node = Node::start(|_| {}).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut phone = connect(&node, &alice).await;
    let mut laptop = connect(&node, &alice).await;
    let mut other = connect(&node, &bob).await;
    let publisher = Publisher::new().await;

    let ev = post(&unique("post"));
    publisher.publish(&[&alice], &ev).await;

    assert_eq!(next_event(&mut phone).await, ev);
    assert_eq!(next_event(&mut laptop).await, ev);
    // Bob's device was connected all along; give a misdelivery time to show.
    assert_eq!(next_event_within(&mut other, Duration::from_millis(500)).await, None);

    // One message with several recipients reaches each of them.
    let ev2 = post(&unique("post"));
    publisher.publish(&[&alice, &bob], &ev2).await;
    assert_eq!(next_event(&mut phone).await, ev2);
    assert_eq!(next_event(&mut laptop).await, ev2);
    assert_eq!(next_event(&mut other).await, ev2);
}

#[tokio::test]
async fn event_bytes_are_passed_through_unchanged() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let mut ws = connect(&node, &user).await;
    // Field order and spacing that no serializer of ours would produce.
    let raw_event =
        r#"{"type":"post", "id":"p-raw","ts":1,"data":{"postText":"ü","postId":"p-raw","author_user_id":"a"}}"#;
    let body = format!(r#"{{"recipients":["{user}"],"event":{raw_event}}}"#);
    Publisher::new().await.publish_raw(contract::slot::slot_of(&user), body.as_bytes()).await;
    assert_eq!(next_text(&mut ws).await, raw_event);
}

#[tokio::test]
async fn token_is_accepted_from_x_auth_and_query_on_both_paths() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let token = token_for(&user);

    let mut req = format!("ws://{}/posts", node.addr).into_client_request().unwrap();
    req.headers_mut().insert("x-auth", token.parse().unwrap());
    let (mut by_header, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let url = format!("ws://{}/post/feed/posted?token={token}", node.addr);
    let (mut by_query, _) = tokio_tungstenite::connect_async(url).await.unwrap();

    let ev = post(&unique("post"));
    Publisher::new().await.publish(&[&user], &ev).await;
    assert_eq!(next_event(&mut by_header).await, ev);
    assert_eq!(next_event(&mut by_query).await, ev);
}

#[tokio::test]
async fn unreadable_broker_message_is_dropped_and_later_ones_still_flow() {
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let mut ws = connect(&node, &user).await;
    let publisher = Publisher::new().await;
    publisher.publish_raw(contract::slot::slot_of(&user), b"{not json").await;
    let ev = post(&unique("post"));
    publisher.publish(&[&user], &ev).await;
    assert_eq!(next_event(&mut ws).await, ev);
}

#[tokio::test]
async fn health_ready_route_and_metrics_answer() {
    let node = Node::start(|_| {}).await;
    assert_eq!(http_get(node.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(node.addr, "/readyz").await.0, 200);

    let user = unique("u");
    let mut ws = connect(&node, &user).await;
    let ev = post(&unique("post"));
    Publisher::new().await.publish(&[&user], &ev).await;
    next_event(&mut ws).await;

    let req = format!(
        "GET /v1/route HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        token_for(&user)
    );
    let (status, body) = raw_request(node.addr, &req).await;
    assert_eq!(status, 200);
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(route["user_id"], user.as_str());
    assert_eq!(route["slot"], contract::slot::slot_of(&user));
    assert_eq!(route["node_id"], node.gw.config.node_id());
    assert_eq!(route["url"], format!("ws://{}", node.addr));

    let (status, metrics) = http_get(node.addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "gateway_connections ",
        "gateway_users ",
        "gateway_connections_opened_total{result=\"ok\"}",
        "gateway_broker_messages_total ",
        "gateway_deliveries_total{result=\"sent\"}",
        "gateway_delivery_latency_seconds_bucket",
        "gateway_owned_slots 1024",
        "gateway_ring_members 1",
    ] {
        assert!(metrics.contains(name), "metric {name:?} missing from:\n{metrics}");
    }
    assert_eq!(http_get(node.addr, "/nope").await.0, 404);
}
