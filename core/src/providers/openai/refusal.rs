//! OpenAI's refusals (and Azure OpenAI's, and those of OpenAI-compatible servers that copy
//! them), from the status and the error body `{"error": {"message", "type", "param",
//! "code"}}`. Every 429 is not a rate limit: `insufficient_quota` is an account out of
//! credit, and "Request too large" a request no key's per-minute limit can take.
//! OpenAI's rate limits are per model (and per organization or project), so a rate limit
//! cools the key for the model only.

use crate::providers::refusal::{ErrorFields, RefusalClass};

/// Codes of a 429 (type `insufficient_quota`) or 400 that mean the account has nothing left
/// to spend: no retry within minutes helps.
const QUOTA_CODES: [&str; 6] = [
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "billing_hard_limit_reached",
];

/// The class of an OpenAI refusal, or `None` when this table does not recognise it (the
/// status alone then decides, see `refusal::classify`).
pub fn classify(status: u16, body: &[u8]) -> Option<RefusalClass> {
    if matches!(status, 401 | 403) {
        return Some(RefusalClass::Auth);
    }
    let e = ErrorFields::read(body)?;
    let quota = e.kind_is("insufficient_quota") || QUOTA_CODES.iter().any(|c| e.code_is(c));
    match status {
        429 | 400 if quota => Some(RefusalClass::QuotaExhausted),
        // "Request too large for gpt-4o in organization org-… on tokens per min (TPM):
        // Limit 30000, Requested 36000." — type `tokens`, code `rate_limit_exceeded`.
        429 if e
            .message
            .as_deref()
            .is_some_and(|m| m.trim_start().starts_with("Request too large")) =>
        {
            Some(RefusalClass::TooLarge)
        }
        // Sent when an organization's traffic grows too fast: the account's, not a model's.
        429 if e.code_is("slow_down") => Some(RefusalClass::RateLimited { per_model: false }),
        // OpenAI: type `requests` or `tokens` (per minute or per day), code
        // `rate_limit_exceeded`. Azure OpenAI: code "429", per deployment (one model).
        429 if e.code_is("rate_limit_exceeded")
            || e.kind_is("requests")
            || e.kind_is("tokens")
            || e.code_is("429") =>
        {
            Some(RefusalClass::RateLimited { per_model: true })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::refusal::classify as by_kind;
    use crate::providers::ProviderKind;
    use RefusalClass::*;

    fn openai(status: u16, body: &str) -> Option<RefusalClass> {
        by_kind(ProviderKind::OpenAi, status, body.as_bytes())
    }

    // Bodies as OpenAI sends them (ids replaced).
    const RPM: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc123 on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    const TPM: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-abc123 on tokens per min (TPM): Limit 200000, Used 199500, Requested 1200. Please try again in 210ms. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    const QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    const SPEND: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"project_spend_limit_exceeded"}}"#;
    const TOO_LARGE: &str = r#"{"error":{"message":"Request too large for gpt-4o in organization org-abc123 on tokens per min (TPM): Limit 30000, Requested 36000. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    const AZURE: &str = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-15-preview have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#;
    const OVERLOADED: &str = r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}"#;
    const BAD_KEY: &str = r#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    const CONTEXT: &str = r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    const HARD_LIMIT: &str = r#"{"error":{"message":"Billing hard limit has been reached","type":"invalid_request_error","param":null,"code":"billing_hard_limit_reached"}}"#;

    #[test]
    fn openai_refusals_are_told_apart() {
        assert_eq!(openai(429, RPM), Some(RateLimited { per_model: true }));
        assert_eq!(openai(429, TPM), Some(RateLimited { per_model: true }));
        assert_eq!(openai(429, QUOTA), Some(QuotaExhausted));
        assert_eq!(openai(429, SPEND), Some(QuotaExhausted));
        assert_eq!(openai(400, HARD_LIMIT), Some(QuotaExhausted));
        assert_eq!(openai(429, TOO_LARGE), Some(TooLarge));
        assert_eq!(openai(429, AZURE), Some(RateLimited { per_model: true }));
        assert_eq!(openai(503, OVERLOADED), Some(Overloaded));
        assert_eq!(openai(500, OVERLOADED), Some(ServerError));
        assert_eq!(openai(401, BAD_KEY), Some(Auth));
        assert_eq!(openai(403, ""), Some(Auth));
        assert_eq!(openai(400, CONTEXT), Some(Other));
        // A 429 nothing is known of: a rate limit, key-wide.
        assert_eq!(openai(429, ""), Some(RateLimited { per_model: false }));
        assert_eq!(
            openai(429, "<html>"),
            Some(RateLimited { per_model: false })
        );
        assert_eq!(
            openai(
                429,
                r#"{"error":{"message":"slow down","code":"slow_down"}}"#
            ),
            Some(RateLimited { per_model: false })
        );
        assert_eq!(openai(200, RPM), None);
    }
}
