//! Tokens: HS256 JWTs binding tenant, branches, device and role (PROTOCOL.md §3).

use std::time::Duration;

use branchline_protocol::{ErrorCode, Name, Role};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

pub use branchline_protocol::{Claims, TokenBranches};

/// What a token allows, in the hub's terms.
pub trait Access {
    /// Whether the holder may use `branch` of `tenant`.
    fn check_branch(&self, tenant: &Name, branch: &Name) -> Result<(), AuthError>;

    /// Whether the holder is an admin.
    fn require_admin(&self) -> Result<(), AuthError>;
}

impl Access for Claims {
    fn check_branch(&self, tenant: &Name, branch: &Name) -> Result<(), AuthError> {
        if tenant != &self.tenant {
            return Err(AuthError::Forbidden(format!(
                "the token is for tenant {}, not {tenant}",
                self.tenant
            )));
        }
        if self.branches.allows(branch) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the token does not allow branch {branch}"
            )))
        }
    }

    fn require_admin(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Cashier => Err(AuthError::Forbidden("this needs an admin token".into())),
        }
    }
}

/// Why a token or an action was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed or not signed with this hub's secret.
    #[error("{0}")]
    Unauthorized(String),
    /// Signed by this hub but expired.
    #[error("token expired")]
    Expired,
    /// Valid, but does not allow this tenant, branch or action.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Unauthorized(_) => ErrorCode::Unauthorized,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Forbidden(_) => ErrorCode::Forbidden,
        }
    }
}

/// Signs and checks tokens with one secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    /// Keys for `secret`, refusing tokens from the second after their expiry.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Accepts tokens up to `leeway` (whole seconds) past their expiry, for an issuer whose
    /// clock is ahead of the hub's.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// Signs `claims`.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Unauthorized(format!("cannot sign token: {e}")))
    }

    /// Checks a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => {
                    AuthError::Unauthorized("token not signed by this hub".into())
                }
                _ => AuthError::Unauthorized(format!("malformed token: {e}")),
            })?;
        let claims = data.claims;
        if claims.device.as_str() == branchline_protocol::HUB_DEVICE {
            return Err(AuthError::Unauthorized(format!(
                "device name {} is reserved for the hub",
                claims.device
            )));
        }
        if claims.role == Role::Cashier && claims.branches == TokenBranches::All {
            return Err(AuthError::Unauthorized(
                "a cashier token must list its branches".into(),
            ));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn cashier() -> Claims {
        Claims::new(
            name("acme"),
            TokenBranches::List(vec![name("b1")]),
            name("till-1"),
            Role::Cashier,
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn minted_tokens_verify_to_the_same_claims() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef");
        let token = keys.mint(&cashier()).unwrap();
        assert_eq!(keys.verify(&token).unwrap(), cashier());
    }

    #[test]
    fn foreign_expired_and_garbage_tokens_are_refused() {
        let keys = TokenKeys::new(b"secret-one-secret-one-secret-one");
        let other = TokenKeys::new(b"secret-two-secret-two-secret-two");
        let token = other.mint(&cashier()).unwrap();
        assert_eq!(
            keys.verify(&token).unwrap_err().code(),
            ErrorCode::Unauthorized
        );
        assert_eq!(
            keys.verify("not.a.token").unwrap_err().code(),
            ErrorCode::Unauthorized
        );
        let mut old = cashier();
        old.exp = old.iat - 3600;
        let token = keys.mint(&old).unwrap();
        assert_eq!(keys.verify(&token).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn cashiers_reach_only_their_branches_and_tenant() {
        let c = cashier();
        assert!(c.check_branch(&name("acme"), &name("b1")).is_ok());
        assert_eq!(
            c.check_branch(&name("acme"), &name("b2"))
                .unwrap_err()
                .code(),
            ErrorCode::Forbidden
        );
        assert_eq!(
            c.check_branch(&name("other"), &name("b1"))
                .unwrap_err()
                .code(),
            ErrorCode::Forbidden
        );
        assert!(c.require_admin().is_err());
    }

    #[test]
    fn star_branches_are_for_admins_only() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef");
        let mut c = cashier();
        c.branches = TokenBranches::All;
        let token = keys.mint(&c).unwrap();
        assert_eq!(
            keys.verify(&token).unwrap_err().code(),
            ErrorCode::Unauthorized
        );
        c.role = Role::Admin;
        let token = keys.mint(&c).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert!(claims.check_branch(&name("acme"), &name("any")).is_ok());
        assert!(claims.check_branch(&name("globex"), &name("any")).is_err());
    }
}
