//! The rest of the API: users, search, dialogs, auth, errors, and the
//! operational routes. Bad input gets a clear 4xx and stores nothing.

mod common;

use common::*;
use serde_json::json;

/// Asserts an error answer: status, the SPEC body, and a message that
/// mentions `needle`.
fn assert_error(r: &Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    let message = body["message"].as_str().unwrap_or_else(|| panic!("no message in {body}"));
    assert!(message.contains(needle), "message {message:?} does not mention {needle:?}");
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["code"].as_str().is_some(), "{body}");
}

async fn users_named(first_name: &str) -> i64 {
    pg().await.query_one("SELECT count(*) FROM users WHERE first_name = $1", &[&first_name]).await.unwrap().get(0)
}

#[tokio::test]
async fn register_rejects_bad_input_and_stores_nothing() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let name = unique("Bad");
    let good = json!({"first_name": name, "second_name": "X", "birthdate": "1990-01-02", "biography": "", "city": "", "password": "pw"});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = good.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("{\"first_name\": ".into(), "JSON"),
        ("[1, 2]".into(), "invalid type"),
        (without("password"), "password"),
        (without("birthdate"), "birthdate"),
        (with("first_name", json!("x".repeat(101))), "first_name is too long"),
        (with("first_name", json!("   ")), "first_name must not be empty"),
        (with("birthdate", json!("1990-02-30")), "birthdate"),
        (with("birthdate", json!(19900101)), "birthdate"),
        (with("password", json!("")), "password"),
        (with("password", json!("p".repeat(129))), "password is too long"),
        (with("biography", json!("b".repeat(2001))), "biography is too long"),
    ];
    for (body, needle) in cases {
        let r = api.call("POST", "/user/register", None, Some(&body)).await;
        assert_error(&r, 400, needle);
    }
    let r = api
        .call_with("POST", "/user/register", Some(&good.to_string()), |b| b.header("content-type", "text/plain"))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(users_named(&name).await, 0, "nothing stored");
    let r = api.call("POST", "/user/register", None, Some(&good.to_string())).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(users_named(&name).await, 1);
    backend.stop().await;
}

#[tokio::test]
async fn login_get_and_search() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let first = unique("Zed");
    let body = json!({"first_name": first, "second_name": "Zulu", "birthdate": "2000-02-29", "biography": "bio", "city": "Town", "password": "right"});
    let id = api.call("POST", "/user/register", None, Some(&body.to_string())).await.json()["user_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID");

    let r = api.call("POST", "/login", None, Some(&json!({"id": id, "password": "wrong"}).to_string())).await;
    assert_error(&r, 400, "wrong password");
    let r = api.call("POST", "/login", None, Some(&json!({"id": unique("nobody"), "password": "x"}).to_string())).await;
    assert_error(&r, 404, "user not found");
    let r = api.call("POST", "/login", None, Some(&json!({"id": id}).to_string())).await;
    assert_error(&r, 400, "password");
    let r = api.call("POST", "/login", None, Some(&json!({"id": id, "password": "right"}).to_string())).await;
    assert_eq!(r.status, 200);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let claims = contract::token::Tokens::new(SECRET.as_bytes()).verify(&token).unwrap();
    assert_eq!(claims.sub, id);

    let r = api.call("GET", &format!("/user/get/{id}"), Some(&token), None).await;
    assert_eq!(
        r.json(),
        json!({"id": id, "first_name": first, "second_name": "Zulu", "birthdate": "2000-02-29", "biography": "bio", "city": "Town"})
    );
    assert!(!r.body.contains("password"));
    let r = api.call("GET", &format!("/user/get/{}", unique("nobody")), Some(&token), None).await;
    assert_error(&r, 404, "not found");
    let r = api.call("GET", &format!("/user/get/{}", "x".repeat(65)), Some(&token), None).await;
    assert_error(&r, 400, "id");

    // Prefix search, with LIKE wildcards taken literally.
    let prefix = &first[..first.len() - 3];
    let r = api.call("GET", &format!("/user/search?first_name={prefix}&last_name=Zu"), Some(&token), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let found = r.json();
    assert!(found.as_array().unwrap().iter().any(|u| u["id"] == id.as_str()), "{found}");
    let r = api.call("GET", &format!("/user/search?first_name={prefix}&last_name=Zx"), Some(&token), None).await;
    assert!(r.json().as_array().unwrap().is_empty());
    let r = api.call("GET", "/user/search?first_name=%25&last_name=%25", Some(&token), None).await;
    assert!(r.json().as_array().unwrap().iter().all(|u| u["first_name"].as_str().unwrap().starts_with('%')));
    let r = api.call("GET", "/user/search", Some(&token), None).await;
    assert_error(&r, 400, "first_name");
    backend.stop().await;
}

#[tokio::test]
async fn auth_is_required_and_taken_from_every_place() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (_id, token) = api.user("Auth").await;
    let r = api.call("GET", "/post/feed", None, None).await;
    assert_error(&r, 401, "missing token");
    let r = api.call("GET", "/post/feed", Some("garbage"), None).await;
    assert_error(&r, 401, "malformed");
    let other =
        contract::token::Tokens::new(b"another-secret-0123456789").issue("u", std::time::Duration::from_secs(60));
    assert_error(&api.call("GET", "/post/feed", Some(&other), None).await, 401, "signature");
    let r = api.call_with("GET", "/post/feed", None, |b| b.header("x-auth", token.as_str())).await;
    assert_eq!(r.status, 200);
    let r = api.call("GET", &format!("/post/feed?token={token}"), None, None).await;
    assert_eq!(r.status, 200);
    let r = api.call("POST", "/post/create", None, Some(r#"{"text":"x"}"#)).await;
    assert_eq!(r.status, 401);
    backend.stop().await;
}

#[tokio::test]
async fn posts_friends_and_dialogs_reject_bad_input() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (me, token) = api.user("Me").await;
    let (you, you_token) = api.user("You").await;
    let posts_by_me = || async {
        let n: i64 =
            pg().await.query_one("SELECT count(*) FROM posts WHERE author_id = $1", &[&me]).await.unwrap().get(0);
        n
    };

    assert_error(&api.call("POST", "/post/create", Some(&token), Some("{oops")).await, 400, "JSON");
    assert_error(&api.call("POST", "/post/create", Some(&token), Some("{}")).await, 400, "text");
    assert_error(
        &api.call("POST", "/post/create", Some(&token), Some(r#"{"text":""}"#)).await,
        400,
        "text must not be empty",
    );
    let long = json!({"text": "é".repeat(5001)}).to_string();
    assert_error(&api.call("POST", "/post/create", Some(&token), Some(&long)).await, 400, "text is too long");
    let huge = json!({"text": "x".repeat(100_000)}).to_string();
    assert_eq!(api.call("POST", "/post/create", Some(&token), Some(&huge)).await.status, 413);
    assert_eq!(posts_by_me().await, 0, "nothing stored");
    let ok = json!({"text": "é".repeat(5000)}).to_string();
    let r = api.call("POST", "/post/create", Some(&token), Some(&ok)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(posts_by_me().await, 1);

    let nobody = unique("nobody");
    assert_error(&api.call("GET", &format!("/post/get/{nobody}"), Some(&token), None).await, 404, "post not found");
    let upd = json!({"id": nobody, "text": "x"}).to_string();
    assert_error(&api.call("PUT", "/post/update", Some(&token), Some(&upd)).await, 404, "post not found");
    assert_error(&api.call("PUT", &format!("/post/delete/{nobody}"), Some(&token), None).await, 404, "post not found");
    assert_error(&api.call("PUT", &format!("/friend/set/{nobody}"), Some(&token), None).await, 404, "user not found");
    assert_error(&api.call("PUT", &format!("/friend/set/{me}"), Some(&token), None).await, 400, "themselves");
    assert_error(&api.call("GET", "/post/feed?limit=0", Some(&token), None).await, 400, "limit");
    assert_error(&api.call("GET", "/post/feed?limit=101", Some(&token), None).await, 400, "limit");
    assert_error(&api.call("GET", "/post/feed?offset=-1", Some(&token), None).await, 400, "offset");
    let follows: i64 =
        pg().await.query_one("SELECT count(*) FROM follows WHERE follower_id = $1", &[&me]).await.unwrap().get(0);
    assert_eq!(follows, 0);

    // Dialogs.
    let send = |to: String, body: String| {
        let token = token.clone();
        async move { api.call("POST", &format!("/dialog/{to}/send"), Some(&token), Some(&body)).await }
    };
    assert_error(&send(nobody.clone(), r#"{"text":"hi"}"#.into()).await, 404, "user not found");
    assert_error(&send(you.clone(), r#"{"text":""}"#.into()).await, 400, "text");
    assert_error(&send(you.clone(), json!({"text": "m".repeat(4097)}).to_string()).await, 400, "too long");
    assert_eq!(send(you.clone(), r#"{"text":"hi you"}"#.into()).await.status, 200);
    let r = api.call("POST", &format!("/dialog/{me}/send"), Some(&you_token), Some(r#"{"text":"hi me"}"#)).await;
    assert_eq!(r.status, 200);
    let r = api.call("GET", &format!("/dialog/{you}/list"), Some(&token), None).await;
    assert_eq!(r.json(), json!([{"from": me, "to": you, "text": "hi you"}, {"from": you, "to": me, "text": "hi me"}]));
    let r = api.call("GET", &format!("/dialog/{me}/list"), Some(&you_token), None).await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    backend.stop().await;
}

#[tokio::test]
async fn operational_routes_answer() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    assert_eq!(api.call("GET", "/healthz", None, None).await.status, 200);
    assert_eq!(api.call("GET", "/readyz", None, None).await.status, 200);
    let r = api.call("GET", "/nope", None, None).await;
    assert_error(&r, 404, "no such route");
    let r = api.call_with("GET", "/nope", None, |b| b.header("x-request-id", "my-req-1")).await;
    assert_eq!(r.json()["request_id"], "my-req-1");
    assert_eq!(r.headers["x-request-id"], "my-req-1");

    let spec = api.call("GET", "/openapi.json", None, None).await.json();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/user/register", "/login", "/post/create", "/post/feed", "/dialog/{user_id}/send"] {
        assert!(spec["paths"][path].is_object(), "{path} missing from the OpenAPI description");
    }

    api.user("Metrics").await;
    let m = api.call("GET", "/metrics", None, None).await.body;
    for name in [
        "backend_http_requests_total{method=\"POST\",route=\"/user/register\",status=\"200\"}",
        "backend_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}",
        "backend_http_request_duration_seconds_bucket",
        "backend_events_published_total",
        "backend_fanout_recipients_total",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    backend.stop().await;
}

#[tokio::test]
async fn nul_and_control_characters_are_400s_naming_the_field() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (me, token) = api.user("Nul").await;
    let reg = json!({"first_name": "A\u{0}B", "second_name": "X", "birthdate": "1990-01-02", "password": "pw"});
    assert_error(&api.call("POST", "/user/register", None, Some(&reg.to_string())).await, 400, "first_name");
    let reg =
        json!({"first_name": "A", "second_name": "X", "birthdate": "1990-01-02", "city": "\u{7}", "password": "pw"});
    assert_error(&api.call("POST", "/user/register", None, Some(&reg.to_string())).await, 400, "city");
    let post = json!({"text": "a\u{0}b"}).to_string();
    assert_error(&api.call("POST", "/post/create", Some(&token), Some(&post)).await, 400, "text");
    let upd = json!({"id": "x\u{0}", "text": "ok"}).to_string();
    assert_error(&api.call("PUT", "/post/update", Some(&token), Some(&upd)).await, 400, "id");
    assert_error(&api.call("GET", "/post/get/a%00b", Some(&token), None).await, 400, "id");
    assert_error(&api.call("GET", "/user/get/a%00b", Some(&token), None).await, 400, "id");
    assert_error(&api.call("PUT", "/friend/set/a%00b", Some(&token), None).await, 400, "user_id");
    assert_error(&api.call("GET", "/user/search?first_name=a%00", Some(&token), None).await, 400, "first_name");
    let login = json!({"id": format!("{me}\u{0}"), "password": "pa55word"}).to_string();
    assert_error(&api.call("POST", "/login", None, Some(&login)).await, 400, "id");
    let (you, _) = api.user("You").await;
    let msg = json!({"text": "hi\u{0}"}).to_string();
    assert_error(&api.call("POST", &format!("/dialog/{you}/send"), Some(&token), Some(&msg)).await, 400, "text");
    // Line breaks and tabs are text.
    let ok = json!({"text": "two\nlines\tok"}).to_string();
    assert_eq!(api.call("POST", "/post/create", Some(&token), Some(&ok)).await.status, 200);
    let m = api.call("GET", "/metrics", None, None).await.body;
    assert!(!m.contains("status=\"500\""), "no 500s:\n{m}");
    backend.stop().await;
}

#[tokio::test]
async fn a_token_for_a_user_that_does_not_exist_is_401_never_500() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (real, _) = api.user("Real").await;
    let ghost =
        contract::token::Tokens::new(SECRET.as_bytes()).issue(&unique("ghost"), std::time::Duration::from_secs(60));
    let post = json!({"text": "boo"}).to_string();
    assert_error(&api.call("POST", "/post/create", Some(&ghost), Some(&post)).await, 401, "does not exist");
    assert_error(&api.call("PUT", &format!("/friend/set/{real}"), Some(&ghost), None).await, 401, "does not exist");
    let msg = json!({"text": "boo"}).to_string();
    assert_error(
        &api.call("POST", &format!("/dialog/{real}/send"), Some(&ghost), Some(&msg)).await,
        401,
        "does not exist",
    );
    // Reads of a ghost's own data are simply empty.
    assert_eq!(api.call("GET", "/post/feed", Some(&ghost), None).await.status, 200);
    let m = api.call("GET", "/metrics", None, None).await.body;
    assert!(!m.contains("status=\"500\""), "no 500s:\n{m}");
    backend.stop().await;
}

#[tokio::test]
async fn made_up_methods_are_one_label_value() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    // Pipelined on one connection, each a method of its own.
    let mut s = tokio::net::TcpStream::connect(backend.addr).await.unwrap();
    let mut reqs = String::new();
    for i in 0..200 {
        reqs.push_str(&format!("MADEUP{i} /healthz HTTP/1.1\r\nhost: x\r\n\r\n"));
    }
    reqs.push_str("GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(reqs.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.unwrap().unwrap();
    let answers = String::from_utf8_lossy(&out).matches("HTTP/1.1 ").count();
    assert_eq!(answers, 201);
    let m = api.call("GET", "/metrics", None, None).await.body;
    let methods: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("backend_http_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    eprintln!("method labels after 200 made-up methods: {methods:?}");
    assert!(methods.contains("other"), "{methods:?}");
    assert!(methods.iter().all(|m| ["GET", "POST", "PUT", "other"].contains(m)), "{methods:?}");
    backend.stop().await;
}
