//! What a provider's refusal means, told apart from its status, its error body and its kind:
//! the class decides what happens to the key that was refused (cooled, taken out for long,
//! revoked, or left alone) and whether the request goes on to another key. One table per
//! provider kind, in its module (`openai::refusal`, `anthropic::refusal`); what no table
//! recognises falls back on the status alone. Pure: no IO, no clock.

use super::ProviderKind;

/// Why a provider refused an attempt, as far as the key and the retry are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalClass {
    /// Too many requests or tokens for now: the key cools until the provider's time. With
    /// `per_model`, the limit is the upstream model's (OpenAI's limits are per model): the
    /// key cools for that model only, and keeps serving the others.
    RateLimited { per_model: bool },
    /// The account behind the key has no credit or spend allowance left: waiting seconds
    /// will not help. The key is out for `key_health.exhausted_ms`.
    QuotaExhausted,
    /// The request alone is more than the key's limits take (OpenAI's "Request too large"
    /// 429, Anthropic's 413): the request's fault. The key is not touched, and other keys
    /// (normally under the same limits) are not tried.
    TooLarge,
    /// The provider is overloaded (503, Anthropic's 529): its fault, not the key's. The key
    /// is not touched; the request is retried.
    Overloaded,
    /// Another server error (5xx): as overloaded.
    ServerError,
    /// The key was refused (401, 403): revoked until its re-probe.
    Auth,
    /// Any other refusal (a 4xx about the request itself): relayed, not retried, the key not
    /// touched.
    Other,
}

impl RefusalClass {
    /// Whether another attempt (normally on another key) may succeed.
    pub fn retried(self) -> bool {
        !matches!(self, Self::TooLarge | Self::Other)
    }

    /// The class of a refusal nothing more is known of than its status.
    pub fn of_status(status: u16) -> Option<Self> {
        Some(match status {
            0..=399 => return None,
            401 | 403 => Self::Auth,
            429 => Self::RateLimited { per_model: false },
            413 => Self::TooLarge,
            503 | 529 => Self::Overloaded,
            500..=599 => Self::ServerError,
            _ => Self::Other,
        })
    }
}

/// The class of an answer with `status` and error `body` from a provider of `kind`; `None`
/// for an answer that is no refusal (below 400).
pub fn classify(kind: ProviderKind, status: u16, body: &[u8]) -> Option<RefusalClass> {
    if status < 400 {
        return None;
    }
    let table = match kind {
        ProviderKind::OpenAi => super::openai::refusal::classify(status, body),
        ProviderKind::Anthropic => super::anthropic::refusal::classify(status, body),
        ProviderKind::Mock => None,
    };
    table.or_else(|| RefusalClass::of_status(status))
}

/// Whether a provider of `kind` sets its rate limits per model, so that a rate-limited key
/// cools per upstream model (and hosts create one health record per key and model).
pub fn limits_per_model(kind: ProviderKind) -> bool {
    // Anthropic's limits are per model *class* (e.g. every Sonnet 4.x shares one), a
    // grouping that changes with each release: its keys cool key-wide.
    matches!(kind, ProviderKind::OpenAi)
}

/// Most bytes of a provider's error message quoted to a client.
const MAX_REASON_CHARS: usize = 600;

/// The provider's own words from an error body (`error.message`, the shape of OpenAI's and
/// Anthropic's errors alike), account identifiers removed and cut to a sane length.
pub fn provider_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = v.get("error")?.get("message")?.as_str()?.trim();
    if message.is_empty() {
        return None;
    }
    let scrubbed = scrub_account_ids_str(message);
    let mut out: String = scrubbed.chars().take(MAX_REASON_CHARS).collect();
    if out.len() < scrubbed.len() {
        out.push('…');
    }
    Some(out)
}

/// The error fields the tables read, from `{"error": {"type", "code", "message"}}`.
#[derive(Debug, Default)]
pub(crate) struct ErrorFields {
    pub kind: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
}

impl ErrorFields {
    pub(crate) fn read(body: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let e = v.get("error")?;
        let text = |name: &str| {
            e.get(name).and_then(|f| match f {
                serde_json::Value::String(s) => Some(s.clone()),
                // Azure writes its code as a number in some versions.
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        Some(Self {
            kind: text("type"),
            code: text("code"),
            message: text("message"),
        })
    }

    pub(crate) fn kind_is(&self, want: &str) -> bool {
        self.kind.as_deref() == Some(want)
    }

    pub(crate) fn code_is(&self, want: &str) -> bool {
        self.code.as_deref() == Some(want)
    }

    pub(crate) fn message_has(&self, needle: &str) -> bool {
        self.message
            .as_deref()
            .is_some_and(|m| m.to_ascii_lowercase().contains(needle))
    }
}

/// Account identifiers providers put in their messages, removed from anything relayed:
/// OpenAI's organization (`org-…`) and project (`proj_…`) ids, and the organization UUID
/// Anthropic writes in parentheses.
const ACCOUNT_ID_PREFIXES: [&[u8]; 2] = [b"org-", b"proj_"];

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The length of the account id that starts at `i`, if one does (0 when none).
fn account_id_at(body: &[u8], i: usize) -> usize {
    let rest = body.get(i..).unwrap_or_default();
    let at_boundary = i == 0 || body.get(i - 1).is_some_and(|b| !is_id_byte(*b));
    if !at_boundary {
        return 0;
    }
    for prefix in ACCOUNT_ID_PREFIXES {
        if rest.starts_with(prefix) {
            let id = rest
                .get(prefix.len()..)
                .unwrap_or_default()
                .iter()
                .take_while(|b| is_id_byte(**b))
                .count();
            return if id == 0 { 0 } else { prefix.len() + id };
        }
    }
    // `(8-4-4-4-12 hex)`
    let uuid = |s: &[u8]| {
        s.len() == 36
            && s.iter().enumerate().all(|(n, b)| match n {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    };
    if rest.first() == Some(&b'(')
        && rest.get(37) == Some(&b')')
        && rest.get(1..37).is_some_and(uuid)
    {
        return 38;
    }
    0
}

/// `body` with every account id removed (with the space before it), or `None` when it has
/// none. Works on raw bytes, so on a JSON error body as well as on a message: an id is
/// plain ASCII, never escaped.
pub fn scrub_account_ids(body: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    let mut copied = 0;
    while i < body.len() {
        let id_len = account_id_at(body, i);
        if id_len == 0 {
            i += 1;
            continue;
        }
        // Drop the space before the id too, so that no double space is left.
        let start = if i > copied && body.get(i - 1) == Some(&b' ') {
            i - 1
        } else {
            i
        };
        let buf = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
        buf.extend_from_slice(body.get(copied..start).unwrap_or_default());
        i += id_len;
        copied = i;
    }
    let mut buf = out?;
    buf.extend_from_slice(body.get(copied..).unwrap_or_default());
    Some(buf)
}

/// `scrub_account_ids` over text.
pub fn scrub_account_ids_str(text: &str) -> std::borrow::Cow<'_, str> {
    match scrub_account_ids(text.as_bytes()) {
        // Only ASCII ids and a space were removed: still UTF-8.
        Some(bytes) => String::from_utf8(bytes).map_or(std::borrow::Cow::Borrowed(text), |s| {
            std::borrow::Cow::Owned(s)
        }),
        None => std::borrow::Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_alone_fall_back_on_a_class() {
        use RefusalClass::*;
        for (status, want) in [
            (200, None),
            (304, None),
            (401, Some(Auth)),
            (403, Some(Auth)),
            (429, Some(RateLimited { per_model: false })),
            (413, Some(TooLarge)),
            (503, Some(Overloaded)),
            (529, Some(Overloaded)),
            (500, Some(ServerError)),
            (502, Some(ServerError)),
            (400, Some(Other)),
            (404, Some(Other)),
        ] {
            assert_eq!(classify(ProviderKind::Mock, status, b""), want, "{status}");
            assert_eq!(
                classify(ProviderKind::OpenAi, status, b"<html>"),
                want,
                "{status}"
            );
        }
        assert!(!TooLarge.retried() && !Other.retried());
        assert!(QuotaExhausted.retried() && Overloaded.retried() && Auth.retried());
    }

    #[test]
    fn account_ids_are_scrubbed() {
        let m = "Rate limit reached for gpt-4o in organization org-AbC123xyz on tokens per min \
                 (TPM): Limit 30000, Used 29000. Project proj_9Zk1 too.";
        let s = scrub_account_ids_str(m);
        assert_eq!(
            s,
            "Rate limit reached for gpt-4o in organization on tokens per min (TPM): Limit \
             30000, Used 29000. Project too."
        );
        // In a JSON body, inside the string.
        let body = br#"{"error":{"message":"x org-1a2b","type":"tokens"}}"#;
        assert_eq!(
            scrub_account_ids(body).unwrap(),
            br#"{"error":{"message":"x","type":"tokens"}}"#.to_vec()
        );
        // Nothing to scrub: nothing allocated; lookalikes are left alone.
        assert_eq!(scrub_account_ids(b"my-org-chart, org- alone, borg-x"), None);
        assert_eq!(scrub_account_ids(b"org-first").unwrap(), b"".to_vec());
        // Anthropic's organization UUID.
        assert_eq!(
            scrub_account_ids_str(
                "the rate limit for your organization (0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0) of 50,000"
            ),
            "the rate limit for your organization of 50,000"
        );
    }

    #[test]
    fn the_providers_message_is_quoted_without_ids() {
        let body = br#"{"error":{"message":"Request too large for gpt-4o in organization org-mock on tokens per min (TPM): Limit 100, Requested 5000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        let m = provider_message(body).unwrap();
        assert!(!m.contains("org-"), "{m}");
        assert!(
            m.starts_with("Request too large for gpt-4o in organization on"),
            "{m}"
        );
        assert_eq!(provider_message(b"not json"), None);
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(5_000));
        assert!(provider_message(long.as_bytes()).unwrap().chars().count() <= 601);
    }
}
