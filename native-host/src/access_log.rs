//! One structured log line per request. Names consumers, models, providers and key ids —
//! never a key.

use std::time::Instant;

use tollgate_core::exchange::Summary;

#[derive(Debug, Clone, Copy)]
pub enum Ending {
    Completed,
    Answered,
    UpstreamError,
    UpstreamTimeout,
    ClientGone,
}

/// `first_byte`: for a relayed body, when its first bytes reached the client (a stream's
/// time to first token).
pub fn record(
    summary: &Summary,
    key_id: Option<&str>,
    started: Instant,
    ending: Ending,
    first_byte: Option<Instant>,
) {
    tracing::info!(
        target: "tollgate::access",
        request_id = summary.request_id.as_deref().unwrap_or("-"),
        consumer = summary.consumer.as_deref().unwrap_or("-"),
        model = summary.model.as_deref().unwrap_or("-"),
        requested_model = summary.requested_model.as_deref().unwrap_or("-"),
        provider = summary.provider.as_deref().unwrap_or("-"),
        key = key_id.unwrap_or("-"),
        status = summary.status.unwrap_or(0),
        stream = summary.stream,
        ending = ?ending,
        // Only requests under a limit are metered; "-" for the others.
        tokens = %summary.charged.map_or("-".to_string(), |c| c.tokens.to_string()),
        cost_micro_usd = %summary.charged.map_or("-".to_string(), |c| c.micro_usd.to_string()),
        usage = match (summary.charged, summary.usage_reported) {
            (None, _) => "-",
            (Some(_), true) => "reported",
            (Some(_), false) => "estimated",
        },
        duration_ms = started.elapsed().as_millis() as u64,
        first_byte_ms = %first_byte.map_or("-".to_string(), |t| {
            t.saturating_duration_since(started).as_millis().to_string()
        }),
    );
}
