//! Renders an Envoy bootstrap that runs tollgate's filter for a given config: the gateway role
//! on the listener, the key role in each provider cluster's upstream filters, one VM id, the
//! provider secrets passed through `host_env_keys`, and OpenAI-shaped bodies for Envoy's own
//! upstream errors. `make envoy` and the end-to-end tests use it; users can read it as a
//! template for dropping tollgate into an existing Envoy.

use serde_json::{json, Value};
use tollgate_core::config::store::StoreSettings;
use tollgate_core::config::ServerSettings;
use tollgate_core::http::PROVIDER_HEADER;
use tollgate_core::metrics;
use tollgate_core::providers::Scheme;
use tollgate_core::retry::{RetryPolicy, RETRIED_STATUSES};
use tollgate_core::roles::{GATEWAY_ROOT_ID, KEY_ROOT_ID, PROVIDER_CLUSTER_PREFIX, STORE_CLUSTER};
use tollgate_core::{Config, GatewayError};

pub struct BootstrapOptions<'a> {
    /// The tollgate config as written; it becomes both roles' plugin configuration.
    pub config_text: &'a str,
    pub config: &'a Config,
    pub wasm_path: &'a str,
    pub listen: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// Serve the listener and clusters from files in this directory (Envoy's file-based
    /// xDS), so that rewriting them reloads the config in a running Envoy.
    pub xds_dir: Option<&'a std::path::Path>,
}

/// A rendered bootstrap, and with `xds_dir` the resource files it points to.
pub struct Rendered {
    pub bootstrap: String,
    /// (`lds.yaml`, `cds.yaml`) contents.
    pub xds: Option<(String, String)>,
}

pub const LDS_FILE: &str = "lds.yaml";
pub const CDS_FILE: &str = "cds.yaml";

pub const VM_ID: &str = "tollgate";

/// Retries a provider cluster may have in flight at once (Envoy's default is 3).
const MAX_RETRIES_IN_FLIGHT: u32 = 10_000;

/// Backoff (base, max) between reloads of a crashed Wasm VM.
const VM_RELOAD_BACKOFF: (&str, &str) = ("1s", "10s");

/// Edge limits Envoy's defaults leave open (they are tailored for a service mesh of trusted
/// clients), after its "Configuring Envoy as an edge proxy" best practices. The connection
/// limits, timeouts and HTTP/2 stream limit come from the config's `server` settings, which
/// the native host applies too; see docs/envoy.md.
const MAX_REQUEST_HEADERS_KB: u32 = 60;
const MAX_HEADERS_COUNT: u32 = 100;
/// The best practices' HTTP/2 connection window; the stream window cannot follow them (below).
const H2_MIN_CONNECTION_WINDOW: u64 = 1024 * 1024;

fn seconds(ms: u64) -> String {
    format!("{}s", ms as f64 / 1000.0)
}

fn socket_address(addr: &std::net::SocketAddr) -> Value {
    json!({ "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() } })
}

fn wasm_filter(opts: &BootstrapOptions<'_>, root_id: &str, env_keys: &[String]) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": root_id,
                "root_id": root_id,
                // A VM that traps (a panic in the filter) is replaced by a fresh one for the
                // next request, after a backoff; until then, and if the reload fails, the
                // plugin fails closed (503): a gateway that enforces limits and keys must not
                // let requests bypass it. `fail_open` cannot be set with it.
                "failure_policy": "FAIL_RELOAD",
                "reload_config": { "backoff": {
                    "base_interval": VM_RELOAD_BACKOFF.0,
                    "max_interval": VM_RELOAD_BACKOFF.1,
                }},
                // Without it Envoy turns a paused request-headers callback into "stop all",
                // and the gateway role never sees the body it must route on (Envoy >= 1.35).
                "allow_on_headers_stop_iteration": true,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": opts.config_text,
                },
                "vm_config": {
                    "vm_id": VM_ID,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": opts.wasm_path } },
                    "environment_variables": { "host_env_keys": env_keys },
                },
            },
        },
    })
}

fn cluster_name(provider: &str) -> String {
    format!("{PROVIDER_CLUSTER_PREFIX}{provider}")
}

/// Maps Envoy's own upstream failures to the errors the native host gives for the same cases,
/// rendered by the core from the same `GatewayError`s. Routes are named after their provider.
fn local_reply_config() -> Value {
    let mapper = |flags: &[&str], error: GatewayError| {
        json!({
            "filter": { "response_flag_filter": { "flags": flags } },
            "status_code": error.status(),
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": error.message(),
                        "type": error.kind(),
                        "param": null,
                        "code": error.code(),
                    }
                }
            },
        })
    };
    let provider = || "%ROUTE_NAME%".to_string();
    json!({
        "mappers": [
            mapper(&["UF", "UH", "UR", "UC", "URX", "UO", "NR"], GatewayError::UpstreamUnavailable { provider: provider() }),
            mapper(&["UT", "SI"], GatewayError::UpstreamTimeout { provider: provider() }),
            // An answer Envoy cannot parse (oversized or malformed head): it came, unreadable.
            mapper(&["UPE"], GatewayError::UpstreamInvalidAnswer { provider: provider() }),
        ]
    })
}

/// The route's retry policy from the provider's: Envoy makes the retries, the key role picks
/// a key the request has not tried for each attempt and refuses attempts past the time
/// budget. Envoy retries only before a response has reached the client, so a stream is never
/// retried after its first byte. Envoy's backoff is "full jitter" (0 up to the exponential
/// step), the native host's the upper half of the step.
fn retry_policy(retry: &RetryPolicy) -> Option<Value> {
    (retry.attempts > 1).then(|| {
        json!({
            "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
            "retriable_status_codes": RETRIED_STATUSES,
            "num_retries": retry.attempts - 1,
            "retry_back_off": {
                "base_interval": seconds(retry.backoff_ms),
                "max_interval": seconds(retry.max_backoff_ms),
            },
        })
    })
}

/// Envoy's admin interface can stop the server, change log levels and dump the config (with
/// the listener's filter configuration): it belongs on loopback. `None` when it is there.
pub fn admin_warning(admin: &std::net::SocketAddr) -> Option<String> {
    (!admin.ip().is_loopback()).then(|| {
        format!(
            "Envoy's admin interface listens on {admin}, not on loopback: anyone who reaches it \
             can stop Envoy and read its config. Firewall it, or pass --admin 127.0.0.1:PORT."
        )
    })
}

/// Room Envoy gives one request (its body and headers) before it pushes back: the largest body
/// the gateway role accepts plus 64 KiB, so that the gateway role, not Envoy's buffer limit,
/// refuses oversized bodies, with an OpenAI-shaped 413.
fn request_buffer_bytes(server: &ServerSettings) -> u64 {
    server.max_body_bytes + 64 * 1024
}

/// Downstream HTTP/2: a bounded number of streams per connection, keep-alive pings that close
/// connections whose peer vanished without a FIN, and flow-control windows. The HTTP/2 stream
/// window is also the most Envoy buffers for one stream: the best practices' 64 KiB would
/// cut every body the gateway role buffers at 64 KiB (measured: the stream is reset), so it
/// is the same room an HTTP/1 request gets (Envoy's default is 256 MiB).
fn http2_options(server: &ServerSettings) -> Value {
    let stream_window = request_buffer_bytes(server);
    let mut options = json!({
        "max_concurrent_streams": server.http2_max_concurrent_streams,
        "initial_stream_window_size": stream_window,
        "initial_connection_window_size": stream_window.max(H2_MIN_CONNECTION_WINDOW),
    });
    if server.http2_keepalive_interval_ms > 0 {
        options["connection_keepalive"] = json!({
            "interval": seconds(server.http2_keepalive_interval_ms),
            "timeout": seconds(server.http2_keepalive_timeout_ms),
        });
    }
    options
}

/// The overload manager: a cap on downstream connections across all listeners and workers
/// (Envoy has none by default, and warns about it at startup). New connections past it are
/// refused at accept.
fn overload_manager(server: &ServerSettings) -> Value {
    json!({
        "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": server.max_connections,
            },
        }],
    })
}

/// The cluster specifier that maps the routing header to each provider's cluster.
fn cluster_by_provider(
    upstreams: &[(
        &tollgate_core::providers::Provider,
        &tollgate_core::providers::BaseUrl,
    )],
) -> Value {
    let map: serde_json::Map<String, Value> = upstreams
        .iter()
        .map(|(p, _)| {
            let action = json!({ "action": {
                "name": cluster_name(&p.name),
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
                    "cluster": cluster_name(&p.name),
                },
            }});
            (p.name.clone(), action)
        })
        .collect();
    json!({ "extension": {
        "name": "envoy.router.cluster_specifier_plugin.matcher",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier",
            "cluster_matcher": { "matcher_tree": {
                "input": {
                    "name": PROVIDER_HEADER,
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                        "header_name": PROVIDER_HEADER,
                    },
                },
                "exact_match_map": { "map": map },
            }},
        },
    }})
}

/// Turns the filter's stats into tollgate's Prometheus families on `/stats/prometheus`:
/// each label the filter writes into a stat's name (`metrics::envoy_stat_name`) becomes a tag,
/// and the histograms get the native host's buckets (in milliseconds).
fn stats_config() -> Value {
    let tags: Vec<Value> = metrics::envoy_tag_extractors()
        .into_iter()
        .map(|(tag, regex)| json!({ "tag_name": tag, "regex": regex }))
        .collect();
    let buckets: Vec<Value> = metrics::FAMILIES
        .iter()
        .filter(|f| f.in_envoy && !f.buckets.is_empty())
        .map(|f| {
            json!({
                "match": { "prefix": format!("wasmcustom.{}", f.name) },
                "buckets": f.buckets,
            })
        })
        .collect();
    json!({
        "stats_tags": tags,
        "use_all_default_tags": true,
        "histogram_bucket_settings": buckets,
    })
}

/// With `store.kind: redis`, the cluster of `tollgate store-server` (`store.server`), which
/// commits the filter's shared state on Redis: plain HTTP/1, one static endpoint, connecting
/// within `store.timeout_ms`. It takes every request the listener may hold at once (Envoy's
/// default of 1024 would refuse commits beyond that).
fn store_cluster(config: &Config) -> Option<Value> {
    let StoreSettings::Redis(redis) = &config.store else {
        return None;
    };
    let addr: std::net::SocketAddr = redis.server.as_deref()?.parse().ok()?;
    let server = &config.server;
    Some(json!({
        "name": STORE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": seconds(redis.timeout_ms),
        "circuit_breakers": { "thresholds": [{
            "priority": "DEFAULT",
            "max_connections": server.max_connections,
            "max_pending_requests": server.max_connections,
            "max_requests": server.max_connections,
        }]},
        "load_assignment": {
            "cluster_name": STORE_CLUSTER,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(&addr) } }] }],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http_protocol_options": {} },
            },
        },
    }))
}

pub fn render(opts: &BootstrapOptions<'_>) -> Rendered {
    let config = opts.config;
    let mut env_keys: Vec<String> = config
        .providers()
        .iter()
        .flat_map(|p| p.keys.iter().map(|k| k.secret_env.clone()))
        .collect();
    env_keys.sort();
    env_keys.dedup();
    let timeout = seconds(config.server.upstream_timeout_ms);
    let server = &config.server;

    let upstreams: Vec<_> = config
        .providers()
        .iter()
        .filter_map(|p| p.base_url.as_ref().map(|u| (p, u)))
        .collect();

    // With failover chains, a route's cluster is picked from the routing header per attempt.
    let chain_clusters = config.has_chains().then(|| cluster_by_provider(&upstreams));
    let mut routes: Vec<Value> = upstreams
        .iter()
        .map(|(p, u)| {
            let mut route = json!({
                "name": p.name,
                "match": {
                    "prefix": "/",
                    "headers": [{ "name": PROVIDER_HEADER, "string_match": { "exact": p.name } }],
                },
                "route": {
                    "cluster": cluster_name(&p.name),
                    "host_rewrite_literal": u.host_header(),
                    // The whole-response timeout would cut long streams: bound the silence
                    // instead, as the native host does.
                    "timeout": "0s",
                    "idle_timeout": timeout,
                },
            });
            if let Some(policy) = retry_policy(&p.retry) {
                route["route"]["retry_policy"] = policy;
                if let Some(clusters) = &chain_clusters {
                    // Failover (docs/envoy.md, "Failover"): each retry picks its cluster
                    // again from the routing header, which the key role points at the
                    // chain's next provider.
                    route["route"]["retry_policy"]["refresh_cluster_on_retry"] = json!(true);
                    let mut specifier = clusters.clone();
                    // A request the header names no provider for stays on this one.
                    specifier["extension"]["typed_config"]["cluster_matcher"]["on_no_match"] = json!({
                        "action": {
                            "name": cluster_name(&p.name),
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
                                "cluster": cluster_name(&p.name),
                            },
                        },
                    });
                    if let Some(map) = route["route"].as_object_mut() {
                        map.remove("cluster");
                        map.insert("inline_cluster_specifier_plugin".into(), specifier);
                    }
                }
            }
            route
        })
        .collect();
    // Reached only if the gateway role let a request through unrouted, which it never does.
    routes.push(json!({
        "match": { "prefix": "/" },
        "direct_response": {
            "status": 404,
            "body": { "inline_string": r#"{"error":{"message":"No route.","type":"not_found_error","param":null,"code":"not_found"}}"# },
        },
    }));

    let clusters: Vec<Value> = upstreams
        .iter()
        .map(|(p, u)| {
            let ip = u.host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok();
            let mut cluster = json!({
                "name": cluster_name(&p.name),
                "type": if ip { "STATIC" } else { "STRICT_DNS" },
                "dns_lookup_family": "V4_PREFERRED",
                "connect_timeout": "5s",
                // Envoy allows 3 retries in flight per cluster by default and drops the rest
                // (`upstream_rq_retry_overflow`): exactly when many keys are rate limited at
                // once. Retries are bounded per request by `retry.attempts` instead.
                // The other defaults (1024 connections, pending and active requests) would
                // refuse long streams past 1024 at once, and no bound would let one slow
                // provider hold every resource: a provider may take all of the gateway's
                // traffic (`server.max_connections`), no more.
                "circuit_breakers": { "thresholds": [{
                    "priority": "DEFAULT",
                    "max_connections": server.max_connections,
                    "max_pending_requests": server.max_connections,
                    "max_requests": server.max_connections,
                    "max_retries": MAX_RETRIES_IN_FLIGHT,
                }]},
                "load_assignment": {
                    "cluster_name": cluster_name(&p.name),
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                        "address": u.host.trim_start_matches('[').trim_end_matches(']'),
                        "port_value": u.port,
                    }}}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http_protocol_options": {} },
                        // The key role runs here, once per upstream attempt.
                        "http_filters": [
                            wasm_filter(opts, KEY_ROOT_ID, &env_keys),
                            {
                                "name": "envoy.filters.http.upstream_codec",
                                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec" },
                            },
                        ],
                    },
                },
            });
            if u.scheme == Scheme::Https {
                cluster["transport_socket"] = json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": u.host,
                        "common_tls_context": {
                            "validation_context": {
                                "trusted_ca": { "filename": "/etc/ssl/certs/ca-certificates.crt" },
                                "match_typed_subject_alt_names": [{ "san_type": "DNS", "matcher": { "exact": u.host } }],
                            },
                        },
                    },
                });
            }
            cluster
        })
        .collect();

    let mut clusters = clusters;
    clusters.extend(store_cluster(config));

    let listener = json!({
        "name": "tollgate",
        "address": socket_address(&opts.listen),
        "per_connection_buffer_limit_bytes": request_buffer_bytes(&config.server),
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "tollgate",
                // Trust the peer address, not `x-forwarded-for`, to tell internal
                // from external clients (external `x-envoy-*` headers are dropped).
                "use_remote_address": true,
                // Every answer carries the request's id, the client's own when it sent one
                // (as the native host does); the access log names it.
                "preserve_external_request_id": true,
                "always_set_request_id_in_response": true,
                "codec_type": "AUTO",
                // A client that opens a request head and never finishes it (slowloris) is
                // cut off, and so is a connection left idle: Envoy bounds neither by default.
                "request_headers_timeout": seconds(server.header_read_timeout_ms),
                "common_http_protocol_options": {
                    "idle_timeout": seconds(server.idle_timeout_ms),
                    // Some upstreams read `x_api_key` as `x-api-key`: a client must not be
                    // able to smuggle a header past the gateway role that way.
                    "headers_with_underscores_action": "REJECT_REQUEST",
                    "max_headers_count": MAX_HEADERS_COUNT,
                },
                "max_request_headers_kb": MAX_REQUEST_HEADERS_KB,
                "http2_protocol_options": http2_options(server),
                "route_config": {
                    "name": "tollgate",
                    "virtual_hosts": [{ "name": "providers", "domains": ["*"], "routes": routes }],
                },
                "http_filters": [
                    wasm_filter(opts, GATEWAY_ROOT_ID, &env_keys),
                    { "name": "envoy.filters.http.router", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } },
                ],
                "local_reply_config": local_reply_config(),
            },
        }]}],
    });
    let yaml = |v: &Value| serde_yaml::to_string(v).unwrap_or_default();
    let header = "# Envoy bootstrap for tollgate, rendered by `tollgate envoy-bootstrap`.\n";
    let header = match admin_warning(&opts.admin) {
        Some(warning) => {
            // The renderer's callers print only the bootstrap: say it where it is read too.
            eprintln!("warning: {warning}");
            format!("{header}# WARNING: {warning}\n")
        }
        None => header.to_string(),
    };
    // The operator's way in stays open when clients hold every connection the limit allows.
    let admin = json!({ "address": socket_address(&opts.admin), "ignore_global_conn_limit": true });
    let overload = overload_manager(server);
    let stats = stats_config();
    let Some(dir) = opts.xds_dir else {
        let bootstrap = json!({
            "admin": admin,
            "overload_manager": overload,
            "stats_config": stats,
            "static_resources": { "listeners": [listener], "clusters": clusters },
        });
        return Rendered {
            bootstrap: format!("{header}{}", yaml(&bootstrap)),
            xds: None,
        };
    };
    let source = |file: &str| {
        json!({
            "path_config_source": {
                "path": dir.join(file).display().to_string(),
                "watched_directory": { "path": dir.display().to_string() },
            },
            "resource_api_version": "V3",
        })
    };
    let bootstrap = json!({
        // xDS needs a node identity, even from files.
        "node": { "id": "tollgate", "cluster": "tollgate" },
        "admin": admin,
        "overload_manager": overload,
        "stats_config": stats,
        "dynamic_resources": { "lds_config": source(LDS_FILE), "cds_config": source(CDS_FILE) },
    });
    let resources = |type_url: &str, items: Vec<Value>| {
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut v| {
                v["@type"] = Value::String(type_url.to_string());
                v
            })
            .collect();
        yaml(&json!({ "resources": items }))
    };
    Rendered {
        bootstrap: format!("{header}{}", yaml(&bootstrap)),
        xds: Some((
            resources(
                "type.googleapis.com/envoy.config.listener.v3.Listener",
                vec![listener],
            ),
            resources(
                "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                clusters,
            ),
        )),
    }
}
