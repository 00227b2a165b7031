//! A bounded soak, in both hosts: clients hammer the gateway for `SOAK_SECONDS` (default 20 s
//! in `make test`; `make soak` runs 180 s) with every fault a provider can throw at it — a
//! reset mid-stream, a hang after the headers, invalid UTF-8, JSON cut short, a body shorter
//! than its length, a never-ending event, 10 MB of headers, an HTML error page — mixed with
//! plain requests, and clients that give up at random points. Afterwards:
//! - the gateway's resident memory is flat: at most `RSS_GROWTH` above what it was once warm
//!   (a third of the way in), plus `RSS_SLACK`;
//! - every concurrency slot is free: the consumer can hold as many streams as its limit;
//! - it still serves.
//!
//! Each client draws its faults from a seeded generator; the seed is printed, and
//! `SOAK_SEED` replays a run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider};
use tollgate_e2e::scenario::{sha256_hex, unix_ms, user, Stack};

const APP_KEY: &str = "tg-soak-app-key";
/// Clients sending at once.
const CLIENTS: usize = 8;
/// The consumer's concurrency limit: room for every client and for slots that a client which
/// just gave up has not yet got back.
const CONCURRENCY: usize = 2 * CLIENTS;
/// Growth of resident memory allowed from warm to the end, as a fraction of warm.
const RSS_GROWTH: f64 = 0.25;
/// Growth allowed on top: allocator arenas and caches settling.
const RSS_SLACK: u64 = 24 * 1024 * 1024;

/// The models, one per provider key, each key with its fault (`None`: behaves).
const MODELS: [(&str, &str, &str); 10] = [
    ("ok", "sk-soak-ok", "TG_SOAK_OK"),
    ("slow", "sk-soak-slow", "TG_SOAK_SLOW"),
    ("cut", "sk-soak-cut", "TG_SOAK_CUT"),
    ("hang", "sk-soak-hang", "TG_SOAK_HANG"),
    ("utf8", "sk-soak-utf8", "TG_SOAK_UTF8"),
    ("truncated", "sk-soak-truncated", "TG_SOAK_TRUNCATED"),
    ("short", "sk-soak-short", "TG_SOAK_SHORT"),
    ("endless", "sk-soak-endless", "TG_SOAK_ENDLESS"),
    ("huge", "sk-soak-huge", "TG_SOAK_HUGE"),
    ("html", "sk-soak-html", "TG_SOAK_HTML"),
];

fn config(mock: &MockProvider) -> String {
    let mut providers = String::new();
    let mut models = String::new();
    for (name, _, env) in MODELS {
        providers.push_str(&format!(
            "  - {{ name: p-{name}, kind: openai, base_url: \"{base}\", retry: {{ attempts: 1 }}, \
             keys: [{{ id: {name}, secret_env: {env} }}] }}\n",
            base = mock.base_url()
        ));
        models.push_str(&format!("  - {{ name: {name}, provider: p-{name} }}\n"));
    }
    format!(
        r#"
server:
  upstream_timeout_ms: 2000
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: ["*"]
    limits: {{ concurrency: {CONCURRENCY}, tokens_per_minute: 100000000 }}
providers:
{providers}
models:
{models}
"#,
        app = sha256_hex(APP_KEY),
    )
}

fn faults(mock: &MockProvider, hang: &Arc<tokio::sync::Notify>) {
    let set = |name: &str, fault: Fault| {
        let key = MODELS.iter().find(|m| m.0 == name).expect("a model").1;
        mock.set_fault(key, fault);
    };
    set(
        "slow",
        Fault::Slow {
            delay_ms: 0,
            gap_ms: 30,
        },
    );
    set("cut", Fault::CutStreamAfter { chunks: 2 });
    set(
        "hang",
        Fault::HoldStream {
            release: Arc::clone(hang),
        },
    );
    set("utf8", Fault::InvalidUtf8Stream);
    set("truncated", Fault::TruncatedJson);
    set(
        "short",
        Fault::ShortBody {
            declared: 4096,
            sent: 100,
        },
    );
    set("endless", Fault::EndlessEvent { bytes: 1 << 20 });
    set("huge", Fault::HugeHeader { bytes: 10 << 20 });
    set("html", Fault::HtmlError { status: 502 });
}

/// xorshift64*: enough to vary the faults, and replayable from its seed.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn seconds() -> u64 {
    std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// Statuses that show the gateway broken whatever the fault: it must relay, or refuse with
/// its own error, never hang (the client's timeout) or fail to answer at all.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    gave_up: AtomicU64,
    unexpected: std::sync::Mutex<Vec<String>>,
}

/// One request of `model`, streamed or not, the client giving up after `read_chunks` chunks
/// (all of them when `None`).
async fn one(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    stream: bool,
    read_chunks: Option<u64>,
    tally: &Tally,
) {
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let body =
        json!({ "model": model, "stream": stream, "max_tokens": 20, "messages": user("soak") });
    let sent = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&body)
        .send()
        .await;
    // A provider that sends a non-streamed answer's head and then drops the connection: the
    // native host has not written the head yet when the body fails (hyper sends it with the
    // first body bytes), so its client sees the connection close; Envoy relays the head.
    let head_then_cut = model == "cut" && !stream;
    let mut r = match sent {
        Ok(r) => r,
        Err(_) if head_then_cut => return,
        Err(e) => {
            tally
                .unexpected
                .lock()
                .unwrap()
                .push(format!("{model} stream={stream}: no answer: {e}"));
            return;
        }
    };
    let status = r.status().as_u16();
    let expected: &[u16] = match (model, stream) {
        // Relayed as they came, a stream's faults in its body.
        ("ok" | "slow" | "cut" | "utf8" | "endless" | "hang", true) => &[200],
        ("ok" | "slow" | "utf8" | "endless" | "truncated", false) => &[200],
        ("cut", false) => &[200, 502],
        // The provider never answers: the gateway's upstream timeout.
        ("hang", false) => &[504],
        // A body shorter than its length: relayed until it fails, or refused.
        ("short", _) => &[200, 502],
        // Unreadable heads and the provider's edge failing.
        ("huge" | "html", _) => &[502],
        _ => &[],
    };
    // 429: a slot a departed client has not yet given back (in Envoy, a moment after it left).
    if !expected.contains(&status) && status != 429 {
        let text = r.text().await.unwrap_or_default();
        tally.unexpected.lock().unwrap().push(format!(
            "{model} stream={stream}: {status} {}",
            text.chars().take(200).collect::<String>()
        ));
        return;
    }
    let mut read = 0;
    loop {
        if read_chunks.is_some_and(|n| read >= n) {
            tally.gave_up.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match r.chunk().await {
            Ok(Some(_)) => read += 1,
            // The end, or the cut the fault makes.
            Ok(None) | Err(_) => return,
        }
    }
}

async fn soak(host: Host) {
    let envs: Vec<(&'static str, &'static str)> = MODELS.iter().map(|m| (m.2, m.1)).collect();
    let f = Stack::start(host, config, envs).await;
    let hang = Arc::new(tokio::sync::Notify::new());
    faults(&f.mock, &hang);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| unix_ms() | 1);
    let duration = Duration::from_secs(seconds());
    eprintln!("soak {host:?}: {} s, seed {seed}", duration.as_secs());
    let url = f.gateway.base_url();
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + duration;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let url = url.clone();
        let tally = Arc::clone(&tally);
        let mut draw = Draw(seed.wrapping_add((c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        clients.push(tokio::spawn(async move {
            // A client of its own per task: some reuse connections, all are cut at random.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a client");
            while Instant::now() < end {
                let (model, _, _) = MODELS[draw.below(MODELS.len() as u64) as usize];
                let stream = model != "truncated"
                    && model != "short"
                    && model != "huge"
                    && model != "html"
                    && draw.below(4) != 0;
                // A hung stream is always given up on: the provider never ends it.
                let read_chunks = match (model, draw.below(3)) {
                    ("hang", _) => Some(1),
                    (_, 0) => Some(draw.below(4)),
                    _ => None,
                };
                one(&http, &url, model, stream, read_chunks, &tally).await;
            }
        }));
    }
    // Warm: a third of the way in, every path has run many times.
    tokio::time::sleep(duration / 3).await;
    let warm = f.gateway.rss_bytes().expect("the gateway's RSS");
    for c in clients {
        c.await.expect("a client panicked");
    }
    // Let the gateway see the last departures and the provider's held streams time out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = f.gateway.rss_bytes().expect("the gateway's RSS");
    let requests = tally.requests.load(Ordering::Relaxed);
    eprintln!(
        "soak {host:?}: {requests} requests ({} given up), RSS warm {:.1} MiB, after {:.1} MiB",
        tally.gave_up.load(Ordering::Relaxed),
        warm as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
    let unexpected = tally.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} of {requests} answers were wrong (seed {seed}): {:#?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(20)]
    );
    let bound = (warm as f64 * (1.0 + RSS_GROWTH)) as u64 + RSS_SLACK;
    assert!(
        after <= bound,
        "RSS grew from {warm} to {after} bytes (bound {bound}; seed {seed})"
    );

    // Every slot is free: the consumer can hold as many streams as its limit allows.
    f.mock.clear_fault(MODELS[0].1);
    let hold = Arc::new(tokio::sync::Notify::new());
    f.mock.set_fault(
        MODELS[0].1,
        Fault::HoldStream {
            release: Arc::clone(&hold),
        },
    );
    let mut held = Vec::new();
    for i in 0..CONCURRENCY {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = f
                .http
                .post(f.url("/v1/chat/completions"))
                .bearer_auth(APP_KEY)
                .json(&json!({ "model": "ok", "stream": true, "messages": user("hold") }))
                .send()
                .await
                .expect("an answer");
            if r.status() == 200 {
                held.push(r);
                break;
            }
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            assert!(
                status == 429 && Instant::now() < deadline,
                "stream {i} of {CONCURRENCY}: {status} {text} (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let over: Value = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "model": "ok", "messages": user("one more") }))
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .unwrap_or_default();
    assert!(
        over["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("concurrency")),
        "the limit did not hold: {over}"
    );
    hold.notify_waiters();
    for mut r in held {
        while let Ok(Some(_)) = r.chunk().await {}
    }
    hang.notify_waiters();

    // And it still serves.
    f.mock.clear_fault(MODELS[0].1);
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "model": "ok", "messages": user("still there?") }))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

both_hosts!(soak);
