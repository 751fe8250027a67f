//! What the tenant store keeps: teams, users (members of a plan) and their API keys, and the
//! rules their names and keys follow. Plain data; the stores persist it.

use crate::config::{BudgetPeriod, LimitOverrides};
use crate::cost::Usd;

/// An optional shared budget over its members.
#[derive(Debug, Clone, PartialEq)]
pub struct Team {
    pub name: String,
    pub budget_usd: Option<Usd>,
    pub budget_period: BudgetPeriod,
    /// Unix seconds.
    pub created_at: i64,
}

/// A user created through the admin API (or, for an end user, on first sight).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub plan: String,
    pub team: Option<String>,
    pub overrides: LimitOverrides,
    /// Whether it has per-user metric series (bounded by `[metrics] max_user_series`).
    pub metrics: bool,
    pub created_at: i64,
}

/// A client key. Only its SHA-256 is kept; the plaintext exists once, in the answer that
/// created it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub user: String,
    pub sha256: [u8; 32],
    /// The first characters of the key, to recognise it in a list.
    pub prefix: String,
    pub label: Option<String>,
    pub created_at: i64,
    /// After this (Unix seconds), the key is refused.
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// A budget of its own, over `budget_period`, on top of its user's and team's.
    pub budget_usd: Option<Usd>,
    pub budget_period: BudgetPeriod,
    /// Requests per minute through this key, on top of its user's limit.
    pub rpm: Option<u32>,
    /// The id of the first key of its line: a rotation's new key has its predecessor's, so the
    /// key's budget (and rpm) carries over a rotation instead of starting afresh.
    pub lineage: String,
    /// A service key: each end user its requests name (`x-tollgate-end-user`, or the body's
    /// `user`) is a principal of its own on this plan, created on first sight.
    pub end_users: Option<String>,
}

impl ApiKey {
    /// Whether the key may be used at `now` (Unix seconds).
    pub fn usable(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }
}

/// An end user's id as a request names it: 1 to 64 of letters, digits and `._@+-` (ids,
/// hashes, e-mail addresses).
pub fn valid_end_user(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'+'))
}

/// The user name of end user `id` of service user `service`: namespaced, so two services'
/// end users never meet, and never a name the admin API can create (`:` is not allowed there).
pub fn end_user_name(service: &str, id: &str) -> String {
    format!("{service}:{id}")
}

/// Names of teams and users: `[A-Za-z0-9._-]{1,64}`, so they are safe as metric labels, header
/// values, URL path segments and Redis hash tags.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What generated keys start with: recognisable in logs a secret scanner reads, and in a list.
pub const KEY_PREFIX: &str = "tg-";
/// Characters of a key shown in lists: the prefix and 8 of its 64 hex digits (32 bits of 256).
const SHOWN_CHARS: usize = KEY_PREFIX.len() + 8;

/// A new key: `tg-` and 256 bits from the OS's CSPRNG in hex, with its SHA-256 and the part
/// lists may show.
pub fn generate_key() -> Result<(String, [u8; 32], String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)?;
    let key = format!("{KEY_PREFIX}{}", crate::config::hex(&secret));
    let sha = crate::auth::sha256(key.as_bytes());
    let prefix = key[..SHOWN_CHARS].to_owned();
    Ok((key, sha, prefix))
}

/// A key's id: `key_` and 96 random bits in hex (not secret: it names the key in the admin API).
pub fn generate_key_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 12];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("key_{}", crate::config::hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_random_and_hashed() {
        let (a, sha_a, prefix_a) = generate_key().unwrap();
        let (b, _, _) = generate_key().unwrap();
        assert!(a.starts_with("tg-") && a.len() == 3 + 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(sha_a, crate::auth::sha256(a.as_bytes()));
        assert!(a.starts_with(&prefix_a) && prefix_a.len() == 11);
        assert!(generate_key_id().unwrap().starts_with("key_"));
    }

    #[test]
    fn names_are_a_safe_alphabet_of_1_to_64() {
        assert!(valid_name("acme-prod.v2_x"));
        for bad in ["", "a b", "a/b", "ü", "a:b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
