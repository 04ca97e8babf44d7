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
}

/// HS256 keys and the pinned validation rules.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Tokens {
        // Only HS256: `none` and every other algorithm are refused by the
        // library when the header's alg is not in this list.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Issuer and verifiers share one host clock: no grace for expiry.
        validation.leeway = 0;
        Tokens { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
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
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            })?;
        let sub = &data.claims.sub;
        if sub.is_empty() || sub.len() > MAX_USER_ID_LEN {
            return Err(TokenError::BadSubject);
        }
        Ok(data.claims)
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

/// The token a request carries, from (in this order) `Authorization: Bearer`,
/// `X-Auth` (with or without `Bearer `), or the `token` query parameter.
pub fn from_request<'a>(headers: &'a http::HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(v) = header("authorization")
        && let Some(t) = strip_bearer(v)
    {
        return Some(t);
    }
    if let Some(v) = header("x-auth") {
        let t = strip_bearer(v).unwrap_or(v);
        if !t.is_empty() {
            return Some(t);
        }
    }
    query_param(query?, "token").filter(|t| !t.is_empty())
}

/// The raw value of a query parameter. JWTs and our ids need no
/// percent-decoding (base64url, dots, hyphens), so none is done.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
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
    }

    #[test]
    fn token_is_found_in_every_place() {
        let mut h = http::HeaderMap::new();
        assert_eq!(from_request(&h, Some("a=1&token=q")), Some("q"));
        h.insert("x-auth", "Bearer x".parse().unwrap());
        assert_eq!(from_request(&h, None), Some("x"));
        h.insert("x-auth", "y".parse().unwrap());
        assert_eq!(from_request(&h, None), Some("y"));
        h.insert("authorization", "bearer z".parse().unwrap());
        assert_eq!(from_request(&h, Some("token=q")), Some("z"));
        assert_eq!(from_request(&http::HeaderMap::new(), Some("token=")), None);
    }
}
