//! Failed logins are throttled per account and per client address (429
//! with `Retry-After`), before any password is hashed: a flood of guesses
//! against one account neither gets through nor slows other users' logins.

mod common;

use std::net::IpAddr;
use std::time::Instant;

use common::*;
use serde_json::json;

/// The attacker and the legitimate users come from different addresses.
fn attacker() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}
fn user_addr(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 1, i])
}

async fn register(api: &Client, name: &str, password: &str) -> String {
    let body = json!({"first_name": name, "second_name": "T", "birthdate": "1990-01-01", "password": password});
    let r = api.call("POST", "/user/register", None, Some(&body.to_string())).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["user_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_guessing_flood_on_one_account_is_throttled_and_other_logins_stay_fast() {
    // Real argon2 cost, so that hashing is what a flood would exhaust.
    let backend = TestBackend::start(|c| {
        c.argon2_memory_kib = 19_456;
        c.argon2_iterations = 2;
    })
    .await;
    let api = backend.client();
    let victim = register(&api, "Victim", "correct horse").await;
    let other = register(&api, "Other", "battery staple").await;

    // A baseline login of the other user, alone.
    let login = json!({"id": other, "password": "battery staple"}).to_string();
    let t = Instant::now();
    assert_eq!(api.post_from(user_addr(1), "/login", &login).await.status, 200);
    let alone = t.elapsed();

    // 8 concurrent guessers, 25 guesses each.
    let flood_started = Instant::now();
    let flood = (0..8).map(|g| {
        let victim = victim.clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..25 {
                let guess = json!({"id": victim, "password": format!("guess {g}-{i}")}).to_string();
                let r = api.post_from(attacker(), "/login", &guess).await;
                answers.push((r.status, r.headers.get("retry-after").cloned()));
            }
            answers
        })
    });
    let flood: Vec<_> = flood.collect();
    // Meanwhile, the other user logs in from their own address.
    let mut during = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let r = api.post_from(user_addr(2 + i), "/login", &login).await;
        assert_eq!(r.status, 200, "{r:?}");
        during.push(t.elapsed());
    }
    let mut answers = Vec::new();
    for f in flood {
        answers.extend(f.await.unwrap());
    }
    let flood_took = flood_started.elapsed();
    let hashed = answers.iter().filter(|(s, _)| *s == 400).count();
    let throttled: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    eprintln!(
        "200 guesses in {flood_took:?}: {hashed} checked (400), {} throttled (429); other user's login alone {alone:?}, \
         during the flood {during:?}",
        throttled.len()
    );
    assert_eq!(hashed + throttled.len(), answers.len(), "only 400 or 429: {answers:?}");
    // The burst, and one more per refill period the flood lasted.
    let allowed = backend::throttle::ACCOUNT_BURST as usize
        + (flood_took.as_secs_f64() / backend::throttle::ACCOUNT_REFILL.as_secs_f64()).ceil() as usize;
    assert!(hashed <= allowed, "the flood got {hashed} guesses checked in {flood_took:?}");
    assert!(
        throttled.iter().all(|(_, ra)| ra.as_ref().is_some_and(|v| v.to_str().unwrap().parse::<u64>().unwrap() >= 1))
    );
    backend.stop().await;
}

#[tokio::test]
async fn one_address_is_throttled_on_failures_only_and_the_setting_turns_it_off() {
    for per_address in [true, false] {
        let backend = TestBackend::start(|c| c.login_throttle_per_address = per_address).await;
        let api = backend.client();
        let id = register(&api, "Many", "pw").await;
        // Many successful logins from one address (a load test) are fine.
        let ok = json!({"id": id, "password": "pw"}).to_string();
        for _ in 0..30 {
            assert_eq!(api.post_from(attacker(), "/login", &ok).await.status, 200);
        }
        // Failures against many accounts (unknown ids) from one address.
        let mut statuses = Vec::new();
        let started = Instant::now();
        for i in 0..40 {
            let probe = json!({"id": unique(&format!("nobody{i}")), "password": "x"}).to_string();
            statuses.push(api.post_from(attacker(), "/login", &probe).await.status);
        }
        let took = started.elapsed();
        let throttled = statuses.iter().filter(|&&s| s == 429).count();
        eprintln!("per address {per_address}: {throttled} of 40 probes throttled in {took:?}");
        if per_address {
            // The burst, and one more per refill period the probes lasted.
            let allowed = backend::throttle::ADDRESS_BURST as usize
                + (took.as_secs_f64() / backend::throttle::ADDRESS_REFILL.as_secs_f64()).ceil() as usize;
            assert!(statuses[..20].iter().all(|&s| s == 404), "{statuses:?}");
            assert!(statuses.iter().all(|&s| s == 404 || s == 429), "{statuses:?}");
            assert!(40 - throttled <= allowed && throttled > 0, "{statuses:?} in {took:?}");
            // Another address is not affected.
            assert_eq!(api.post_from(user_addr(1), "/login", &ok).await.status, 200);
        } else {
            assert!(statuses.iter().all(|&s| s == 404), "{statuses:?}");
        }
        backend.stop().await;
    }
}
