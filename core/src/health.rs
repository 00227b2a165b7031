//! Key health: whether a provider key may be tried now. One integer per key in the shared
//! store: the time until which it is cooling (after a rate limit), or, with a flag bit set,
//! until which it is exhausted (its account out of credit) or revoked (refused: 401/403)
//! before one request re-probes it. Providers whose limits are per model (OpenAI) also keep
//! one integer per key and upstream model, which only ever cools.

use crate::providers::refusal::RefusalClass;
use crate::providers::signals::KeySignals;

const REVOKED: u64 = 1 << 63;
const EXHAUSTED: u64 = 1 << 62;
const FLAGS: u64 = REVOKED | EXHAUSTED;

/// How a pool treats its keys' failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Cooldown after a 429 that says nothing of when to retry.
    pub default_cooldown_ms: u64,
    /// Longest cooldown, whatever the provider says.
    pub max_cooldown_ms: u64,
    /// How long a revoked key is skipped before one request probes it again.
    pub revoked_probe_ms: u64,
    /// How long a key whose account is out of credit (quota exhausted) is left out.
    pub exhausted_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            default_cooldown_ms: 1_000,
            max_cooldown_ms: 3_600_000,
            revoked_probe_ms: 60_000,
            exhausted_ms: 3_600_000,
        }
    }
}

/// Why a key is not tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Cooling { until_ms: u64 },
    Exhausted { until_ms: u64 },
    Revoked { probe_at_ms: u64 },
}

impl Unusable {
    /// When the key may be tried again (a revoked key: when one request re-probes it).
    pub fn until_ms(self) -> u64 {
        match self {
            Self::Cooling { until_ms } | Self::Exhausted { until_ms } => until_ms,
            Self::Revoked { probe_at_ms } => probe_at_ms,
        }
    }
}

/// The outcome of looking at a key's health for an attempt, as a store update: `Ok` claims
/// the key (a revoked key past its probe time is claimed for one probe, and its probe time
/// moves on so that other attempts keep skipping it); `Err(None)` means usable, nothing to
/// write; `Err(Some(_))` means skip it. An exhausted key past its time is usable again.
pub fn claim(
    state: Option<u64>,
    now_ms: u64,
    policy: &HealthPolicy,
) -> Result<((), u64), Option<Unusable>> {
    let state = state.unwrap_or(0);
    let until = state & !FLAGS;
    if state & REVOKED != 0 {
        if now_ms < until {
            return Err(Some(Unusable::Revoked { probe_at_ms: until }));
        }
        return Ok(((), REVOKED | now_ms.saturating_add(policy.revoked_probe_ms)));
    }
    Err(state_at(state, now_ms))
}

/// Why a key is skipped now, as the admin view shows it (claims nothing). A revoked key past
/// its probe time still reads as revoked: the next attempt probes it.
pub fn state(state: Option<u64>, now_ms: u64) -> Option<Unusable> {
    let state = state.unwrap_or(0);
    if state & REVOKED != 0 {
        Some(Unusable::Revoked {
            probe_at_ms: state & !FLAGS,
        })
    } else {
        state_at(state, now_ms)
    }
}

/// A state without the revoked flag, at `now_ms`.
fn state_at(state: u64, now_ms: u64) -> Option<Unusable> {
    let until = state & !FLAGS;
    if now_ms >= until {
        None
    } else if state & EXHAUSTED != 0 {
        Some(Unusable::Exhausted { until_ms: until })
    } else {
        Some(Unusable::Cooling { until_ms: until })
    }
}

/// The key's new state after an attempt's answer, if it changes. `class` is what the
/// provider's refusal means (`None`: the answer was no refusal). A rate limit cools the key
/// (until the provider's retry time, else the exhausted window's reset, else the default;
/// capped); an exhausted quota takes it out for `exhausted_ms`; a 401/403 revokes it; a
/// success ends a revocation (the probe worked). Nothing else touches it: a request too
/// large, an overloaded or failing provider, a bad request are not the key's doing. (Call
/// it with a per-model rate limit only for the per-model record, see `cool`.)
pub fn observe(
    state: Option<u64>,
    now_ms: u64,
    class: Option<RefusalClass>,
    signals: &KeySignals,
    policy: &HealthPolicy,
) -> Option<u64> {
    let state = state.unwrap_or(0);
    match class {
        Some(RefusalClass::RateLimited { .. }) => {
            // Never cut short a revocation or an exhaustion still in force.
            if state & REVOKED != 0
                || state_at(state, now_ms).is_some_and(|u| matches!(u, Unusable::Exhausted { .. }))
            {
                return None;
            }
            let base = state & !EXHAUSTED;
            let until =
                signals.cooldown_until(now_ms, policy.default_cooldown_ms, policy.max_cooldown_ms);
            Some(until.max(base)).filter(|u| *u != state)
        }
        Some(RefusalClass::QuotaExhausted) => {
            let until = now_ms.saturating_add(policy.exhausted_ms);
            // A longer exhaustion another attempt saw stands; anything else (even a
            // revocation: the key was accepted, its account is what is empty) gives way.
            let longer = state & FLAGS == EXHAUSTED && state & !FLAGS >= until;
            (!longer).then_some(EXHAUSTED | until)
        }
        Some(RefusalClass::Auth) => Some(REVOKED | now_ms.saturating_add(policy.revoked_probe_ms)),
        None if state & REVOKED != 0 => Some(0),
        _ => None,
    }
}

/// A cooling record's new state after a rate limit: cooling until the provider's time,
/// never shortening a longer cooldown another attempt saw. For the key-wide record (through
/// `observe`) and for the per-model records, which only ever cool.
pub fn cool(
    state: Option<u64>,
    now_ms: u64,
    signals: &KeySignals,
    policy: &HealthPolicy,
) -> Option<u64> {
    let state = state.unwrap_or(0);
    let until = signals.cooldown_until(now_ms, policy.default_cooldown_ms, policy.max_cooldown_ms);
    Some(until.max(state)).filter(|u| *u != state)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_341_600_000;
    const RATE: Option<RefusalClass> = Some(RefusalClass::RateLimited { per_model: false });
    const QUOTA: Option<RefusalClass> = Some(RefusalClass::QuotaExhausted);
    const AUTH: Option<RefusalClass> = Some(RefusalClass::Auth);

    #[test]
    fn a_rate_limit_cools_a_key_until_the_providers_retry_time() {
        let p = HealthPolicy::default();
        let signals = KeySignals {
            retry_at_ms: Some(NOW + 2_000),
            ..Default::default()
        };
        let s = observe(None, NOW, RATE, &signals, &p).unwrap();
        assert_eq!(
            claim(Some(s), NOW + 1_999, &p),
            Err(Some(Unusable::Cooling {
                until_ms: NOW + 2_000
            }))
        );
        assert_eq!(claim(Some(s), NOW + 2_000, &p), Err(None));
        // Without a retry time: the default.
        let s = observe(None, NOW, RATE, &KeySignals::default(), &p).unwrap();
        assert_eq!(s, NOW + p.default_cooldown_ms);
        // A shorter cooldown does not cut a longer one short.
        assert_eq!(observe(Some(NOW + 9_000), NOW, RATE, &signals, &p), None);
        // The per-model record cools the same way.
        assert_eq!(cool(None, NOW, &signals, &p), Some(NOW + 2_000));
        assert_eq!(cool(Some(NOW + 9_000), NOW, &signals, &p), None);
    }

    #[test]
    fn only_rate_limits_exhaustion_and_refusals_touch_a_key() {
        let p = HealthPolicy::default();
        let none = KeySignals::default();
        for class in [
            RefusalClass::TooLarge,
            RefusalClass::Overloaded,
            RefusalClass::ServerError,
            RefusalClass::Other,
        ] {
            assert_eq!(
                observe(None, NOW, Some(class), &none, &p),
                None,
                "{class:?}"
            );
            assert_eq!(
                observe(Some(NOW + 5), NOW, Some(class), &none, &p),
                None,
                "{class:?}"
            );
        }
    }

    #[test]
    fn an_exhausted_key_is_out_for_long_then_usable_again() {
        let p = HealthPolicy {
            exhausted_ms: 600_000,
            ..Default::default()
        };
        let none = KeySignals::default();
        let s = observe(None, NOW, QUOTA, &none, &p).unwrap();
        let out = Unusable::Exhausted {
            until_ms: NOW + 600_000,
        };
        assert_eq!(claim(Some(s), NOW + 599_999, &p), Err(Some(out)));
        assert_eq!(state(Some(s), NOW + 1), Some(out));
        assert_eq!(claim(Some(s), NOW + 600_000, &p), Err(None));
        assert_eq!(state(Some(s), NOW + 600_000), None);
        // A rate limit or a success meanwhile does not bring it back early.
        let soon = KeySignals {
            retry_at_ms: Some(NOW + 1_000),
            ..Default::default()
        };
        assert_eq!(observe(Some(s), NOW + 10, RATE, &soon, &p), None);
        assert_eq!(observe(Some(s), NOW + 10, None, &none, &p), None);
        // A later exhaustion pushes the end on; an earlier one does not pull it in.
        assert_eq!(
            observe(Some(s), NOW + 10, QUOTA, &none, &p),
            Some(EXHAUSTED | (NOW + 600_010))
        );
        assert_eq!(observe(Some(s), NOW - 10, QUOTA, &none, &p), None);
        // Past its end, a rate limit cools it as any key.
        assert_eq!(
            observe(Some(s), NOW + 600_000, RATE, &soon, &p),
            Some(NOW + 600_000)
        );
        // An exhausted account behind a revoked key being probed: exhausted.
        let revoked = observe(None, NOW, AUTH, &none, &p).unwrap();
        assert_eq!(
            observe(Some(revoked), NOW, QUOTA, &none, &p),
            Some(EXHAUSTED | (NOW + 600_000))
        );
    }

    #[test]
    fn a_revoked_key_is_skipped_then_probed_once_then_healthy_on_success() {
        let p = HealthPolicy {
            revoked_probe_ms: 60_000,
            ..Default::default()
        };
        let none = KeySignals::default();
        let s = observe(None, NOW, AUTH, &none, &p).unwrap();
        assert_eq!(
            claim(Some(s), NOW + 59_999, &p),
            Err(Some(Unusable::Revoked {
                probe_at_ms: NOW + 60_000
            }))
        );
        // Past the probe time one attempt claims it; the next keeps skipping.
        let ((), probing) = claim(Some(s), NOW + 60_000, &p).unwrap();
        assert!(matches!(
            claim(Some(probing), NOW + 60_001, &p),
            Err(Some(Unusable::Revoked { .. }))
        ));
        // A rate limit does not end a revocation.
        assert_eq!(observe(Some(probing), NOW, RATE, &none, &p), None);
        // The probe worked: healthy again.
        assert_eq!(
            observe(Some(probing), NOW + 60_100, None, &none, &p),
            Some(0)
        );
        // A success on a healthy key changes nothing.
        assert_eq!(observe(Some(0), NOW, None, &none, &p), None);
        assert_eq!(
            observe(Some(0), NOW, Some(RefusalClass::ServerError), &none, &p),
            None
        );
    }
}

/// Learned headroom: how much a key has left at the provider, from its last response's
/// remaining-capacity headers, packed as (valid until, in seconds) << 32 | remaining tokens.
/// Stale after the provider's window resets (or a minute, when it gave no reset time).
pub fn headroom_state(signals: &KeySignals, now_ms: u64) -> Option<u64> {
    let remaining = signals.remaining_tokens.or(signals.remaining_requests)?;
    let reset = signals
        .tokens_reset_at_ms
        .or(signals.requests_reset_at_ms)
        .unwrap_or(now_ms.saturating_add(60_000));
    let until_s = (reset / 1_000).min(u64::from(u32::MAX));
    Some((until_s << 32) | remaining.min(u64::from(u32::MAX)))
}

/// The headroom a state says a key has now; `u64::MAX` when unknown or stale (an unknown
/// key is assumed to have room, so it is tried and learned).
pub fn headroom(state: Option<u64>, now_ms: u64) -> u64 {
    match state {
        Some(s) if (s >> 32) > now_ms / 1_000 => s & u64::from(u32::MAX),
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod headroom_tests {
    use super::*;

    #[test]
    fn headroom_is_learned_and_goes_stale_at_the_reset() {
        let now = 1_795_341_600_000;
        let signals = KeySignals {
            remaining_tokens: Some(1_200),
            tokens_reset_at_ms: Some(now + 30_000),
            ..Default::default()
        };
        let s = headroom_state(&signals, now);
        assert_eq!(headroom(s, now), 1_200);
        assert_eq!(headroom(s, now + 30_000), u64::MAX);
        assert_eq!(headroom(None, now), u64::MAX);
        assert_eq!(headroom_state(&KeySignals::default(), now), None);
        let no_reset = KeySignals {
            remaining_requests: Some(3),
            ..Default::default()
        };
        let s = headroom_state(&no_reset, now);
        assert_eq!(headroom(s, now + 59_000), 3);
        assert_eq!(headroom(s, now + 61_000), u64::MAX);
    }
}
