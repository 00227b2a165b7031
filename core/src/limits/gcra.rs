//! Weighted GCRA (a token bucket in one integer): the state is the theoretical arrival time
//! (TAT) in nanoseconds since the Unix epoch. A bucket of `limit` units per `window` refills
//! one unit every `window / limit` and holds at most `limit`. A reservation of `n` units moves
//! the TAT `n` intervals into the future; it fits while the TAT stays within one window of
//! now. Settling moves it back (refund, never below now: a refund cannot make the bucket
//! fuller than full) or further on (charge; the bucket may go into debt).

/// How many windows into the future a bucket's debt may reach.
pub const MAX_DEBT_WINDOWS: u64 = 16;

/// A rate: `limit` units per `window_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub window_ns: u64,
}

/// Why a reservation does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It fits once the bucket has refilled for this long.
    NotNow { retry_after_ns: u64 },
    /// It is larger than the whole bucket: it never fits.
    Never,
}

impl Rate {
    /// Nanoseconds of refill that `units` cost (rounded up, saturating).
    pub fn cost_ns(&self, units: u64) -> u64 {
        let limit = u128::from(self.limit.max(1));
        let ns = (u128::from(units) * u128::from(self.window_ns)).div_ceil(limit);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Reserves `units` at `now_ns` on state `tat`; the new state on success.
    pub fn reserve(&self, tat: Option<u64>, now_ns: u64, units: u64) -> Result<u64, Refusal> {
        if units > self.limit {
            return Err(Refusal::Never);
        }
        let start = tat.unwrap_or(now_ns).max(now_ns);
        let new_tat = start.saturating_add(self.cost_ns(units));
        let ahead = new_tat - now_ns;
        if ahead <= self.window_ns {
            Ok(new_tat)
        } else {
            Err(Refusal::NotNow {
                retry_after_ns: ahead - self.window_ns,
            })
        }
    }

    /// Applies the difference between what was reserved and what was used: the new state.
    /// Debt is capped at `MAX_DEBT_WINDOWS` windows, so that one absurd usage report cannot
    /// lock a bucket for longer.
    pub fn settle(&self, tat: Option<u64>, now_ns: u64, reserved: u64, used: u64) -> u64 {
        let tat = tat.unwrap_or(now_ns);
        if used >= reserved {
            let cap = now_ns.saturating_add(self.window_ns.saturating_mul(MAX_DEBT_WINDOWS));
            tat.max(now_ns)
                .saturating_add(self.cost_ns(used - reserved))
                .min(cap.max(tat))
        } else {
            tat.saturating_sub(self.cost_ns(reserved - used))
                .max(now_ns)
        }
    }

    /// Units that would fit now.
    pub fn remaining(&self, tat: Option<u64>, now_ns: u64) -> u64 {
        let ahead = tat.unwrap_or(now_ns).saturating_sub(now_ns);
        let free_ns = self.window_ns.saturating_sub(ahead);
        let units =
            u128::from(free_ns) * u128::from(self.limit) / u128::from(self.window_ns.max(1));
        u64::try_from(units).unwrap_or(u64::MAX).min(self.limit)
    }

    /// Nanoseconds until the bucket is full again.
    pub fn reset_ns(&self, tat: Option<u64>, now_ns: u64) -> u64 {
        tat.unwrap_or(now_ns).saturating_sub(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const MIN: u64 = 60 * SEC;

    fn tpm(limit: u64) -> Rate {
        Rate {
            limit,
            window_ns: MIN,
        }
    }

    #[test]
    fn a_full_bucket_admits_its_limit_then_refuses_until_refilled() {
        let r = tpm(100);
        let now = 1_000 * SEC;
        let tat = r.reserve(None, now, 60).unwrap();
        let tat = r.reserve(Some(tat), now, 40).unwrap();
        assert_eq!(r.remaining(Some(tat), now), 0);
        let Err(Refusal::NotNow { retry_after_ns }) = r.reserve(Some(tat), now, 10) else {
            panic!()
        };
        // 10 tokens of a 100/minute bucket refill in 6 s.
        assert_eq!(retry_after_ns, 6 * SEC);
        assert!(r.reserve(Some(tat), now + retry_after_ns, 10).is_ok());
        assert!(r.reserve(Some(tat), now + retry_after_ns - 1, 10).is_err());
    }

    #[test]
    fn more_than_the_bucket_never_fits() {
        assert_eq!(tpm(100).reserve(None, 0, 101), Err(Refusal::Never));
        assert!(tpm(100).reserve(None, 0, 100).is_ok());
    }

    #[test]
    fn settle_refunds_and_charges() {
        let r = tpm(100);
        let now = 1_000 * SEC;
        let tat = r.reserve(None, now, 50).unwrap();
        // Used 20 of 50: 30 come back.
        let refunded = r.settle(Some(tat), now, 50, 20);
        assert_eq!(r.remaining(Some(refunded), now), 80);
        // Used 90 of 50: the bucket owes 40 more.
        let charged = r.settle(Some(tat), now, 50, 90);
        assert_eq!(r.remaining(Some(charged), now), 10);
        // An absurd report leaves the bucket locked for at most MAX_DEBT_WINDOWS windows.
        let absurd = r.settle(Some(tat), now, 50, u64::MAX);
        assert_eq!(r.reset_ns(Some(absurd), now), MAX_DEBT_WINDOWS * MIN);
        // Debt: used far more than the bucket holds.
        let debt = r.settle(Some(tat), now, 50, 250);
        assert_eq!(r.remaining(Some(debt), now), 0);
        // 250 tokens at 100 a minute from a full bucket: empty again in 2.5 minutes.
        assert_eq!(r.reset_ns(Some(debt), now), 150 * SEC);
    }

    #[test]
    fn remaining_and_reset_of_an_unused_bucket() {
        let r = tpm(1_000);
        assert_eq!(r.remaining(None, 5), 1_000);
        assert_eq!(r.reset_ns(None, 5), 0);
        assert_eq!(
            r.remaining(Some(0), 5 * MIN),
            1_000,
            "an old TAT is a full bucket"
        );
    }

    // proptest does not build for wasm32-wasip1; the property tests run on the host.
    #[cfg(not(target_family = "wasm"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Over any span of time, what was admitted (at its settled cost) is at most the
            /// bucket (one limit) plus what refilled during the span, plus one reservation,
            /// whatever the arrival times, sizes and settlements. For a burst of concurrent
            /// requests (a span of ~0) that is the limit plus one reservation; over a whole
            /// window after an idle period a token bucket admits up to twice its limit.
            #[test]
            fn admitted_in_any_span_stays_within_bucket_plus_refill_plus_one_reservation(
                limit in 1u64..5_000,
                steps in proptest::collection::vec((0u64..20 * SEC, 1u64..2_000, 0u64..3_000), 1..120),
            ) {
                let r = tpm(limit);
                let mut now = 10_000 * SEC;
                let mut tat: Option<u64> = None;
                // (time, units) of every admission, counted at its settled cost.
                let mut admitted: Vec<(u64, u64)> = Vec::new();
                let mut max_reservation = 0;
                for (dt, want, used) in steps {
                    now += dt;
                    if let Ok(t) = r.reserve(tat, now, want) {
                        let used = used.min(want); // charges beyond the reservation are debt, tested apart
                        tat = Some(r.settle(Some(t), now, want, used));
                        admitted.push((now, used));
                        max_reservation = max_reservation.max(want);
                    }
                }
                for (i, (start, _)) in admitted.iter().enumerate() {
                    let mut sum = 0;
                    for (end, used) in admitted.iter().skip(i) {
                        sum += used;
                        let refill = (u128::from(limit) * u128::from(end - start) / u128::from(MIN)) as u64;
                        let bound = limit + refill + max_reservation;
                        prop_assert!(sum <= bound, "{sum} admitted in {} ns > {bound}", end - start);
                    }
                }
            }

            /// A refund never leaves the bucket fuller than it was before the reservation.
            #[test]
            fn refunds_never_create_capacity(
                limit in 1u64..10_000,
                before in proptest::option::of(0u64..2 * MIN),
                want in 1u64..10_000,
                used_frac in 0u64..=100,
                later in 0u64..MIN,
            ) {
                let r = tpm(limit);
                let now = MIN;
                let before = before.map(|b| b + now / 2);
                if let Ok(t) = r.reserve(before, now, want) {
                    let used = want * used_frac / 100;
                    let settled = r.settle(Some(t), now + later, want, used);
                    prop_assert!(r.remaining(Some(settled), now + later) <= r.remaining(before, now + later));
                }
            }

            /// Reserving an estimate then settling to the truth leaves the bucket where charging
            /// the truth up front would have (to within one nanosecond of rounding per step).
            #[test]
            fn settle_with_exact_usage_equals_charging_the_true_cost(
                limit in 1u64..100_000,
                before in proptest::option::of(0u64..2 * MIN),
                truth in 0u64..50_000,
                estimate in 0u64..50_000,
            ) {
                prop_assume!(truth <= limit && estimate <= limit);
                let r = tpm(limit);
                let now = MIN;
                let direct = r.reserve(before, now, truth);
                let via = r.reserve(before, now, estimate).map(|t| r.settle(Some(t), now, estimate, truth));
                if let (Ok(d), Ok(v)) = (direct, via) {
                    prop_assert!(d.abs_diff(v) <= 2, "direct {d} vs settled {v}");
                }
            }
        }
    }
}
