//! The two roles tollgate plays, named as Envoy's plugin `root_id`s. The filter reads its role
//! from the root id; the bootstrap renderer writes the same names.

/// Listener filter: auth, routing, body rewrite, response path (`exchange`).
pub const GATEWAY_ROOT_ID: &str = "tollgate-gateway";
/// Upstream filter of each provider cluster: one key per attempt (`keys`).
pub const KEY_ROOT_ID: &str = "tollgate-key";

/// Envoy cluster of each upstream provider: this prefix + the provider's name. The key role
/// falls back to it when the routing header is gone (Envoy shares one header map between
/// the downstream request and its upstream attempts, so an earlier attempt's edits stay).
pub const PROVIDER_CLUSTER_PREFIX: &str = "tollgate_provider_";

/// Envoy cluster of `tollgate store-server` (`store.server`), through which Envoy commits its
/// shared state to Redis (`store.kind: redis`).
pub const STORE_CLUSTER: &str = "tollgate_store";

/// The provider a cluster name belongs to, if it is one of ours.
pub fn provider_of_cluster(cluster: &str) -> Option<&str> {
    cluster.strip_prefix(PROVIDER_CLUSTER_PREFIX)
}
