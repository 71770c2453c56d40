//! What a token says (PROTOCOL.md §3): the claims of the HS256 JWT that binds a holder to a
//! tenant, its branches, a device and a role. The hub signs and checks tokens; clients only
//! read the claims (they cannot check the signature, and need not).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::Name;
use crate::model::Role;

/// The branches a token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenBranches {
    /// Every branch of the tenant (`"*"`); admins only.
    All,
    /// These branches.
    List(Vec<Name>),
}

impl TokenBranches {
    /// Whether `branch` is allowed.
    pub fn allows(&self, branch: &Name) -> bool {
        match self {
            TokenBranches::All => true,
            TokenBranches::List(list) => list.contains(branch),
        }
    }
}

impl Serialize for TokenBranches {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TokenBranches::All => s.serialize_str("*"),
            TokenBranches::List(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TokenBranches {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Star(String),
            List(Vec<Name>),
        }
        match Wire::deserialize(d)? {
            Wire::Star(s) if s == "*" => Ok(TokenBranches::All),
            Wire::Star(s) => Err(serde::de::Error::custom(format!(
                "branches must be a list or \"*\", not {s:?}"
            ))),
            Wire::List(list) => Ok(TokenBranches::List(list)),
        }
    }
}

/// The claims of a Branchline token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The tenant.
    pub tenant: Name,
    /// The branches the holder may use.
    pub branches: TokenBranches,
    /// The device the token is for.
    pub device: Name,
    /// What the holder may do.
    pub role: Role,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds.
    pub iat: u64,
}

/// Why a token's claims could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// Not three dot-separated parts.
    #[error("the token is not a JWT")]
    NotJwt,
    /// The middle part is not base64url.
    #[error("the token's claims are not base64url")]
    NotBase64,
    /// The claims are not the ones this protocol defines.
    #[error("the token's claims do not read: {0}")]
    Claims(String),
}

impl Claims {
    /// Claims valid from now for `ttl`.
    pub fn new(
        tenant: Name,
        branches: TokenBranches,
        device: Name,
        role: Role,
        ttl: std::time::Duration,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            tenant,
            branches,
            device,
            role,
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
        }
    }

    /// Reads the claims of `token` without checking its signature (only the hub can).
    pub fn read_unverified(token: &str) -> Result<Self, ClaimsError> {
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ClaimsError::NotJwt);
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| ClaimsError::NotBase64)?;
        serde_json::from_slice(&bytes).map_err(|e| ClaimsError::Claims(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn encode(claims: &serde_json::Value) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        format!("header.{payload}.signature")
    }

    #[test]
    fn claims_read_from_a_token_whatever_its_length() {
        for device in ["t", "ti", "til", "till", "till-1"] {
            let token = encode(&serde_json::json!({
                "tenant": "acme", "branches": ["b1", "b2"], "device": device,
                "role": "cashier", "exp": 10, "iat": 1
            }));
            let claims = Claims::read_unverified(&token).unwrap();
            assert_eq!(claims.device.as_str(), device);
            assert!(claims.branches.allows(&Name::new("b2").unwrap()));
            assert!(!claims.branches.allows(&Name::new("b3").unwrap()));
        }
        let admin = encode(&serde_json::json!({
            "tenant": "acme", "branches": "*", "device": "console",
            "role": "admin", "exp": 10, "iat": 1
        }));
        let claims = Claims::read_unverified(&admin).unwrap();
        assert_eq!(
            (claims.branches, claims.role),
            (TokenBranches::All, Role::Admin)
        );
    }

    #[test]
    fn what_is_not_a_token_says_why() {
        assert_eq!(Claims::read_unverified("garbage"), Err(ClaimsError::NotJwt));
        assert_eq!(
            Claims::read_unverified("a.b!c.d"),
            Err(ClaimsError::NotBase64)
        );
        assert!(matches!(
            Claims::read_unverified(&encode(&serde_json::json!({"tenant": 1}))),
            Err(ClaimsError::Claims(_))
        ));
        let star = encode(&serde_json::json!({
            "tenant": "acme", "branches": "some", "device": "d",
            "role": "admin", "exp": 10, "iat": 1
        }));
        assert!(
            Claims::read_unverified(&star).is_err(),
            "only \"*\" is a string"
        );
    }
}
