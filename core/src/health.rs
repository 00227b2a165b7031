//! Key health: whether a provider key may be tried now. One integer per key in the shared
//! store: the time until which it is cooling (after a 429) or, with the top bit set, until
//! which it stays revoked (after a 401/403) before one request re-probes it.

use crate::providers::signals::KeySignals;

const REVOKED: u64 = 1 << 63;

/// How a pool treats its keys' failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Cooldown after a 429 that says nothing of when to retry.
    pub default_cooldown_ms: u64,
    /// Longest cooldown, whatever the provider says.
    pub max_cooldown_ms: u64,
    /// How long a revoked key is skipped before one request probes it again.
    pub revoked_probe_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            default_cooldown_ms: 1_000,
            max_cooldown_ms: 3_600_000,
            revoked_probe_ms: 60_000,
        }
    }
}

/// Why a key is not tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Cooling { until_ms: u64 },
    Revoked { probe_at_ms: u64 },
}

/// The outcome of looking at a key's health for an attempt, as a store update: `Ok` claims
/// the key (a revoked key past its probe time is claimed for one probe, and its probe time
/// moves on so that other attempts keep skipping it); `Err(None)` means usable, nothing to
/// write; `Err(Some(_))` means skip it.
pub fn claim(
    state: Option<u64>,
    now_ms: u64,
    policy: &HealthPolicy,
) -> Result<((), u64), Option<Unusable>> {
    let state = state.unwrap_or(0);
    let until = state & !REVOKED;
    if state & REVOKED != 0 {
        if now_ms < until {
            return Err(Some(Unusable::Revoked { probe_at_ms: until }));
        }
        return Ok(((), REVOKED | now_ms.saturating_add(policy.revoked_probe_ms)));
    }
    if now_ms < until {
        return Err(Some(Unusable::Cooling { until_ms: until }));
    }
    Err(None)
}

/// Why a key is skipped now, as the admin view shows it (claims nothing). A revoked key past
/// its probe time still reads as revoked: the next attempt probes it.
pub fn state(state: Option<u64>, now_ms: u64) -> Option<Unusable> {
    let state = state.unwrap_or(0);
    let until = state & !REVOKED;
    if state & REVOKED != 0 {
        Some(Unusable::Revoked { probe_at_ms: until })
    } else {
        (now_ms < until).then_some(Unusable::Cooling { until_ms: until })
    }
}

/// The key's new state after an attempt answered `status` with `signals`, if it changes:
/// a 429 cools it (until the provider's retry time, else the exhausted window's reset,
/// else the default; capped), a 401/403 revokes it, a success ends a revocation (the probe
/// worked).
pub fn observe(
    state: Option<u64>,
    now_ms: u64,
    status: u16,
    signals: &KeySignals,
    policy: &HealthPolicy,
) -> Option<u64> {
    let state = state.unwrap_or(0);
    match status {
        429 => {
            let until =
                signals.cooldown_until(now_ms, policy.default_cooldown_ms, policy.max_cooldown_ms);
            // Never shorten a revocation or a longer cooldown another attempt saw.
            (state & REVOKED == 0)
                .then_some(until.max(state))
                .filter(|u| *u != state)
        }
        401 | 403 => Some(REVOKED | now_ms.saturating_add(policy.revoked_probe_ms)),
        200..=299 if state & REVOKED != 0 => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_341_600_000;

    #[test]
    fn a_429_cools_a_key_until_the_providers_retry_time() {
        let p = HealthPolicy::default();
        let signals = KeySignals {
            retry_at_ms: Some(NOW + 2_000),
            ..Default::default()
        };
        let s = observe(None, NOW, 429, &signals, &p).unwrap();
        assert_eq!(
            claim(Some(s), NOW + 1_999, &p),
            Err(Some(Unusable::Cooling {
                until_ms: NOW + 2_000
            }))
        );
        assert_eq!(claim(Some(s), NOW + 2_000, &p), Err(None));
        // Without a retry time: the default.
        let s = observe(None, NOW, 429, &KeySignals::default(), &p).unwrap();
        assert_eq!(s, NOW + p.default_cooldown_ms);
        // A shorter cooldown does not cut a longer one short.
        assert_eq!(observe(Some(NOW + 9_000), NOW, 429, &signals, &p), None);
    }

    #[test]
    fn a_revoked_key_is_skipped_then_probed_once_then_healthy_on_success() {
        let p = HealthPolicy {
            revoked_probe_ms: 60_000,
            ..Default::default()
        };
        let s = observe(None, NOW, 401, &KeySignals::default(), &p).unwrap();
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
        // The probe worked: healthy again.
        assert_eq!(
            observe(Some(probing), NOW + 60_100, 200, &KeySignals::default(), &p),
            Some(0)
        );
        // A success on a healthy key changes nothing.
        assert_eq!(observe(Some(0), NOW, 200, &KeySignals::default(), &p), None);
        assert_eq!(observe(Some(0), NOW, 500, &KeySignals::default(), &p), None);
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
