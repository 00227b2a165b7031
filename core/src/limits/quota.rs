//! Calendar quotas: a fixed allowance per UTC day or month that resets at the boundary. The
//! state is one integer: the period's index in the top bits, the amount used in the low 44.

/// The calendar period a quota covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

use crate::calendar::{civil_from_days, days_from_civil};

const USED_BITS: u32 = 44;
const USED_MASK: u64 = (1 << USED_BITS) - 1;
const DAY_MS: u64 = 86_400_000;

/// An allowance of `limit` units per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

/// Why a reservation does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The period's allowance is spent; it renews at `reset_ms` (Unix ms).
    Exhausted { reset_ms: u64 },
    /// Larger than a whole period's allowance.
    Never,
}

impl Quota {
    /// Largest limit the state can count to.
    pub const MAX_LIMIT: u64 = USED_MASK;

    /// What the current period has used.
    pub fn used_now(&self, state: Option<u64>, now_ms: u64) -> u64 {
        match state {
            Some(s) if s >> USED_BITS == period_index(self.period, now_ms) => s & USED_MASK,
            _ => 0,
        }
    }

    fn pack(&self, now_ms: u64, used: u64) -> u64 {
        (period_index(self.period, now_ms) << USED_BITS) | used.min(USED_MASK)
    }

    pub fn reserve(&self, state: Option<u64>, now_ms: u64, units: u64) -> Result<u64, Refusal> {
        if units > self.limit {
            return Err(Refusal::Never);
        }
        let used = self.used_now(state, now_ms);
        if used.saturating_add(units) > self.limit {
            return Err(Refusal::Exhausted {
                reset_ms: period_end_ms(self.period, now_ms),
            });
        }
        Ok(self.pack(now_ms, used + units))
    }

    /// Applies the difference between reserved and used. If the period turned over since the
    /// reservation (made at `reserved_at_ms`), the new period is charged only what was used
    /// beyond the reservation, and refunds nothing.
    pub fn settle(
        &self,
        state: Option<u64>,
        now_ms: u64,
        reserved_at_ms: u64,
        reserved: u64,
        used: u64,
    ) -> u64 {
        let now_period = period_index(self.period, now_ms);
        let same_period = state.is_some_and(|s| s >> USED_BITS == now_period)
            && period_index(self.period, reserved_at_ms) == now_period;
        let current = self.used_now(state, now_ms);
        let next = if used >= reserved {
            current.saturating_add(used - reserved)
        } else if same_period {
            current.saturating_sub(reserved - used)
        } else {
            current
        };
        self.pack(now_ms, next)
    }

    pub fn remaining(&self, state: Option<u64>, now_ms: u64) -> u64 {
        self.limit.saturating_sub(self.used_now(state, now_ms))
    }

    /// Milliseconds until the allowance renews.
    pub fn reset_ms(&self, now_ms: u64) -> u64 {
        period_end_ms(self.period, now_ms) - now_ms
    }
}

/// Days since 1970-01-01 or months since 1970-01.
fn period_index(period: Period, now_ms: u64) -> u64 {
    let days = now_ms / DAY_MS;
    match period {
        Period::Day => days,
        Period::Month => {
            let (y, m, _) = civil_from_days(days);
            (y - 1970) * 12 + (m - 1)
        }
    }
}

/// The first millisecond of the next period.
fn period_end_ms(period: Period, now_ms: u64) -> u64 {
    let days = now_ms / DAY_MS;
    match period {
        Period::Day => (days + 1) * DAY_MS,
        Period::Month => {
            let (y, m, _) = civil_from_days(days);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY_MS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-22T10:00:00Z
    const NOW: u64 = 1_795_341_600_000;

    #[test]
    fn periods_end_at_utc_boundaries() {
        assert_eq!(
            period_end_ms(Period::Day, NOW),
            days_from_civil(2026, 11, 23) * DAY_MS
        );
        assert_eq!(
            period_end_ms(Period::Month, NOW),
            days_from_civil(2026, 12, 1) * DAY_MS
        );
        let dec = days_from_civil(2026, 12, 31) * DAY_MS + 5;
        assert_eq!(
            period_end_ms(Period::Month, dec),
            days_from_civil(2027, 1, 1) * DAY_MS
        );
    }

    #[test]
    fn a_quota_is_spent_then_renews_at_the_boundary() {
        let q = Quota {
            limit: 100,
            period: Period::Day,
        };
        let s = q.reserve(None, NOW, 70).unwrap();
        let s = q.reserve(Some(s), NOW, 30).unwrap();
        assert_eq!(q.remaining(Some(s), NOW), 0);
        let tomorrow = period_end_ms(Period::Day, NOW);
        assert_eq!(
            q.reserve(Some(s), NOW, 1),
            Err(Refusal::Exhausted { reset_ms: tomorrow })
        );
        assert_eq!(q.reset_ms(NOW), tomorrow - NOW);
        assert!(q.reserve(Some(s), tomorrow, 100).is_ok());
        assert_eq!(q.reserve(None, NOW, 101), Err(Refusal::Never));
    }

    #[test]
    fn settle_refunds_within_the_period_and_charges_overruns() {
        let q = Quota {
            limit: 1_000,
            period: Period::Month,
        };
        let s = q.reserve(None, NOW, 500).unwrap();
        let left = |state: u64, at: u64| q.remaining(Some(state), at);
        assert_eq!(left(q.settle(Some(s), NOW, NOW, 500, 200), NOW), 800);
        assert_eq!(left(q.settle(Some(s), NOW, NOW, 500, 700), NOW), 300);
        // Overrun beyond the limit: nothing remains, and nothing underflows.
        assert_eq!(left(q.settle(Some(s), NOW, NOW, 500, 5_000), NOW), 0);
        // A refund after the month turned over does not credit the new month...
        let next = period_end_ms(Period::Month, NOW);
        assert_eq!(left(q.settle(Some(s), next, NOW, 500, 200), next), 1_000);
        // ...even when another request already rolled the counter over.
        let rolled = q.reserve(Some(s), next, 100).unwrap();
        assert_eq!(left(q.settle(Some(rolled), next, NOW, 500, 200), next), 900);
    }
}
