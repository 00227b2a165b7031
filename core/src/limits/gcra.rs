//! Weighted GCRA (a token bucket in one integer): the state is the theoretical arrival time
//! (TAT) in nanoseconds since the Unix epoch. A bucket of `limit` units per `window` refills
//! one unit every `window / limit` and holds at most `limit`. A reservation of `n` units moves
//! the TAT `n` intervals into the future; it fits while the TAT stays within one window of
//! now. Settling moves it back (refund) or further on (charge; the bucket may go into debt).
//!
//! A refund gives back only the part of the reservation's own slot (the intervals it moved
//! the TAT through, ending at the TAT `reserve` returned) that lies after now: the part
//! before now has refilled already, and giving it back again would let requests held open
//! while the bucket refills be spent twice. Nor does a refund go below now (fuller than full).

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
    /// `slot_end` is the state `reserve` returned for this reservation (`u64::MAX` when it
    /// is not known: the refund is then not limited to the slot). Debt is capped at
    /// `MAX_DEBT_WINDOWS` windows, so that one absurd usage report cannot lock a bucket for
    /// longer.
    pub fn settle(
        &self,
        tat: Option<u64>,
        now_ns: u64,
        reserved: u64,
        used: u64,
        slot_end: u64,
    ) -> u64 {
        let tat = tat.unwrap_or(now_ns);
        if used >= reserved {
            let cap = now_ns.saturating_add(self.window_ns.saturating_mul(MAX_DEBT_WINDOWS));
            tat.max(now_ns)
                .saturating_add(self.cost_ns(used - reserved))
                .min(cap.max(tat))
        } else {
            let unused = self.cost_ns(reserved - used);
            let not_yet_refilled = slot_end.saturating_sub(now_ns);
            tat.saturating_sub(unused.min(not_yet_refilled)).max(now_ns)
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
        let refunded = r.settle(Some(tat), now, 50, 20, tat);
        assert_eq!(r.remaining(Some(refunded), now), 80);
        // Used 90 of 50: the bucket owes 40 more.
        let charged = r.settle(Some(tat), now, 50, 90, tat);
        assert_eq!(r.remaining(Some(charged), now), 10);
        // An absurd report leaves the bucket locked for at most MAX_DEBT_WINDOWS windows.
        let absurd = r.settle(Some(tat), now, 50, u64::MAX, tat);
        assert_eq!(r.reset_ns(Some(absurd), now), MAX_DEBT_WINDOWS * MIN);
        // Debt: used far more than the bucket holds.
        let debt = r.settle(Some(tat), now, 50, 250, tat);
        assert_eq!(r.remaining(Some(debt), now), 0);
        // 250 tokens at 100 a minute from a full bucket: empty again in 2.5 minutes.
        assert_eq!(r.reset_ns(Some(debt), now), 150 * SEC);
    }

    #[test]
    fn a_refund_gives_back_only_the_part_of_its_slot_still_ahead() {
        let r = tpm(100);
        let now = 1_000 * SEC;
        // Two requests of 50 fill the bucket: slots [0, 30 s] and [30 s, 60 s] from now.
        let first = r.reserve(None, now, 50).unwrap();
        let second = r.reserve(Some(first), now, 50).unwrap();
        // 40 s later the first slot has refilled: its refund gives nothing back; 20 s of the
        // second are still ahead, and only those come back.
        let later = now + 40 * SEC;
        let tat = r.settle(Some(second), later, 50, 0, first);
        assert_eq!(tat, second);
        let tat = r.settle(Some(tat), later, 50, 0, second);
        assert_eq!(tat, later, "full, not fuller");
        assert_eq!(r.remaining(Some(tat), later), 100);
        // Refunded at once, the whole reservation comes back.
        assert_eq!(r.settle(Some(second), now, 50, 0, second), first);
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
                        tat = Some(r.settle(Some(t), now, want, used, t));
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
                    let settled = r.settle(Some(t), now + later, want, used, t);
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
                let via = r.reserve(before, now, estimate).map(|t| r.settle(Some(t), now, estimate, truth, t));
                if let (Ok(d), Ok(v)) = (direct, via) {
                    prop_assert!(d.abs_diff(v) <= 2, "direct {d} vs settled {v}");
                }
            }
        }

        /// Requests that overlap: reservations outstanding at once, settled later for more
        /// than they reserved (debt) or less (refunds), while others arrive.
        mod overlapping {
            use super::*;

            #[derive(Debug, Clone)]
            enum Step {
                /// After `dt`, a burst of requests at one instant, each reserving a percentage
                /// of the limit and due to use a percentage of its reservation (up to 300: debt).
                Arrive { dt: u64, burst: Vec<(u64, u64)> },
                /// After `dt`, outstanding requests (picked by index) end at one instant.
                Finish { dt: u64, picks: Vec<usize> },
                /// After `dt`, at one instant, in turn: an outstanding request ends, a new one
                /// arrives (a busy gateway, where a slot freed is taken at once).
                Churn {
                    dt: u64,
                    turns: Vec<(usize, u64, u64)>,
                },
            }

            fn step() -> impl Strategy<Value = Step> {
                // Often at the same instant; else within the window, or across windows (a long
                // stream holds its reservation while the bucket refills).
                let dt = prop_oneof![2 => Just(0u64), 1 => 0..5 * SEC, 1 => 0..2 * MIN];
                let share = prop_oneof![1u64..=10, 1u64..=100];
                let usage = prop_oneof![Just(0u64), 0u64..=100, 0u64..=300];
                prop_oneof![
                    (
                        dt.clone(),
                        proptest::collection::vec((share.clone(), usage.clone()), 1..16)
                    )
                        .prop_map(|(dt, burst)| Step::Arrive { dt, burst }),
                    (dt.clone(), proptest::collection::vec(any::<usize>(), 1..16))
                        .prop_map(|(dt, picks)| Step::Finish { dt, picks }),
                    (
                        dt,
                        proptest::collection::vec((any::<usize>(), share, usage), 1..16)
                    )
                        .prop_map(|(dt, turns)| Step::Churn { dt, turns }),
                ]
            }

            #[derive(Debug, Clone, Copy)]
            struct Request {
                reserved: u64,
                used: u64,
                settled: bool,
                /// The state `reserve` returned: the end of its slot.
                slot_end: u64,
            }

            #[derive(Debug, Clone, Copy)]
            enum Event {
                Admit(usize),
                Settle(usize),
            }

            /// What a bucket did with a run of steps: the admitted requests, and every admission
            /// and settlement with its time, in order.
            struct History {
                rate: Rate,
                requests: Vec<Request>,
                events: Vec<(u64, Event)>,
                /// A charge reached the debt cap (`MAX_DEBT_WINDOWS`), which forgives the rest.
                debt_capped: bool,
            }

            /// A bucket and the requests it admitted, as the steps run.
            struct Run {
                h: History,
                tat: Option<u64>,
                outstanding: Vec<usize>,
            }

            impl Run {
                fn arrive(&mut self, now: u64, share: u64, usage: u64) {
                    let rate = self.h.rate;
                    let reserved = (rate.limit * share / 100).max(1);
                    if let Ok(t) = rate.reserve(self.tat, now, reserved) {
                        self.tat = Some(t);
                        let id = self.h.requests.len();
                        self.h.requests.push(Request {
                            reserved,
                            used: reserved * usage / 100,
                            settled: false,
                            slot_end: t,
                        });
                        self.outstanding.push(id);
                        self.h.events.push((now, Event::Admit(id)));
                    }
                }

                fn finish(&mut self, now: u64, pick: usize) {
                    if self.outstanding.is_empty() {
                        return;
                    }
                    let id = self.outstanding.swap_remove(pick % self.outstanding.len());
                    let rate = self.h.rate;
                    let q = &mut self.h.requests[id];
                    let tat = rate.settle(self.tat, now, q.reserved, q.used, q.slot_end);
                    self.h.debt_capped |= tat >= now + MAX_DEBT_WINDOWS * rate.window_ns;
                    self.tat = Some(tat);
                    q.settled = true;
                    self.h.events.push((now, Event::Settle(id)));
                }
            }

            fn run(rate: Rate, steps: &[Step]) -> History {
                let mut run = Run {
                    h: History {
                        rate,
                        requests: Vec::new(),
                        events: Vec::new(),
                        debt_capped: false,
                    },
                    tat: None,
                    outstanding: Vec::new(),
                };
                let mut now = 10_000 * SEC;
                for step in steps {
                    match step {
                        Step::Arrive { dt, burst } => {
                            now += dt;
                            for &(share, usage) in burst {
                                run.arrive(now, share, usage);
                            }
                        }
                        Step::Finish { dt, picks } => {
                            now += dt;
                            for &pick in picks {
                                run.finish(now, pick);
                            }
                        }
                        Step::Churn { dt, turns } => {
                            now += dt;
                            for &(pick, share, usage) in turns {
                                run.finish(now, pick);
                                run.arrive(now, share, usage);
                            }
                        }
                    }
                }
                run.h
            }

            impl History {
                /// Units that refill in `ns`, times the window (exact).
                fn refill_times_window(&self, ns: u64) -> i128 {
                    i128::from(self.rate.limit) * i128::from(ns)
                }

                /// The first span, from one admission to a later one, in which the admissions
                /// reserved more than the bucket plus its refill, net of the charges and
                /// refunds settled in the span.
                fn ledger_overrun(&self) -> Option<String> {
                    let window = i128::from(self.rate.window_ns);
                    let limit = i128::from(self.rate.limit);
                    for (first, &(start, event)) in self.events.iter().enumerate() {
                        if !matches!(event, Event::Admit(_)) {
                            continue;
                        }
                        let (mut net, mut refunds) = (0i128, 0i128);
                        for &(end, event) in &self.events[first..] {
                            match event {
                                Event::Admit(id) => net += i128::from(self.requests[id].reserved),
                                Event::Settle(id) => {
                                    let q = self.requests[id];
                                    net += i128::from(q.used) - i128::from(q.reserved);
                                    refunds += i128::from(q.used < q.reserved);
                                }
                            }
                            // In nanoseconds of refill: net × window / limit ≤ window + span,
                            // plus the nanosecond a rounded-up refund may give back.
                            if matches!(event, Event::Admit(_))
                                && net * window
                                    > limit * window
                                        + self.refill_times_window(end - start)
                                        + refunds * limit
                            {
                                return Some(format!(
                                    "{net} units net in {} ns, limit {limit}",
                                    end - start
                                ));
                            }
                        }
                    }
                    None
                }

                /// The first span, from one admission to a later one, whose admissions (each
                /// counted at what it used, at most its reservation; at its reservation while
                /// outstanding) exceed the bucket plus its refill plus one reservation.
                fn documented_bound_overrun(&self) -> Option<String> {
                    let largest = self.requests.iter().map(|q| q.reserved).max().unwrap_or(0);
                    let admitted: Vec<(u64, Request)> = self
                        .events
                        .iter()
                        .filter_map(|&(t, e)| match e {
                            Event::Admit(id) => Some((t, self.requests[id])),
                            Event::Settle(_) => None,
                        })
                        .collect();
                    let window = i128::from(self.rate.window_ns);
                    for (first, &(start, _)) in admitted.iter().enumerate() {
                        let mut sum = 0i128;
                        for &(end, q) in &admitted[first..] {
                            sum += i128::from(if q.settled {
                                q.used.min(q.reserved)
                            } else {
                                q.reserved
                            });
                            let bound = i128::from(self.rate.limit + largest) * window
                                + self.refill_times_window(end - start);
                            if sum * window > bound {
                                return Some(format!(
                                    "{sum} units admitted in {} ns, limit {}, largest reservation {largest}",
                                    end - start,
                                    self.rate.limit
                                ));
                            }
                        }
                    }
                    None
                }

                /// The first event after which the bucket has more room than if every request
                /// had been charged what it used (up to its reservation) when admitted, and
                /// its debt when settled.
                fn room_beyond_exact_charging(&self) -> Option<String> {
                    let r = self.rate;
                    let (mut tat, mut exact): (Option<u64>, Option<u64>) = (None, None);
                    let mut settled = 0;
                    for (n, &(now, event)) in self.events.iter().enumerate() {
                        match event {
                            Event::Admit(id) => {
                                let q = self.requests[id];
                                tat = r.reserve(tat, now, q.reserved).ok();
                                let start = exact.unwrap_or(now).max(now);
                                exact = Some(start + r.cost_ns(q.used.min(q.reserved)));
                            }
                            Event::Settle(id) => {
                                let q = self.requests[id];
                                tat = Some(r.settle(tat, now, q.reserved, q.used, q.slot_end));
                                if q.used > q.reserved {
                                    exact =
                                        Some(r.settle(exact, now, q.reserved, q.used, u64::MAX));
                                }
                                settled += 1;
                            }
                        }
                        let tat = tat.expect("replayed as admitted");
                        let (ahead, exact_ahead) = (
                            tat.saturating_sub(now),
                            exact.unwrap_or(now).saturating_sub(now),
                        );
                        // A rounded-up refund may give back one nanosecond more than exact;
                        // a refund's slot may have moved down with earlier refunds, so it may
                        // give back up to one reservation more.
                        let largest = self.requests.iter().map(|q| q.reserved).max().unwrap_or(0);
                        if ahead + settled + r.cost_ns(largest) < exact_ahead {
                            return Some(format!(
                                "after event {n}: {ahead} ns of the bucket taken, {exact_ahead} ns by exact charging"
                            ));
                        }
                    }
                    None
                }
            }

            proptest! {
                /// However requests overlap, what the admissions of any span reserve, net of the
                /// charges and refunds settled in the span, is at most the bucket plus what
                /// refilled during the span: the token bucket's own bound. A debt must be
                /// refilled before further admissions; a refund gives back no more than the
                /// reservation held.
                #[test]
                fn overlapping_requests_take_at_most_the_bucket_plus_refill_net_of_settlements(
                    limit in 1u64..5_000,
                    steps in proptest::collection::vec(step(), 1..60),
                ) {
                    let h = run(tpm(limit), &steps);
                    prop_assume!(!h.debt_capped);
                    let overrun = h.ledger_overrun();
                    prop_assert!(overrun.is_none(), "{}", overrun.unwrap_or_default());
                }

                /// docs/limits.md's bound, with requests that overlap: admitted over any span
                /// (each at what it used, up to its reservation) ≤ the bucket + the refill + one
                /// reservation. It held only once refunds were limited to the part of their
                /// slot still ahead (see the example test below).
                #[test]
                fn overlapping_requests_stay_within_the_documented_bound(
                    limit in 1u64..5_000,
                    steps in proptest::collection::vec(step(), 1..60),
                ) {
                    let h = run(tpm(limit), &steps);
                    prop_assume!(!h.debt_capped);
                    let overrun = h.documented_bound_overrun();
                    prop_assert!(overrun.is_none(), "{}", overrun.unwrap_or_default());
                }

                /// Refunds never create capacity: after every admission and settlement the
                /// bucket has no more room than if each request had been charged exactly
                /// what it used when it was admitted, give or take one reservation (a slot
                /// that earlier refunds moved down is refunded as it was reserved).
                #[test]
                fn refunds_of_overlapping_requests_never_create_capacity(
                    limit in 1u64..5_000,
                    steps in proptest::collection::vec(step(), 1..60),
                ) {
                    let h = run(tpm(limit), &steps);
                    prop_assume!(!h.debt_capped);
                    let overrun = h.room_beyond_exact_charging();
                    prop_assert!(overrun.is_none(), "{}", overrun.unwrap_or_default());
                }
            }

            /// Regression, the smallest case of the above: 100 a minute; ten requests reserve
            /// 10 each and hold it for half a minute (long streams), using nothing; meanwhile
            /// the bucket refilled 50, which others take. Then each of the ten ends and a new
            /// request takes its refund at once. Refunds that gave back whole reservations
            /// admitted 150 at one instant, where the documented bound is 100 + one
            /// reservation of 10 (and charging exact usage would have admitted 100).
            #[test]
            fn refunds_interleaved_with_admissions_stay_within_the_documented_burst_bound() {
                let r = tpm(100);
                let start = 10_000 * SEC;
                let mut tat = None;
                let mut held = Vec::new();
                for _ in 0..10 {
                    let t = r.reserve(tat, start, 10).unwrap();
                    held.push(t);
                    tat = Some(t);
                }
                let now = start + 30 * SEC;
                let mut admitted = 0;
                let mut admit = |tat: &mut Option<u64>| {
                    while let Ok(t) = r.reserve(*tat, now, 10) {
                        *tat = Some(t);
                        admitted += 10;
                    }
                };
                admit(&mut tat);
                for slot_end in held {
                    tat = Some(r.settle(tat, now, 10, 0, slot_end));
                    admit(&mut tat);
                }
                // Charged nothing up front, the ten would have left the bucket full at the
                // start; 50 refilled since: exactly 100 fit now, as with exact charging.
                assert_eq!(admitted, 100, "{admitted} admitted at one instant");
            }
        }
    }
}
