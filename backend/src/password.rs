//! Password hashes: argon2id in PHC string form, computed off the async
//! threads and bounded in how many run at once.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};

/// Hashes computed at once. Each takes the configured memory (19 MiB by
/// default) and a core for tens of ms: more than a few only queue up in
/// the blocking pool and eat memory.
pub const MAX_CONCURRENT_HASHES: usize = 4;

pub struct Passwords {
    params: Params,
    permits: Semaphore,
}

impl Passwords {
    pub fn new(params: Params) -> Passwords {
        Passwords { params, permits: Semaphore::new(MAX_CONCURRENT_HASHES) }
    }

    /// The PHC string of a new hash of `password`.
    pub async fn hash(&self, password: String) -> ApiResult<String> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("argon2: {e}")))
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
    }

    /// True if `password` matches the stored hash. The cost parameters are
    /// read from the hash, so hashes made with other settings still verify.
    pub async fn verify(&self, password: String, phc: String) -> ApiResult<bool> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let parsed =
                PasswordHash::new(&phc).map_err(|e| ApiError::Internal(anyhow::anyhow!("stored hash: {e}")))?;
            Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_verifies_only_its_password() {
        let p = Passwords::new(Params::new(64, 1, 1, None).unwrap());
        let h = p.hash("secret".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(p.verify("secret".into(), h.clone()).await.unwrap());
        assert!(!p.verify("Secret".into(), h).await.unwrap());
    }
}
