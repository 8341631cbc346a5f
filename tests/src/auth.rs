//! JWT minting for tests: the same tokens `chat-node token` prints (HS256,
//! claims `{sub, exp}`), signed with the secret the harness wrote into the
//! node's config, plus the broken ones the 401 tests need, and operator
//! tokens for the `/admin/...` endpoints (`chat-node token x --admin`:
//! claims `{sub: "operator", exp, adm: true}`).
//!
//! Minting in-process is faster than spawning `chat-node token` per client.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

/// Lifetime of the tokens minted by [`token`].
pub const TOKEN_TTL_SECS: u64 = 3600;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token for `user` with expiry `exp` (Unix seconds), signed with `secret`.
pub fn token_with_exp(secret: &str, user: &str, exp: u64) -> String {
    encode(
        &Header::default(),
        &Claims { sub: user, exp },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of a small claim set cannot fail")
}

#[derive(Serialize)]
struct OperatorClaims<'a> {
    sub: &'a str,
    exp: u64,
    adm: bool,
}

/// An operator token (for `/admin/...`), good for [`TOKEN_TTL_SECS`].
pub fn operator_token(secret: &str) -> String {
    encode(
        &Header::default(),
        &OperatorClaims {
            sub: "operator",
            exp: now_secs() + TOKEN_TTL_SECS,
            adm: true,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of a small claim set cannot fail")
}

/// A valid token for `user`, good for [`TOKEN_TTL_SECS`].
pub fn token(secret: &str, user: &str) -> String {
    token_with_exp(secret, user, now_secs() + TOKEN_TTL_SECS)
}

/// A token that expired an hour ago (well past any validation leeway).
pub fn expired_token(secret: &str, user: &str) -> String {
    token_with_exp(secret, user, now_secs().saturating_sub(3600))
}

/// A well-formed token signed with the wrong secret.
pub fn badly_signed_token(secret: &str, user: &str) -> String {
    token(&format!("{secret}-but-not-really"), user)
}
