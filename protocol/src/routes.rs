//! The hub's HTTP routes (PROTOCOL.md §11 and §15), spelled once for the hub's router, the
//! SDK and the load harness. Path parameters are in braces, as the hub's router writes them;
//! [`branch_path`] and [`resolve_path`] fill them in.

use uuid::Uuid;

use crate::ids::Name;

/// The WebSocket upgrade.
pub const WS: &str = "/v1/ws";
/// The hub's clock.
pub const TIME: &str = "/v1/time";
/// A branch's status.
pub const BRANCH: &str = "/v1/branches/{tenant}/{branch}";
/// A branch's events: `GET` pages of them, `POST` a batch push.
pub const EVENTS: &str = "/v1/branches/{tenant}/{branch}/events";
/// A branch's paged snapshot.
pub const SNAPSHOT: &str = "/v1/branches/{tenant}/{branch}/snapshot";
/// A branch's devices.
pub const DEVICES: &str = "/v1/branches/{tenant}/{branch}/devices";
/// A branch's conflicts.
pub const CONFLICTS: &str = "/v1/branches/{tenant}/{branch}/conflicts";
/// The resolution of one conflict.
pub const RESOLVE: &str = "/v1/branches/{tenant}/{branch}/conflicts/{id}/resolve";
/// Liveness.
pub const HEALTHZ: &str = "/healthz";
/// Readiness: the store takes writes and the hub is not stopping.
pub const READYZ: &str = "/readyz";
/// Prometheus metrics.
pub const METRICS: &str = "/metrics";

/// `route` (one of the branch routes) for `branch` of `tenant`.
pub fn branch_path(route: &str, tenant: &Name, branch: &Name) -> String {
    route
        .replace("{tenant}", tenant.as_str())
        .replace("{branch}", branch.as_str())
}

/// The resolution path of conflict `id` of `branch` of `tenant`.
pub fn resolve_path(tenant: &Name, branch: &Name, id: &Uuid) -> String {
    branch_path(RESOLVE, tenant, branch).replace("{id}", &id.to_string())
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_fill_in_their_parameters() {
        let (t, b) = (Name::new("acme").unwrap(), Name::new("b1").unwrap());
        assert_eq!(branch_path(EVENTS, &t, &b), "/v1/branches/acme/b1/events");
        assert_eq!(branch_path(BRANCH, &t, &b), "/v1/branches/acme/b1");
        let id = Uuid::nil();
        assert_eq!(
            resolve_path(&t, &b, &id),
            format!("/v1/branches/acme/b1/conflicts/{id}/resolve")
        );
    }
}
