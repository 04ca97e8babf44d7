//! JWT: claims, HS256 issue and verification, and where a request carries
//! its token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::slot::MAX_USER_ID_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds.
    pub exp: u64,
}

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token algorithm not allowed")]
    WrongAlgorithm,
    #[error("token signature invalid")]
    BadSignature,
    #[error("token subject invalid")]
    BadSubject,
    #[error("token malformed")]
    Malformed,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token lifetime longer than allowed")]
    LifetimeTooLong,
    #[error("more than one token, and they differ")]
    Ambiguous,
}

/// How far in the future `iat` and `nbf` may lie: issuer and verifier share
/// a host clock or NTP, so a few seconds of skew, no more.
pub const CLOCK_LEEWAY_SECS: u64 = 5;
/// Longest `exp - iat` accepted unless set otherwise: the backend issues
/// 24 h tokens by default; a week leaves room for a longer setting while a
/// stolen token for "forever" is still refused.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether `id` is a user or post id of the contract: 1 to 64 bytes of
/// `[A-Za-z0-9._-]` (SPEC "Identity and auth").
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// HS256 keys and the pinned validation rules.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_lifetime: Duration,
}

/// The claims as signed, with the optional `nbf` checked here too.
#[derive(Deserialize)]
struct Signed {
    sub: String,
    iat: u64,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Tokens {
        // Only HS256: `none` and every other algorithm are refused by the
        // library when the header's alg is not in this list.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Issuer and verifiers share one host clock: no grace for expiry.
        validation.leeway = 0;
        // `nbf` is checked below with the leeway that `iat` gets.
        validation.validate_nbf = false;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }

    /// Refuses tokens whose `exp - iat` is longer than `max`.
    pub fn with_max_lifetime(mut self, max: Duration) -> Tokens {
        self.max_lifetime = max;
        self
    }

    /// Finds the request's one token (see [`extract`]) and verifies it.
    pub fn authenticate(&self, headers: &http::HeaderMap, query: Option<&str>) -> Result<Claims, TokenError> {
        self.verify(extract(headers, query)?)
    }

    /// Issues a token for `user_id`, valid for `ttl`.
    pub fn issue(&self, user_id: &str, ttl: Duration) -> String {
        let iat = unix_now();
        let claims = Claims { sub: user_id.to_owned(), iat, exp: iat + ttl.as_secs() };
        self.encode(&claims)
    }

    /// Signs arbitrary claims (tests use it for expired tokens).
    pub fn encode(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding).expect("HS256 signing cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        // jsonwebtoken cannot name algorithms it does not know (`none`), so
        // read the header's alg first to tell the client what was wrong.
        if let Some(alg) = header_alg(token)
            && alg != "HS256"
        {
            return Err(TokenError::WrongAlgorithm);
        }
        let data =
            jsonwebtoken::decode::<Signed>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            })?;
        let Signed { sub, iat, exp, nbf } = data.claims;
        if !is_valid_id(&sub) {
            return Err(TokenError::BadSubject);
        }
        let latest = unix_now() + CLOCK_LEEWAY_SECS;
        if iat > latest || nbf.is_some_and(|n| n > latest) {
            return Err(TokenError::NotYetValid);
        }
        if exp.saturating_sub(iat) > self.max_lifetime.as_secs() {
            return Err(TokenError::LifetimeTooLong);
        }
        Ok(Claims { sub, iat, exp })
    }
}

/// The `alg` of a token's header, if the header is readable JSON.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let (header, _) = token.split_once('.')?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    #[derive(Deserialize)]
    struct H {
        alg: String,
    }
    serde_json::from_slice::<H>(&bytes).ok().map(|h| h.alg)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The token a request carries in `Authorization: Bearer`, `X-Auth` (with
/// or without `Bearer `) or the `token` query parameter. Several copies
/// (in different places or one place repeated) are refused unless they are
/// byte-identical: otherwise which one "wins" would depend on this
/// function's order, and a proxy in front that adds or checks one of them
/// could be made to authorize a different user than the gateway does.
pub fn extract<'a>(headers: &'a http::HeaderMap, query: Option<&'a str>) -> Result<&'a str, TokenError> {
    let values = |name: &'static str| headers.get_all(name).into_iter().map(|v| v.to_str().map(str::trim));
    let mut found: Option<&str> = None;
    let mut add = |t: &'a str| match found {
        Some(f) if f != t => Err(TokenError::Ambiguous),
        _ => {
            found = Some(t);
            Ok(())
        }
    };
    for v in values("authorization") {
        // A header that is not text cannot be compared: refuse rather
        // than skip it. Other schemes (Basic) carry no token.
        if let Some(t) = strip_bearer(v.map_err(|_| TokenError::Malformed)?) {
            add(t)?;
        }
    }
    for v in values("x-auth") {
        let v = v.map_err(|_| TokenError::Malformed)?;
        let t = strip_bearer(v).unwrap_or(v);
        if !t.is_empty() {
            add(t)?;
        }
    }
    for t in query.into_iter().flat_map(|q| query_params(q, "token")) {
        if !t.is_empty() {
            add(t)?;
        }
    }
    found.ok_or(TokenError::Missing)
}

/// [`extract`], for callers that only need the token: `None` when there is
/// none or when the request is ambiguous.
pub fn from_request<'a>(headers: &'a http::HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    extract(headers, query).ok()
}

/// Every value of a query parameter, in order.
pub fn query_params<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The raw value of a query parameter. JWTs and our ids need no
/// percent-decoding (base64url, dots, hyphens), so none is done.
pub fn query_param<'a>(query: &'a str, name: &'a str) -> Option<&'a str> {
    query_params(query, name).next()
}

fn strip_bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    #[test]
    fn issued_tokens_verify() {
        let t = Tokens::new(SECRET);
        let claims = t.verify(&t.issue("u1", Duration::from_secs(60))).unwrap();
        assert_eq!(claims.sub, "u1");
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let t = Tokens::new(SECRET);
        let now = unix_now();
        let expired = t.encode(&Claims { sub: "u".into(), iat: now - 100, exp: now - 10 });
        assert_eq!(t.verify(&expired), Err(TokenError::Expired));
        let other = Tokens::new(b"other").issue("u", Duration::from_secs(60));
        assert_eq!(t.verify(&other), Err(TokenError::BadSignature));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiaWF0IjoxLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(t.verify(none), Err(TokenError::WrongAlgorithm));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims { sub: "u".into(), iat: now, exp: now + 60 },
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(t.verify(&hs512), Err(TokenError::WrongAlgorithm));
        assert_eq!(t.verify("garbage"), Err(TokenError::Malformed));
        let long = t.issue(&"x".repeat(65), Duration::from_secs(60));
        assert_eq!(t.verify(&long), Err(TokenError::BadSubject));
        for sub in ["", "a/b", "a|b", "a\nb", "a b", "é", "a\u{0}"] {
            assert_eq!(t.verify(&t.issue(sub, Duration::from_secs(60))), Err(TokenError::BadSubject), "{sub:?}");
        }
        assert!(t.verify(&t.issue("0193a-b_c.D", Duration::from_secs(60))).is_ok());
    }

    fn signed(t: &Tokens, claims: serde_json::Value) -> String {
        let _ = t;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn future_and_overlong_tokens_are_refused() {
        let t = Tokens::new(SECRET).with_max_lifetime(Duration::from_secs(3600));
        let now = unix_now();
        let ok = |c| t.verify(&signed(&t, c));
        assert!(ok(serde_json::json!({"sub": "u", "iat": now, "exp": now + 3600})).is_ok());
        // A little skew is fine; more is not.
        assert!(ok(serde_json::json!({"sub": "u", "iat": now + 2, "exp": now + 60})).is_ok());
        assert_eq!(
            ok(serde_json::json!({"sub": "u", "iat": now + 60, "exp": now + 120})),
            Err(TokenError::NotYetValid)
        );
        let nbf = serde_json::json!({"sub": "u", "iat": now, "nbf": now + 60, "exp": now + 120});
        assert_eq!(ok(nbf), Err(TokenError::NotYetValid));
        assert!(ok(serde_json::json!({"sub": "u", "iat": now, "nbf": now, "exp": now + 120})).is_ok());
        let long = serde_json::json!({"sub": "u", "iat": now, "exp": now + 3601});
        assert_eq!(ok(long), Err(TokenError::LifetimeTooLong));
        let old_iat = serde_json::json!({"sub": "u", "iat": now - 7200, "exp": now + 60});
        assert_eq!(ok(old_iat), Err(TokenError::LifetimeTooLong));
        assert_eq!(ok(serde_json::json!({"sub": "u", "exp": now + 60})), Err(TokenError::Malformed), "iat required");
    }

    #[test]
    fn two_different_tokens_are_ambiguous_in_any_combination() {
        let hv = |v: &str| http::HeaderValue::from_str(v).unwrap();
        let with = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, hv(v));
            }
            h
        };
        let cases: [(http::HeaderMap, Option<&str>); 6] = [
            (with(&[("authorization", "Bearer a"), ("x-auth", "b")]), None),
            (with(&[("authorization", "Bearer a")]), Some("token=b")),
            (with(&[("x-auth", "Bearer a")]), Some("token=b")),
            (with(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]), None),
            (with(&[("x-auth", "a"), ("x-auth", "b")]), None),
            (http::HeaderMap::new(), Some("token=a&x=1&token=b")),
        ];
        for (h, q) in &cases {
            assert_eq!(extract(h, *q), Err(TokenError::Ambiguous), "{h:?} {q:?}");
        }
        // Identical copies are one token.
        let same = with(&[("authorization", "Bearer a"), ("x-auth", "Bearer a"), ("x-auth", "a")]);
        assert_eq!(extract(&same, Some("token=a&token=a")), Ok("a"));
        assert_eq!(extract(&with(&[("authorization", "Basic dTpw")]), Some("token=a")), Ok("a"));
    }

    #[test]
    fn token_is_found_in_every_place() {
        let mut h = http::HeaderMap::new();
        assert_eq!(from_request(&h, Some("a=1&token=q")), Some("q"));
        h.insert("x-auth", "Bearer x".parse().unwrap());
        assert_eq!(from_request(&h, None), Some("x"));
        h.insert("x-auth", "y".parse().unwrap());
        assert_eq!(from_request(&h, None), Some("y"));
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "bearer z".parse().unwrap());
        assert_eq!(extract(&h, None), Ok("z"));
        assert_eq!(extract(&http::HeaderMap::new(), Some("token=")), Err(TokenError::Missing));
    }
}
