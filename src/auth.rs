//! Client keys: `Authorization: Bearer <key>`, looked up by SHA-256 among the configured users.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::config::User;

/// Why a request carries no valid key. Messages never echo the key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("malformed Authorization header: expected `Bearer <key>`")]
    Malformed,
    #[error("invalid API key")]
    Unknown,
}

/// The users of one config snapshot, indexed by the SHA-256 of their key.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], (usize, Arc<User>)>,
}

impl KeyTable {
    pub fn new(users: &[Arc<User>]) -> Self {
        Self { by_hash: users.iter().enumerate().map(|(i, u)| (u.key_sha256, (i, Arc::clone(u)))).collect() }
    }

    /// The user whose key the request presents, with its index in the config's users (what
    /// per-user caches are indexed by). The key is hashed before any comparison, so the lookup
    /// time does not depend on how much of a guessed key is right.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<(usize, &Arc<User>), AuthError> {
        let key = bearer(headers)?;
        let (index, user) = self.by_hash.get(&sha256(key.as_bytes())).ok_or(AuthError::Unknown)?;
        Ok((*index, user))
    }
}

/// The token of `Authorization: Bearer <token>`, exactly as sent (no trimming, no case folding
/// of the token itself).
pub fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `tollgate hash-key`: the lowercase hex SHA-256 of a key.
pub fn hash_key_hex(key: &str) -> String {
    crate::config::hex(&sha256(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_matches_sha256sum() {
        // printf %s tg-demo-cost-key | sha256sum
        assert_eq!(
            hash_key_hex("tg-demo-cost-key"),
            "be26e6eddb2b6125f7c09ac8d16d701ec340429350d996fa325bbafa50562fc3"
        );
    }

    #[test]
    fn bearer_token_is_taken_exactly() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer  padded".parse().unwrap());
        assert_eq!(bearer(&headers).unwrap(), " padded");
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&headers), Err(AuthError::Malformed)));
    }
}
