//! The few HTTP shapes the core speaks in: a read-only view of request headers that each host
//! implements over its own header map, and the responses the gateway answers itself.

/// Header the gateway role sets so that Envoy's route table picks the provider's cluster.
/// Clients cannot set it: the gateway role always overwrites or removes it, and the key role
/// removes it before the request leaves.
pub const PROVIDER_HEADER: &str = "x-tollgate-provider";

/// Response header that marks an answer the key role made final, with its real status: a
/// reply of the key role's own (`key 429`; in Envoy it travels back through the gateway role
/// like a provider's response), or a provider's answer that no further attempt may follow
/// (`final 500`: the retry budget is spent, so the router must not retry it). Removed before
/// the client sees it.
pub const LOCAL_REPLY_HEADER: &str = "x-tollgate-local-reply";

/// The status such answers carry through Envoy's router: one its retry policy never retries
/// (it retries 429, 401, 403 and 5xx, and a key role refusal such as "every key is cooling"
/// is final). The gateway role restores the real status from `LOCAL_REPLY_HEADER`.
pub const LOCAL_REPLY_CARRIER_STATUS: u16 = 400;

/// What a `LOCAL_REPLY_HEADER` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalAnswer {
    /// The key role's own reply, already the error the client should see, with its
    /// metric code (`metrics::CODES`).
    KeyRole(u16, Option<&'static str>),
    /// The provider's answer, to be handled as any provider answer with this status.
    Provider(u16),
}

impl FinalAnswer {
    /// The `LOCAL_REPLY_HEADER` value.
    pub fn marker(self) -> String {
        match self {
            FinalAnswer::KeyRole(status, Some(code)) => format!("key {status} {code}"),
            FinalAnswer::KeyRole(status, None) => format!("key {status}"),
            FinalAnswer::Provider(status) => format!("final {status}"),
        }
    }

    /// Reads a `LOCAL_REPLY_HEADER` value.
    pub fn parse(marker: &str) -> Option<FinalAnswer> {
        let mut words = marker.split_whitespace();
        let kind = words.next()?;
        let status = words.next()?.parse().ok()?;
        match kind {
            "key" => Some(FinalAnswer::KeyRole(
                status,
                words.next().and_then(crate::metrics::known_code),
            )),
            "final" => Some(FinalAnswer::Provider(status)),
            _ => None,
        }
    }
}

/// Request headers that carry a consumer's credential. Stripped before anything goes upstream.
pub const CONSUMER_CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Request headers removed before the request goes upstream: the consumer's credential;
/// `accept-encoding`, because the gateway reads provider responses (usage, translation) and
/// so asks for them uncompressed; and OpenAI's account selectors, because the gateway's key
/// decides which organization and project pay, not the client.
pub const FORWARD_REMOVE_HEADERS: [&str; 6] = [
    CONSUMER_CREDENTIAL_HEADERS[0],
    CONSUMER_CREDENTIAL_HEADERS[1],
    CONSUMER_CREDENTIAL_HEADERS[2],
    "accept-encoding",
    "openai-organization",
    "openai-project",
];

/// Request headers only the gateway may set: its own `x-tollgate-*` headers, and Envoy's router controls
/// (`x-envoy-retry-on`, `x-envoy-upstream-rq-timeout-ms`, ...), which would let a client make
/// the gateway retry on other keys or wait longer than configured. Removed from every client
/// request in both hosts.
pub fn is_gateway_header(name: &str) -> bool {
    let has_prefix = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    has_prefix("x-tollgate-") || has_prefix("x-envoy-")
}

/// Read access to a request's headers. Names are matched case-insensitively by the host.
pub trait HeaderLookup {
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for [(String, String)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl HeaderLookup for Vec<(String, String)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

/// The method and path of a request, plus its headers.
pub struct RequestHead<'a, H: HeaderLookup + ?Sized> {
    pub method: &'a str,
    /// Path with query string, as received.
    pub path: &'a str,
    pub headers: &'a H,
}

/// A response the gateway produces without (or instead of) the provider's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl LocalResponse {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body,
        }
    }

    pub fn event_stream(body: Vec<u8>) -> Self {
        Self {
            status: 200,
            headers: vec![
                ("content-type", "text/event-stream".to_string()),
                ("cache-control", "no-cache".to_string()),
            ],
            body,
        }
    }
}

/// Header lists for the core's tests.
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
