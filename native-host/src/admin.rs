//! The native host's admin API: `GET /admin/keys` shows every key pool as the gateway sees
//! it (ids, state, cooldown end, learned headroom, counters; never a secret). It is off
//! unless `TOLLGATE_ADMIN_KEY` is set, and then answers only requests bearing that key.

use hyper::header::HeaderMap;
use tollgate_core::auth::{presented_key, KeyHash};
use tollgate_core::http::LocalResponse;

use crate::proxy::Headers;
use tollgate_core::keys::report;
use tollgate_core::GatewayError;

/// Environment variable that holds the admin key.
pub const ADMIN_KEY_ENV: &str = "TOLLGATE_ADMIN_KEY";

pub const KEYS_PATH: &str = "/admin/keys";

/// The admin key, held as its hash like consumer keys.
pub struct AdminKey(Option<KeyHash>);

impl AdminKey {
    pub fn from_env() -> Self {
        Self(
            std::env::var(ADMIN_KEY_ENV)
                .ok()
                .filter(|k| !k.trim().is_empty())
                .map(|k| KeyHash::of(k.trim())),
        )
    }
}

/// Answers `GET /admin/keys`; `None` when the admin API is off (the path is then unknown,
/// as to any other client).
pub fn keys(
    admin: &AdminKey,
    method: &str,
    headers: &HeaderMap,
    gateway: &crate::proxy::Gateway,
) -> Option<LocalResponse> {
    let expected = admin.0.as_ref()?;
    let lookup = Headers(headers);
    let Some(presented) = presented_key(&lookup) else {
        return Some(GatewayError::MissingConsumerKey.respond());
    };
    if !KeyHash::of(presented).ct_eq(expected) {
        return Some(GatewayError::UnknownConsumerKey.respond());
    }
    if method != "GET" {
        return Some(
            GatewayError::MethodNotAllowed {
                method: method.to_string(),
                path: KEYS_PATH.to_string(),
                allowed: "GET",
            }
            .respond(),
        );
    }
    let now = crate::now_ms();
    let pools = report::pools(&gateway.config(), &gateway.store, now);
    let body = serde_json::json!({ "now_ms": now, "providers": pools });
    Some(LocalResponse::json(
        200,
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    ))
}
