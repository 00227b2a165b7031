use super::*;
use crate::store::tests::CellStore;

const NOW: u64 = 1_795_341_600_000;

fn rate(name: &'static str, unit: Unit, limit: u64, window_ms: u64) -> Limit {
    Limit {
        name,
        scope: "consumer `app`".into(),
        label: "consumer:app".into(),
        unit,
        meter: Meter::Rate(gcra::Rate {
            limit,
            window_ns: window_ms * 1_000_000,
        }),
        store_key: format!("{name}/{limit}").into(),
    }
}

fn concurrency(max: u64) -> Limit {
    Limit {
        name: "concurrency",
        scope: "consumer `app`".into(),
        label: "consumer:app".into(),
        unit: Unit::Requests,
        meter: Meter::Concurrency(Concurrency {
            max,
            lease_ms: 10_000,
        }),
        store_key: "concurrency".into(),
    }
}

fn req(tokens: u64) -> Amounts {
    Amounts {
        requests: 1,
        tokens,
        micro_usd: 0,
    }
}

#[test]
fn admission_is_all_or_nothing() {
    let store = CellStore::default();
    let limits = [
        rate("requests_per_minute", Unit::Requests, 10, 60_000),
        rate("tokens_per_minute", Unit::Tokens, 100, 60_000),
    ];
    let (r, _) = admit(&limits, &store, NOW, req(80)).unwrap();
    // The token limit refuses the second request; its request must not stay counted.
    let refusal = admit(&limits, &store, NOW, req(80)).unwrap_err();
    assert!(
        matches!(
            refusal,
            Refusal::NotNow {
                limit: "tokens_per_minute",
                ..
            }
        ),
        "{refusal:?}"
    );
    let (_, h) = admit(&limits, &store, NOW, req(10)).unwrap();
    assert_eq!(
        h.requests.unwrap().remaining,
        8,
        "the refused request was given back"
    );
    settle(r, &store, NOW, req(80)).unwrap();
}

#[test]
fn retry_after_comes_from_the_bucket() {
    let store = CellStore::default();
    let limits = [rate("tokens_per_minute", Unit::Tokens, 600, 60_000)];
    admit(&limits, &store, NOW, req(600)).unwrap();
    let Err(Refusal::NotNow { retry_after_ms, .. }) = admit(&limits, &store, NOW, req(60)) else {
        panic!()
    };
    assert_eq!(retry_after_ms, 6_000);
    assert!(admit(&limits, &store, NOW + 6_000, req(60)).is_ok());
}

#[test]
fn a_request_larger_than_a_limit_never_fits() {
    let store = CellStore::default();
    let refusal = admit(
        &[rate("tokens_per_minute", Unit::Tokens, 100, 60_000)],
        &store,
        NOW,
        req(101),
    )
    .unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Never {
            limit: "tokens_per_minute",
            scope: "consumer `app`".into(),
            label: "consumer:app".into(),
            requested: 101,
            capacity: 100
        }
    );
}

#[test]
fn settling_refunds_tokens_and_frees_concurrency() {
    let store = CellStore::default();
    let limits = [
        rate("tokens_per_minute", Unit::Tokens, 1_000, 60_000),
        concurrency(1),
    ];
    let (r, h) = admit(&limits, &store, NOW, req(800)).unwrap();
    assert_eq!(h.tokens.unwrap().remaining, 200);
    assert!(matches!(
        admit(&limits, &store, NOW, req(1)),
        Err(Refusal::NotNow {
            limit: "concurrency",
            ..
        })
    ));
    settle(r, &store, NOW, req(100)).unwrap();
    let (_, h) = admit(&limits, &store, NOW, req(100)).unwrap();
    assert_eq!(
        h.tokens.unwrap().remaining,
        800,
        "700 refunded, 100 more taken"
    );
}

const LEASE_MS: u64 = 10_000;

/// Whether a request would be refused for concurrency now (one admitted is settled at once).
fn refused_for_concurrency(limits: &[Limit], store: &CellStore, now: u64) -> bool {
    match admit(limits, store, now, req(1)) {
        Ok((r, _)) => {
            settle(r, store, now, req(1)).unwrap();
            false
        }
        Err(Refusal::NotNow {
            limit: "concurrency",
            ..
        }) => true,
        Err(other) => panic!("{other:?}"),
    }
}

#[test]
fn a_slot_renewed_by_its_host_is_held_as_long_as_its_request_runs() {
    let store = CellStore::default();
    let limits = [concurrency(1)];
    let (r, _) = admit(&limits, &store, NOW, req(1)).unwrap();
    assert_eq!(store.leases().len(), 1);
    // A stream of ten leases, renewed every half lease as the hosts do.
    let mut now = NOW;
    while now < NOW + 10 * LEASE_MS {
        now += LEASE_MS / 2;
        assert_eq!(renew_leases(&store, now), 1);
        assert!(
            refused_for_concurrency(&limits, &store, now),
            "at +{}",
            now - NOW
        );
    }
    settle(r, &store, now, req(1)).unwrap();
    assert!(store.leases().is_empty());
    let (again, _) = admit(&limits, &store, now, req(1)).unwrap();
    // Settling twice (a host that settles a dropped copy) frees nothing more.
    settle(again, &store, now, req(1)).unwrap();
    let (_, _) = admit(&limits, &store, now, req(1)).unwrap();
    assert!(refused_for_concurrency(&limits, &store, now));
}

#[test]
fn the_slot_of_a_request_that_vanished_comes_back_within_two_leases() {
    let store = CellStore::default();
    let limits = [concurrency(2)];
    let (kept, _) = admit(&limits, &store, NOW, req(1)).unwrap();
    let (lost, _) = admit(&limits, &store, NOW, req(1)).unwrap();
    // Its holder died (an Envoy VM that trapped) or dropped it unsettled (a lost `on_log`).
    drop(lost);
    assert_eq!(store.leases().len(), 1);
    let mut now = NOW;
    let mut refused_until = NOW;
    while now < NOW + 3 * LEASE_MS {
        now += LEASE_MS / 4;
        renew_leases(&store, now);
        if refused_for_concurrency(&limits, &store, now) {
            refused_until = now;
        }
    }
    let held_for = refused_until - NOW;
    assert!(
        (LEASE_MS..2 * LEASE_MS).contains(&held_for),
        "held for {held_for} ms"
    );
    // The kept request, renewed all along, still holds its slot: one free, not two.
    let (extra, _) = admit(&limits, &store, now, req(1)).unwrap();
    assert!(refused_for_concurrency(&limits, &store, now));
    settle(kept, &store, now, req(1)).unwrap();
    settle(extra, &store, now, req(1)).unwrap();
    let (_, _) = admit(&limits, &store, now, req(1)).unwrap();
    let (_, _) = admit(&limits, &store, now, req(1)).unwrap();
}

#[test]
fn a_reservation_handed_over_keeps_its_slot_where_it_was_renewed_to() {
    let store = CellStore::default();
    let limits = [
        rate("tokens_per_minute", Unit::Tokens, 1_000, 60_000),
        concurrency(1),
    ];
    let (r, _) = admit(&limits, &store, NOW, req(10)).unwrap();
    // Renewed once before the handover (a slow first byte).
    let now = NOW + 3 * LEASE_MS / 2;
    renew_leases(&store, now);
    let slot_ends: Vec<u64> = r.slot_ends().collect();
    let epochs: Vec<u64> = r.lease_epochs().collect();
    assert_eq!(epochs, [now / LEASE_MS]);
    let taken = Reservation::of(&limits, req(10), r.at_ms(), &slot_ends, &epochs, &store);
    drop(r);
    assert_eq!(store.leases().len(), 1, "the new holder's lease");
    // Renewed on by its new holder, released from the epoch it was renewed to.
    let later = now + 5 * LEASE_MS;
    let mut t = now;
    while t < later {
        t += LEASE_MS / 2;
        renew_leases(&store, t);
    }
    assert!(refused_for_concurrency(&limits, &store, later));
    settle(taken, &store, later, req(10)).unwrap();
    assert!(!refused_for_concurrency(&limits, &store, later));
}

#[test]
fn headers_report_the_tightest_limit() {
    let store = CellStore::default();
    let limits = [
        rate("tokens_per_minute", Unit::Tokens, 1_000, 60_000),
        rate("tokens_per_day", Unit::Tokens, 5_000, 86_400_000),
        rate("requests_per_minute", Unit::Requests, 3, 60_000),
    ];
    admit(&limits, &store, NOW, req(900)).unwrap();
    let (_, h) = admit(&limits, &store, NOW, req(50)).unwrap();
    let headers = h.to_headers();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("x-ratelimit-limit-tokens"), "1000");
    assert_eq!(get("x-ratelimit-remaining-tokens"), "50");
    assert_eq!(get("x-ratelimit-limit-requests"), "3");
    assert_eq!(get("x-ratelimit-remaining-requests"), "1");
    assert_eq!(get("x-ratelimit-reset-requests"), "40s");
}

#[test]
fn durations_read_like_openais() {
    assert_eq!(format_duration(0), "0ms");
    assert_eq!(format_duration(250), "250ms");
    assert_eq!(format_duration(1_000), "1s");
    assert_eq!(format_duration(1_500), "1.5s");
    assert_eq!(format_duration(360_000), "6m0s");
    assert_eq!(format_duration(7_384_020), "2h3m4.02s");
}

/// Several hosts decide on stale views of one store (`store::Tx`), all at once, and the
/// store redoes each commit's hot counters with `redo` (the same math) on what the last
/// commit left, handing a commit back only when its decision would change: exactly as many
/// requests are admitted as one process admits, whatever the interleaving, and the counters
/// end where one process leaves them.
#[test]
fn redone_commits_admit_exactly_what_one_process_admits() {
    use crate::store::{learn, Commit, CommitReply, Tx};
    use std::collections::HashMap;

    let limits = [
        rate("requests_per_minute", Unit::Requests, 7, 60_000),
        rate("tokens_per_minute", Unit::Tokens, 1_000, 60_000),
        concurrency(5),
    ];
    let by_key: HashMap<&str, &Limit> = limits.iter().map(|l| (&*l.store_key, l)).collect();
    // The store: applies a commit as `tollgate store-server` does.
    let mut remote: HashMap<String, u64> = HashMap::new();
    let mut apply = |commit: &Commit| -> CommitReply {
        let mut commit = commit.clone();
        loop {
            let current: Vec<Option<u64>> = commit
                .ops
                .iter()
                .map(|op| remote.get(&op.key).copied())
                .collect();
            if commit
                .ops
                .iter()
                .zip(&current)
                .all(|(op, c)| op.expect == *c)
            {
                for op in &commit.ops {
                    if let Some(w) = op.write {
                        remote.insert(op.key.clone(), w);
                    }
                }
                let now = commit.ops.iter().map(|op| op.write.or(op.expect)).collect();
                return CommitReply {
                    committed: true,
                    current: now,
                };
            }
            for (op, c) in commit.ops.iter_mut().zip(&current) {
                if op.expect == *c {
                    continue;
                }
                let again = op
                    .redo
                    .and_then(|how| redo(by_key[op.key.as_str()], &how, *c));
                match (again, op.write) {
                    (Some(new), Some(_)) => {
                        op.expect = *c;
                        op.write = Some(new);
                    }
                    _ => {
                        return CommitReply {
                            committed: false,
                            current,
                        }
                    }
                }
            }
        }
    };
    let book = LeaseBook::new();
    let mut views: Vec<HashMap<String, Option<u64>>> = vec![HashMap::new(); 4];
    let mut admitted = Vec::new();
    // Twelve requests in rounds of four hosts deciding before any of them commits.
    for round in 0..3 {
        let mut pending: Vec<usize> = (0..4).collect();
        while !pending.is_empty() {
            let decisions: Vec<_> = pending
                .iter()
                .map(|&h| {
                    let tx = Tx::new(&views[h], &book);
                    let decision = admit(&limits, &tx, NOW + round, req(100));
                    (h, decision, tx.into_commit())
                })
                .collect();
            pending.clear();
            for (h, decision, commit) in decisions {
                let reply = apply(&commit);
                learn(&mut views[h], &commit, &reply);
                match (reply.committed, decision) {
                    (true, Ok((r, _))) => admitted.push(r),
                    (true, Err(_)) => {}
                    (false, _) => pending.push(h),
                }
            }
        }
    }
    // One process: 5 slots (none given back yet), within 7 requests and 1,000 tokens.
    assert_eq!(admitted.len(), 5);
    let one = CellStore::default();
    let mut alone = 0;
    for round in 0..12 {
        alone += usize::from(admit(&limits, &one, NOW + round / 4, req(100)).is_ok());
    }
    assert_eq!(alone, 5);
    for limit in &limits {
        let key = &*limit.store_key;
        let theirs = read(&one, key).ok().flatten();
        assert_eq!(remote.get(key).copied(), theirs, "{key}");
    }
}
