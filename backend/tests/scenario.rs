//! The product's main path, end to end: two users register, B follows A,
//! B's two devices connect to a gateway with B's token, A posts, and the
//! post reaches both devices at once and B's feed.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn a_post_reaches_every_device_of_a_follower_and_their_feed() {
    let backend = TestBackend::start(|_| {}).await;
    let gateway = TestGateway::start(&backend.backend.config.membership_key).await;
    let api = backend.client();

    let (alice, alice_token) = api.user("Alice").await;
    let (bob, bob_token) = api.user("Bob").await;
    let (_carol, carol_token) = api.user("Carol").await;
    api.follow(&bob_token, &alice).await;

    let mut phone = gateway.connect(&bob_token).await;
    let mut laptop = gateway.connect(&bob_token).await;
    // Carol follows nobody: she must get nothing.
    let mut carols = gateway.connect(&carol_token).await;

    let started = Instant::now();
    let post_id = api.post(&alice_token, "hello from Alice").await;
    let on_phone = next_event(&mut phone).await;
    let on_laptop = next_event(&mut laptop).await;
    let latency = started.elapsed();
    for ev in [&on_phone, &on_laptop] {
        assert_eq!(ev.kind, "post");
        assert_eq!(ev.id, post_id);
        assert_eq!(ev.data.post_id, post_id);
        assert_eq!(ev.data.post_text, "hello from Alice");
        assert_eq!(ev.data.author_user_id, alice);
    }
    eprintln!("post create to both devices: {latency:?}");
    assert!(latency < Duration::from_secs(2), "delivery took {latency:?}");

    let feed = api.feed(&bob_token, 0, 10).await;
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0]["id"], post_id.as_str());
    assert_eq!(feed[0]["text"], "hello from Alice");
    assert_eq!(feed[0]["author_user_id"], alice.as_str());
    // Served from the cache the fan-out wrote.
    let mut redis = backend.redis().await;
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg(format!("feed:{bob}")).arg(&post_id).query_async(&mut redis).await.unwrap();
    assert_eq!(score, Some(0.0));

    use futures_util::StreamExt;
    let nothing = tokio::time::timeout(Duration::from_millis(300), carols.next()).await;
    assert!(nothing.is_err(), "a non-follower got {nothing:?}");
    assert!(api.feed(&carol_token, 0, 10).await.is_empty());

    gateway.stop().await;
    backend.stop().await;
}
