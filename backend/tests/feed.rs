//! The feed: pagination, unfollow, delete, update, and rebuilding a cold
//! or partial cache from PostgreSQL.

mod common;

use common::*;

#[tokio::test]
async fn feed_pages_newest_first() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (author, author_token) = api.user("Writer").await;
    let (_reader, reader_token) = api.user("Reader").await;
    api.follow(&reader_token, &author).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(api.post(&author_token, &format!("post number {i}")).await);
    }
    ids.reverse();

    let mut seen = Vec::new();
    for offset in [0, 10, 20] {
        seen.extend(api.feed_ids(&reader_token, offset, 10).await);
    }
    assert_eq!(seen, ids);
    assert_eq!(api.feed_ids(&reader_token, 20, 10).await.len(), 5);
    assert!(api.feed_ids(&reader_token, 30, 10).await.is_empty());
    // Default page is 10.
    let r = api.call("GET", "/post/feed", Some(&reader_token), None).await;
    assert_eq!(r.json().as_array().unwrap().len(), 10);
    let first = &api.feed(&reader_token, 0, 1).await[0];
    assert_eq!(first["text"], "post number 24");
    backend.stop().await;
}

#[tokio::test]
async fn unfollow_removes_the_authors_posts_and_keeps_the_others() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (a, a_token) = api.user("A").await;
    let (c, c_token) = api.user("C").await;
    let (_b, b_token) = api.user("B").await;
    api.follow(&b_token, &a).await;
    api.follow(&b_token, &c).await;
    let pa = api.post(&a_token, "by a").await;
    let pc = api.post(&c_token, "by c").await;
    wait_for("both posts in the feed", || async {
        api.feed_ids(&b_token, 0, 10).await == vec![pc.clone(), pa.clone()]
    })
    .await;

    api.unfollow(&b_token, &a).await;
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![pc.clone()]);
    // Following again brings A's posts back.
    api.follow(&b_token, &a).await;
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![pc, pa]);
    backend.stop().await;
}

#[tokio::test]
async fn deleted_post_leaves_followers_feeds_and_updates_show() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (a, a_token) = api.user("A").await;
    let (b, b_token) = api.user("B").await;
    api.follow(&b_token, &a).await;
    let keep = api.post(&a_token, "keep me").await;
    let gone = api.post(&a_token, "delete me").await;
    let feed_key = format!("feed:{b}");
    let mut redis = backend.redis().await;
    // Warm the cache and let the fan-out write into it.
    wait_for("post in the cached feed", || {
        let mut redis = redis.clone();
        let (feed_key, gone) = (feed_key.clone(), gone.clone());
        async move {
            let s: Option<f64> = redis::cmd("ZSCORE").arg(&feed_key).arg(&gone).query_async(&mut redis).await.unwrap();
            s.is_some()
        }
    })
    .await;
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![gone.clone(), keep.clone()]);

    // Only the author may delete or update.
    let r = api.call("PUT", &format!("/post/delete/{gone}"), Some(&b_token), None).await;
    assert_eq!(r.status, 404);
    let r = api.call("PUT", &format!("/post/delete/{gone}"), Some(&a_token), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![keep.clone()]);
    assert_eq!(api.call("GET", &format!("/post/get/{gone}"), Some(&b_token), None).await.status, 404);
    wait_for("id removed from the cached feed", || {
        let mut redis = redis.clone();
        let (feed_key, gone) = (feed_key.clone(), gone.clone());
        async move {
            let s: Option<f64> = redis::cmd("ZSCORE").arg(&feed_key).arg(&gone).query_async(&mut redis).await.unwrap();
            s.is_none()
        }
    })
    .await;

    let update = serde_json::json!({"id": keep, "text": "kept, and edited"}).to_string();
    assert_eq!(api.call("PUT", "/post/update", Some(&b_token), Some(&update)).await.status, 404);
    let r = api.call("PUT", "/post/update", Some(&a_token), Some(&update)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.feed(&b_token, 0, 10).await[0]["text"], "kept, and edited");
    let r = api.call("GET", &format!("/post/get/{keep}"), Some(&b_token), None).await;
    assert_eq!(r.json(), serde_json::json!({"id": keep, "text": "kept, and edited", "author_user_id": a}));
    let _: () = redis::cmd("DEL").arg(&feed_key).query_async(&mut redis).await.unwrap();
    backend.stop().await;
}

#[tokio::test]
async fn cold_and_partial_caches_are_rebuilt_from_postgres() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (a, a_token) = api.user("A").await;
    let (b, b_token) = api.user("B").await;
    api.follow(&b_token, &a).await;
    let p1 = api.post(&a_token, "one").await;
    let p2 = api.post(&a_token, "two").await;
    wait_for("feed", || async { api.feed_ids(&b_token, 0, 10).await == vec![p2.clone(), p1.clone()] }).await;

    // Cold: the key is gone (evicted, Redis restarted).
    let mut redis = backend.redis().await;
    let _: () = redis::cmd("DEL").arg(format!("feed:{b}")).query_async(&mut redis).await.unwrap();
    let _: () = redis::cmd("DEL").arg(format!("post:{p1}")).query_async(&mut redis).await.unwrap();
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![p2.clone(), p1.clone()]);
    assert_eq!(api.feed(&b_token, 1, 1).await[0]["text"], "one");

    // Partial: the key is gone, then a fan-out writes one post into it.
    let _: () = redis::cmd("DEL").arg(format!("feed:{b}")).query_async(&mut redis).await.unwrap();
    let p3 = api.post(&a_token, "three").await;
    wait_for("fan-out wrote the partial feed", || {
        let mut redis = redis.clone();
        let (key, p3) = (format!("feed:{b}"), p3.clone());
        async move {
            let s: Option<f64> = redis::cmd("ZSCORE").arg(&key).arg(&p3).query_async(&mut redis).await.unwrap();
            s.is_some()
        }
    })
    .await;
    assert_eq!(api.feed_ids(&b_token, 0, 10).await, vec![p3, p2, p1]);
    let _: () = redis::cmd("DEL").arg(format!("feed:{b}")).query_async(&mut redis).await.unwrap();
    backend.stop().await;
}

#[tokio::test]
async fn feed_keeps_the_newest_thousand() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (a, _) = api.user("Prolific").await;
    let (b, b_token) = api.user("Reader").await;
    api.follow(&b_token, &a).await;
    // 1,005 posts straight into PostgreSQL (ids sort like UUIDv7s).
    let db = pg().await;
    db.execute(
        "INSERT INTO posts (id, author_id, text) SELECT $1 || '-' || lpad(g::text, 5, '0'), $2, 'p' || g \
         FROM generate_series(1, 1005) g",
        &[&format!("{}", uuid::Uuid::now_v7()), &a],
    )
    .await
    .unwrap();
    let first = api.feed(&b_token, 0, 1).await;
    assert_eq!(first[0]["text"], "p1005");
    let mut redis = backend.redis().await;
    let posts: usize =
        redis::cmd("ZCOUNT").arg(format!("feed:{b}")).arg(0).arg(0).query_async(&mut redis).await.unwrap();
    assert_eq!(posts, 1000);
    let last = api.feed(&b_token, 999, 10).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["text"], "p6");
    assert!(api.feed(&b_token, 1000, 10).await.is_empty());
    let _: () = redis::cmd("DEL").arg(format!("feed:{b}")).query_async(&mut redis).await.unwrap();
    backend.stop().await;
}
