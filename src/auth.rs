//! Client keys: `Authorization: Bearer <key>`, looked up by SHA-256 among the configured users,
//! then among the API users' keys (see `tenancy`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::config::User;
use crate::tenancy::Principal;

/// Why a request carries no valid key. Messages never echo the key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("malformed Authorization header: expected `Bearer <key>`")]
    Malformed,
    #[error("invalid API key")]
    Unknown,
    /// The key's user is on a plan the running config no longer has.
    #[error("this key's plan `{0}` is not in the gateway's config; ask the operator")]
    PlanGone(String),
    /// The tenant store could not be read (the message is logged, not returned).
    #[error("the tenant store is unavailable")]
    Unavailable(String),
}

/// The config users of one snapshot as principals, indexed by the SHA-256 of their key.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
}

impl KeyTable {
    pub fn new(users: &[Arc<User>]) -> Self {
        Self {
            by_hash: users.iter().map(|u| (u.key_sha256, Arc::new(Principal::of_config_user(Arc::clone(u))))).collect(),
        }
    }

    /// The config user whose key hashes to `sha256`.
    pub fn get(&self, sha256: &[u8; 32]) -> Option<&Arc<Principal>> {
        self.by_hash.get(sha256)
    }

    pub fn principals(&self) -> impl Iterator<Item = &Arc<Principal>> {
        self.by_hash.values()
    }

    /// The config user named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Principal>> {
        self.by_hash.values().find(|p| p.user.name == name)
    }
}

/// The SHA-256 of the request's bearer key. Keys are hashed before any comparison, so the
/// lookup time does not depend on how much of a guessed key is right.
pub fn presented(headers: &HeaderMap) -> Result<[u8; 32], AuthError> {
    Ok(sha256(bearer(headers)?.as_bytes()))
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
