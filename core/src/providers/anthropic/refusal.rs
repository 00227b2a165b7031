//! Anthropic's refusals, from the status and the error body `{"type": "error", "error":
//! {"type", "message"}, "request_id"}`. An account out of credit answers 400 (an
//! `invalid_request_error` whose message says so) or 402 `billing_error`; a request over the
//! size limit 413 `request_too_large`; an overloaded API 529 `overloaded_error`.
//! Anthropic's rate limits are per organization and per model *class*; a rate-limited key
//! cools key-wide (see `refusal::limits_per_model`).

use crate::providers::refusal::{ErrorFields, RefusalClass};

/// What the messages of an exhausted account say (lower case).
const QUOTA_MESSAGES: [&str; 2] = [
    "credit balance is too low",
    "reached your specified api usage limits",
];

/// The class of an Anthropic refusal, or `None` when this table does not recognise it (the
/// status alone then decides, see `refusal::classify`).
pub fn classify(status: u16, body: &[u8]) -> Option<RefusalClass> {
    if matches!(status, 401 | 403) {
        return Some(RefusalClass::Auth);
    }
    let e = ErrorFields::read(body)?;
    match status {
        402 => Some(RefusalClass::QuotaExhausted),
        400 if e.kind_is("invalid_request_error")
            && QUOTA_MESSAGES.iter().any(|m| e.message_has(m)) =>
        {
            Some(RefusalClass::QuotaExhausted)
        }
        400 if e.kind_is("billing_error") => Some(RefusalClass::QuotaExhausted),
        413 if e.kind_is("request_too_large") => Some(RefusalClass::TooLarge),
        429 if e.kind_is("rate_limit_error") => {
            Some(RefusalClass::RateLimited { per_model: false })
        }
        529 => Some(RefusalClass::Overloaded),
        _ if e.kind_is("overloaded_error") => Some(RefusalClass::Overloaded),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::providers::refusal::classify;
    use crate::providers::refusal::RefusalClass::*;
    use crate::providers::ProviderKind;

    fn anthropic(status: u16, body: &str) -> Option<crate::providers::refusal::RefusalClass> {
        classify(ProviderKind::Anthropic, status, body.as_bytes())
    }

    // Bodies as Anthropic sends them (ids replaced).
    const RATE: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization (00000000-0000-0000-0000-000000000000) of 50,000 input tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later."},"request_id":"req_011CVexample"}"#;
    const CREDIT: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."},"request_id":"req_011CVexample"}"#;
    const USAGE_LIMIT: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC."}}"#;
    const BILLING: &str = r#"{"type":"error","error":{"type":"billing_error","message":"There is an issue with your account's billing."}}"#;
    const TOO_LARGE: &str = r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#;
    const OVERLOADED: &str = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011CVexample"}"#;
    const API_ERROR: &str =
        r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
    const AUTH: &str =
        r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
    const BAD_REQUEST: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;

    #[test]
    fn anthropic_refusals_are_told_apart() {
        assert_eq!(anthropic(429, RATE), Some(RateLimited { per_model: false }));
        assert_eq!(anthropic(400, CREDIT), Some(QuotaExhausted));
        assert_eq!(anthropic(400, USAGE_LIMIT), Some(QuotaExhausted));
        assert_eq!(anthropic(402, BILLING), Some(QuotaExhausted));
        assert_eq!(anthropic(413, TOO_LARGE), Some(TooLarge));
        assert_eq!(anthropic(529, OVERLOADED), Some(Overloaded));
        assert_eq!(anthropic(529, ""), Some(Overloaded));
        assert_eq!(anthropic(503, ""), Some(Overloaded));
        assert_eq!(anthropic(500, API_ERROR), Some(ServerError));
        assert_eq!(anthropic(401, AUTH), Some(Auth));
        assert_eq!(anthropic(400, BAD_REQUEST), Some(Other));
        assert_eq!(anthropic(429, ""), Some(RateLimited { per_model: false }));
    }
}
