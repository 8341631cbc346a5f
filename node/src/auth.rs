//! Client authentication: HS256 JWTs with `sub` (the user id) and `exp`.
//!
//! Checked once per connection, at the WebSocket upgrade; a failure is an
//! HTTP 401 and no socket. Also mints tokens for `chat-node token`.

use std::time::{SystemTime, UNIX_EPOCH};

use actors::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims we read and write.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// Operator token (admin endpoints), never a chat user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    adm: bool,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("missing token")]
    Missing,
    /// Malformed, badly signed or expired.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// `sub` is not a valid user id.
    #[error("invalid user id in token")]
    BadSubject,
}

/// Verifies and mints tokens with one secret.
#[derive(Clone)]
pub struct Auth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    /// An authenticator for `secret`, accepting `leeway_secs` of clock skew.
    pub fn new(secret: &str, leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The user a token authenticates (operator tokens are refused).
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        if data.claims.adm {
            return Err(AuthError::BadSubject);
        }
        UserId::parse(&data.claims.sub).ok_or(AuthError::BadSubject)
    }

    /// Whether `token` is a valid operator token.
    pub fn verify_admin(&self, token: &str) -> Result<(), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        if data.claims.adm {
            Ok(())
        } else {
            Err(AuthError::BadSubject)
        }
    }

    /// An operator token valid for `ttl_secs`.
    pub fn mint_admin(&self, ttl_secs: i64) -> Result<String, AuthError> {
        self.mint_claims("operator", ttl_secs, true)
    }

    /// A token for `user` valid for `ttl_secs` (negative: already expired,
    /// for tests).
    pub fn mint(&self, user: &UserId, ttl_secs: i64) -> Result<String, AuthError> {
        self.mint_claims(user.as_str(), ttl_secs, false)
    }

    fn mint_claims(&self, sub: &str, ttl_secs: i64, adm: bool) -> Result<String, AuthError> {
        let now = now_secs();
        let exp = now.saturating_add_signed(ttl_secs);
        let claims = Claims {
            sub: sub.to_string(),
            exp,
            iat: Some(now),
            adm,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let auth = Auth::new("0123456789abcdef", 0);
        let alice = UserId::parse("alice").expect("valid");
        let t = auth.mint(&alice, 60).expect("mint");
        assert_eq!(auth.verify(&t).expect("valid"), alice);
        let expired = auth.mint(&alice, -120).expect("mint");
        assert!(matches!(auth.verify(&expired), Err(AuthError::Invalid(_))));
        let other = Auth::new("another-secret-000", 0);
        assert!(matches!(other.verify(&t), Err(AuthError::Invalid(_))));
        assert!(auth.verify("garbage").is_err());
        let admin = auth.mint_admin(60).expect("mint");
        assert!(auth.verify_admin(&admin).is_ok());
        assert!(
            auth.verify(&admin).is_err(),
            "operator tokens are not chat users"
        );
        assert!(auth.verify_admin(&t).is_err());
    }
}
