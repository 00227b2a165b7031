//! Retrying a failed upstream attempt on another key: which failures are worth another
//! attempt, how many attempts a request gets, how long to wait between them. The native host
//! runs the loop; in Envoy the route's `retry_policy` does, rendered from the same policy.

/// How a provider's failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included; 1 means no retries.
    pub attempts: u32,
    /// No attempt starts later than this after the request reached the gateway.
    pub budget_ms: u64,
    /// Backoff before the second attempt; it doubles per attempt.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            budget_ms: 30_000,
            backoff_ms: 50,
            max_backoff_ms: 1_000,
        }
    }
}

/// Provider answers another key may fix: rate limited (429), refused key (401/403; the key
/// is revoked, so the retry takes another), and server errors.
pub const RETRIED_STATUSES: [u16; 3] = [401, 403, 429];

/// Whether an attempt that ended with `status` is worth another attempt.
pub fn is_retryable(status: u16) -> bool {
    RETRIED_STATUSES.contains(&status) || (500..600).contains(&status)
}

impl RetryPolicy {
    /// How long to wait before attempt number `next` (2 for the first retry), or `None` when
    /// the request may not have it: out of attempts, or it would start past the budget.
    /// `random` is any random number (jitter); the wait is drawn from the upper half of the
    /// exponential step, so attempts of many requests spread out but never come back at once.
    pub fn backoff(&self, next: u32, started_ms: u64, now_ms: u64, random: u64) -> Option<u64> {
        if next > self.attempts || next < 2 {
            return None;
        }
        let step = self
            .backoff_ms
            .saturating_mul(1u64 << (next - 2).min(32))
            .min(self.max_backoff_ms);
        let wait = step / 2 + random % (step - step / 2 + 1);
        let deadline = started_ms.saturating_add(self.budget_ms);
        (now_ms.saturating_add(wait) < deadline).then_some(wait)
    }

    /// Whether an attempt may still start at `now_ms` (Envoy's key role checks this, since
    /// Envoy's retry policy has no time budget of its own).
    pub fn within_budget(&self, started_ms: u64, now_ms: u64) -> bool {
        now_ms < started_ms.saturating_add(self.budget_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 6,
            budget_ms: 60_000,
            backoff_ms: 100,
            max_backoff_ms: 300,
        };
        for random in [0, 1, 7, 99, u64::MAX] {
            let w2 = p.backoff(2, 0, 0, random).unwrap();
            assert!((50..=100).contains(&w2), "{w2}");
            let w3 = p.backoff(3, 0, 0, random).unwrap();
            assert!((100..=200).contains(&w3), "{w3}");
            let w5 = p.backoff(5, 0, 0, random).unwrap();
            assert!((150..=300).contains(&w5), "{w5}");
        }
        // Different random numbers spread the waits.
        assert_ne!(p.backoff(2, 0, 0, 3), p.backoff(2, 0, 0, 40));
    }

    #[test]
    fn no_attempt_past_the_count_or_the_budget() {
        let p = RetryPolicy {
            attempts: 3,
            budget_ms: 1_000,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        };
        assert!(p.backoff(1, 0, 0, 0).is_none());
        assert!(p.backoff(3, 0, 0, 0).is_some());
        assert!(p.backoff(4, 0, 0, 0).is_none());
        // 950 ms in, a wait of at least 50 ms would start at or past the budget.
        assert!(p.backoff(2, 0, 950, 0).is_none());
        assert!(p.backoff(2, 0, 800, 0).is_some());
        assert!(p.within_budget(0, 999));
        assert!(!p.within_budget(0, 1_000));
        let none = RetryPolicy { attempts: 1, ..p };
        assert!(none.backoff(2, 0, 0, 0).is_none());
    }

    #[test]
    fn retryable_answers() {
        for s in [429, 401, 403, 500, 502, 503, 504, 529] {
            assert!(is_retryable(s), "{s}");
        }
        for s in [200, 204, 400, 404, 408, 413, 422] {
            assert!(!is_retryable(s), "{s}");
        }
    }
}
