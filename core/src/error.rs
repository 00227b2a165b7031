//! Every way a request can be refused or fail, and the one place that turns it into the
//! OpenAI-shaped error a client sees. Messages never contain a secret: they name consumers,
//! models and providers, never keys.

use crate::http::LocalResponse;

/// The limit that refused a request, for metrics: `(scope label, limit name)`.
pub type RefusedBy = (std::sync::Arc<str>, &'static str);

/// Why the gateway answers a request itself instead of (or after) calling a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// No credential in `Authorization: Bearer`, `x-api-key` or `api-key`.
    MissingConsumerKey,
    /// A credential was sent but matches no consumer.
    UnknownConsumerKey,
    /// The model exists but this consumer may not use it.
    ModelNotAllowed { model: String },
    /// No public model has this name.
    UnknownModel { model: String },
    /// The body is not the JSON this endpoint takes.
    MalformedBody { detail: String },
    /// The body is larger than `server.max_body_bytes`.
    BodyTooLarge { limit: u64 },
    /// The request asks for something the model's provider cannot do (`n` > 1 of a Claude
    /// model, say): refused, never silently dropped.
    UnsupportedParameter {
        param: String,
        provider_kind: &'static str,
        reason: String,
    },
    /// The provider answered with a response the gateway cannot read: a success body that is
    /// not its API's answer, or a head that is not HTTP (oversized, malformed).
    UpstreamInvalidAnswer { provider: String },
    /// An answer the gateway reads whole to translate it is larger than it holds.
    UpstreamAnswerTooLarge { provider: String, limit: usize },
    /// No endpoint at this path.
    NotFound { path: String },
    /// The endpoint exists but not for this method; `allowed` is the one it takes.
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    /// The client did not send its request in time.
    RequestTimeout,
    /// The provider could not be reached, or reset the connection before answering.
    UpstreamUnavailable { provider: String },
    /// The provider refused the gateway's key (401/403). The client is not told the
    /// provider's words: they may quote part of the key or name the account behind it.
    UpstreamAuthFailed { provider: String },
    /// The provider did not answer within `server.upstream_timeout_ms`.
    UpstreamTimeout { provider: String },
    /// The provider failed with a body that is not JSON (typically an HTML page from its
    /// CDN edge): the client gets the provider's status with an error it can parse.
    UpstreamErrorNotJson { provider: String, status: u16 },
    /// The request reached a part of the gateway that only the gateway itself may call
    /// (Envoy's key role without the gateway role's routing header).
    NotRoutedByGateway,
    /// A rate or concurrency limit is reached; it has room again after `retry_after_ms`.
    RateLimited {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label (`consumer:a`, `model:m`, `keys:p`).
        label: std::sync::Arc<str>,
        retry_after_ms: u64,
    },
    /// A calendar token or cost allowance is spent; it renews after `retry_after_ms`.
    QuotaExhausted {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label (`consumer:a`, `model:m`, `keys:p`).
        label: std::sync::Arc<str>,
        retry_after_ms: u64,
    },
    /// The request alone needs more than a limit will ever allow.
    ExceedsLimit {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label (`consumer:a`, `model:m`, `keys:p`).
        label: std::sync::Arc<str>,
        requested: u64,
        capacity: u64,
    },
    /// Every key of the provider is cooling down after 429s; one is usable again after
    /// `retry_after_ms`.
    KeysCooling {
        provider: String,
        retry_after_ms: u64,
    },
    /// Every key of the provider was refused (401/403).
    KeysRevoked { provider: String },
    /// Every key of the provider is out: its account's quota exhausted (or, for some, still
    /// cooling or revoked); the first is usable again after `retry_after_ms`.
    KeysExhausted {
        provider: String,
        retry_after_ms: u64,
    },
    /// The provider refused the request as larger than its key's limits allow (OpenAI's
    /// "Request too large" 429, Anthropic's 413): no key would take it. `reason` is the
    /// provider's message, account identifiers removed.
    RequestTooLargeForProvider { provider: String, reason: String },
    /// Attempts on the provider's keys failed until the retry budget was spent (Envoy: a
    /// retry Envoy scheduled would start past `retry.budget_ms`).
    RetryBudgetSpent { provider: String, attempts: u32 },
    /// A prompt call's variable is missing, unknown, of the wrong type or too long.
    InvalidPromptVariable { variable: String, problem: String },
    /// A prompt call pinned a version the template does not have.
    PromptVersionNotFound {
        prompt: String,
        requested: String,
        available: Vec<u32>,
    },
    /// The prompt exists but this consumer may not call it.
    PromptNotAllowed { prompt: String },
    /// The prompt answers JSON, which is not streamed.
    PromptCannotStream { prompt: String },
    /// A prompt's answer could not be shaped: a `json` prompt's model answered something that
    /// is not JSON, or the answer had no text (its usage is charged all the same).
    PromptOutputInvalid { prompt: String, detail: String },
    /// A guard rule matched the request's messages. Names the rule, never the text.
    ContentRejected { rule: String },
    /// Shared state (counters, key health) could not be updated; refusing beats guessing.
    SharedStateUnavailable { detail: String },
    /// The gateway is reading as many request bodies as its memory budget allows
    /// (`server.max_body_memory_bytes`); it has room again in a moment.
    GatewayBusy,
    /// The host failed an operation it should not fail (a bug or resource exhaustion).
    Internal { detail: String },
}

impl GatewayError {
    /// HTTP status the client receives.
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingConsumerKey | Self::UnknownConsumerKey => 401,
            Self::ModelNotAllowed { .. }
            | Self::PromptNotAllowed { .. }
            | Self::NotRoutedByGateway => 403,
            Self::UnknownModel { .. }
            | Self::NotFound { .. }
            | Self::PromptVersionNotFound { .. } => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::RequestTimeout => 408,
            Self::MalformedBody { .. }
            | Self::UnsupportedParameter { .. }
            | Self::ExceedsLimit { .. }
            | Self::InvalidPromptVariable { .. }
            | Self::PromptCannotStream { .. }
            | Self::ContentRejected { .. } => 400,
            Self::RateLimited { .. } | Self::QuotaExhausted { .. } | Self::KeysCooling { .. } => {
                429
            }
            Self::KeysRevoked { .. } | Self::KeysExhausted { .. } => 503,
            Self::RequestTooLargeForProvider { .. } => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::UpstreamUnavailable { .. }
            | Self::UpstreamAuthFailed { .. }
            | Self::UpstreamInvalidAnswer { .. }
            | Self::UpstreamAnswerTooLarge { .. }
            | Self::RetryBudgetSpent { .. }
            | Self::PromptOutputInvalid { .. } => 502,
            Self::SharedStateUnavailable { .. } | Self::GatewayBusy => 503,
            Self::UpstreamErrorNotJson { status, .. } if (400..600).contains(status) => *status,
            Self::UpstreamErrorNotJson { .. } => 502,
            Self::Internal { .. } => 500,
            Self::UpstreamTimeout { .. } => 504,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`: stable, machine-readable.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingConsumerKey => "missing_api_key",
            Self::UnknownConsumerKey => "invalid_api_key",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::UnknownModel { .. } => "model_not_found",
            Self::MalformedBody { .. } => "invalid_request_body",
            Self::UnsupportedParameter { .. } => "unsupported_parameter",
            Self::UpstreamInvalidAnswer { .. } => "upstream_invalid_answer",
            Self::UpstreamAnswerTooLarge { .. } => "upstream_answer_too_large",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::KeysCooling { .. } => "provider_keys_cooling",
            Self::KeysRevoked { .. } => "provider_keys_revoked",
            Self::KeysExhausted { .. } => "provider_keys_exhausted",
            Self::RequestTooLargeForProvider { .. } => "request_too_large_for_provider",
            Self::QuotaExhausted { .. } => "quota_exhausted",
            Self::ExceedsLimit { .. } => "request_exceeds_limit",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::UpstreamAuthFailed { .. } => "upstream_auth_failed",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::RetryBudgetSpent { .. } => "upstream_retry_budget_spent",
            Self::InvalidPromptVariable { .. } => "invalid_prompt_variable",
            Self::PromptVersionNotFound { .. } => "prompt_version_not_found",
            Self::PromptNotAllowed { .. } => "prompt_not_allowed",
            Self::PromptCannotStream { .. } => "prompt_cannot_stream",
            Self::PromptOutputInvalid { .. } => "prompt_output_invalid",
            Self::ContentRejected { .. } => "content_rejected",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamErrorNotJson { .. } => "upstream_error",
            Self::NotRoutedByGateway => "not_routed_by_gateway",
            Self::SharedStateUnavailable { .. } => "shared_state_unavailable",
            Self::GatewayBusy => "gateway_busy",
            Self::Internal { .. } => "internal_error",
        }
    }

    /// The `code` label of `tollgate_requests_total` for this refusal: the error's code, but
    /// for the families operators alert on as one (limits, key pools, upstream failures).
    pub fn metric_code(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::ExceedsLimit { .. } => "exceeds_limit",
            Self::KeysCooling { .. } => "keys_cooling",
            Self::KeysRevoked { .. } => "keys_revoked",
            Self::KeysExhausted { .. } => "keys_exhausted",
            Self::UpstreamAuthFailed { .. }
            | Self::UpstreamInvalidAnswer { .. }
            | Self::UpstreamAnswerTooLarge { .. }
            | Self::UpstreamErrorNotJson { .. }
            | Self::RetryBudgetSpent { .. } => "upstream_error",
            Self::MissingConsumerKey | Self::UnknownConsumerKey => "unauthenticated",
            other => other.code(),
        }
    }

    /// The limit that refused the request: `(scope label, limit name)`.
    pub fn refused_by(&self) -> Option<RefusedBy> {
        match self {
            Self::RateLimited { label, limit, .. }
            | Self::QuotaExhausted { label, limit, .. }
            | Self::ExceedsLimit { label, limit, .. } => Some((label.clone(), *limit)),
            _ => None,
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::UpstreamUnavailable { .. }
                | Self::UpstreamTimeout { .. }
                | Self::UpstreamErrorNotJson { .. }
                | Self::RetryBudgetSpent { .. }
                | Self::SharedStateUnavailable { .. }
                | Self::GatewayBusy
                | Self::RateLimited { .. }
                | Self::QuotaExhausted { .. }
                | Self::KeysCooling { .. }
        )
    }

    pub fn message(&self) -> String {
        match self {
            Self::MissingConsumerKey => "Missing API key: send it as `Authorization: Bearer <key>`, `x-api-key` or `api-key`.".into(),
            Self::UnknownConsumerKey => "Invalid API key.".into(),
            Self::ModelNotAllowed { model } => format!("This API key may not use the model `{model}`."),
            Self::UnknownModel { model } => format!("The model `{model}` does not exist."),
            Self::MalformedBody { detail } => format!("Malformed request body: {detail}"),
            Self::UnsupportedParameter { param, provider_kind, reason } => format!("`{param}` is not supported by this model's provider (kind `{provider_kind}`): {reason}"),
            Self::UpstreamInvalidAnswer { provider } => format!("The provider `{provider}` answered with a response the gateway cannot read."),
            Self::UpstreamAnswerTooLarge { provider, limit } => format!("The provider `{provider}` answered with more than {limit} bytes, which the gateway cannot translate."),
            Self::RateLimited { limit, scope, retry_after_ms, .. } => format!(
                "Rate limit reached: `{limit}` of {scope}. Retry after {}.",
                crate::limits::format_duration(*retry_after_ms)
            ),
            Self::KeysCooling { provider, retry_after_ms } => format!(
                "Every key of provider `{provider}` is rate limited by the provider. Retry after {}.",
                crate::limits::format_duration(*retry_after_ms)
            ),
            Self::KeysRevoked { provider } => format!("Every key of provider `{provider}` was refused by the provider."),
            Self::KeysExhausted { provider, retry_after_ms } => format!(
                "Every key of provider `{provider}` is out of quota at the provider. Retry after {}.",
                crate::limits::format_duration(*retry_after_ms)
            ),
            Self::RequestTooLargeForProvider { provider, reason } => format!(
                "The provider `{provider}` refused this request as too large for its limits: {reason}"
            ),
            Self::QuotaExhausted { limit, scope, retry_after_ms, .. } => format!(
                "Allowance spent: `{limit}` of {scope}. It renews in {}.",
                crate::limits::format_duration(*retry_after_ms)
            ),
            Self::ExceedsLimit { limit, scope, requested, capacity, .. } => {
                let unit = if limit.contains("cost") { " millionths of a dollar" } else if limit.contains("token") { " tokens" } else { "" };
                format!(
                    "This request needs {requested}{unit} (prompt estimate plus max_tokens) but `{limit}` of {scope} allows {capacity}{unit}; lower max_tokens or shorten the prompt."
                )
            }
            Self::BodyTooLarge { limit } => format!("Request body is larger than the limit of {limit} bytes."),
            Self::NotFound { path } => format!("No endpoint at `{path}`."),
            Self::MethodNotAllowed { method, path, allowed } => format!("Method {method} is not allowed on `{path}`; use {allowed}."),
            Self::RequestTimeout => "The request was not received in time.".into(),
            Self::UpstreamAuthFailed { provider } => format!("The provider `{provider}` refused the gateway's credentials."),
            Self::UpstreamUnavailable { provider } => format!("The provider `{provider}` could not be reached."),
            Self::InvalidPromptVariable { variable, problem } => format!("Variable `{variable}` {problem}."),
            Self::PromptVersionNotFound { prompt, requested, available } => format!(
                "Prompt `{prompt}` has no version `{requested}`; it has {}.",
                available.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
            ),
            Self::PromptNotAllowed { prompt } => format!("This API key may not call the prompt `{prompt}`."),
            Self::PromptCannotStream { prompt } => format!("Prompt `{prompt}` answers JSON, which is not streamed; call it without `stream=true`."),
            Self::PromptOutputInvalid { prompt, detail } => format!("Prompt `{prompt}` could not shape the model's answer: {detail}."),
            Self::ContentRejected { rule } => format!("The request was rejected by the content rule `{rule}`."),
            Self::RetryBudgetSpent { provider, attempts } => format!("The provider `{provider}` failed {attempts} attempts, and the retry time budget is spent."),
            Self::UpstreamTimeout { provider } => format!("The provider `{provider}` did not answer in time."),
            Self::UpstreamErrorNotJson { provider, status } => format!("The provider `{provider}` failed with status {status} and a body that is not JSON (an error page of its network edge)."),
            Self::NotRoutedByGateway => "This request did not pass through the gateway.".into(),
            Self::SharedStateUnavailable { detail } => format!("The gateway's shared state is unavailable ({detail}); try again."),
            Self::GatewayBusy => "The gateway is reading too many request bodies at once; retry shortly.".into(),
            Self::Internal { detail } => format!("Internal gateway error: {detail}."),
        }
    }

    /// The OpenAI-shaped body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        let param = match self {
            Self::UnsupportedParameter { param, .. } => serde_json::Value::from(param.as_str()),
            _ => serde_json::Value::Null,
        };
        let v = serde_json::json!({
            "error": { "message": self.message(), "type": self.kind(), "param": param, "code": self.code() }
        });
        v.to_string().into_bytes()
    }

    /// The whole response a host sends for this error.
    pub fn respond(&self) -> LocalResponse {
        let mut r = LocalResponse::json(self.status(), self.body());
        match self {
            Self::MethodNotAllowed { allowed, .. } => {
                r.headers.push(("allow", (*allowed).to_string()))
            }
            Self::GatewayBusy => r.headers.push(("retry-after", "1".to_string())),
            Self::RateLimited { retry_after_ms, .. }
            | Self::QuotaExhausted { retry_after_ms, .. }
            | Self::KeysCooling { retry_after_ms, .. }
            | Self::KeysExhausted { retry_after_ms, .. } => {
                r.headers
                    .push(("retry-after", retry_after_ms.div_ceil(1_000).to_string()));
                r.headers
                    .push(("retry-after-ms", retry_after_ms.to_string()));
            }
            _ => {}
        }
        r
    }
}

impl From<crate::limits::Refusal> for GatewayError {
    fn from(r: crate::limits::Refusal) -> Self {
        use crate::limits::Refusal;
        match r {
            Refusal::NotNow {
                limit,
                scope,
                label,
                retry_after_ms,
            } => Self::RateLimited {
                limit,
                scope,
                label,
                retry_after_ms,
            },
            Refusal::Exhausted {
                limit,
                scope,
                label,
                retry_after_ms,
            } => Self::QuotaExhausted {
                limit,
                scope,
                label,
                retry_after_ms,
            },
            Refusal::Never {
                limit,
                scope,
                label,
                requested,
                capacity,
            } => Self::ExceedsLimit {
                limit,
                scope,
                label,
                requested,
                capacity,
            },
            Refusal::Store(e) => Self::SharedStateUnavailable {
                detail: e.to_string(),
            },
        }
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = GatewayError::ModelNotAllowed {
            model: "gpt-4o".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4o"));
        assert_eq!(e.status(), 403);
    }

    #[test]
    fn every_wait_says_when_to_retry() {
        for e in [
            GatewayError::RateLimited {
                limit: "x",
                scope: "s".into(),
                label: "consumer:s".into(),
                retry_after_ms: 1_500,
            },
            GatewayError::QuotaExhausted {
                limit: "x",
                scope: "s".into(),
                label: "consumer:s".into(),
                retry_after_ms: 1_500,
            },
            GatewayError::KeysCooling {
                provider: "p".into(),
                retry_after_ms: 1_500,
            },
        ] {
            let r = e.respond();
            assert_eq!(r.status, 429);
            assert!(
                r.headers.contains(&("retry-after", "2".to_string())),
                "{e:?}"
            );
            assert!(
                r.headers.contains(&("retry-after-ms", "1500".to_string())),
                "{e:?}"
            );
        }
    }

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(GatewayError::UnknownConsumerKey.status(), 401);
        assert_eq!(
            GatewayError::MalformedBody { detail: "x".into() }.status(),
            400
        );
        assert_eq!(GatewayError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(
            GatewayError::UpstreamTimeout {
                provider: "p".into()
            }
            .status(),
            504
        );
        assert!(GatewayError::UpstreamTimeout {
            provider: "p".into()
        }
        .retryable());
        assert!(!GatewayError::UnknownConsumerKey.retryable());
    }
}
