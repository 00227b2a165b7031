//! The core's per-request path (a 1 KB chat request to an OpenAI model: authenticate, route,
//! rewrite, finish) run N times, for `valgrind --tool=callgrind` to count instructions:
//! stable on noisy machines, unlike time. `make bench-instructions` runs it twice (N and 0
//! requests) and prints instructions per request.

use std::hint::black_box;
use std::sync::Arc;

use tollgate_core::exchange::{OnBody, OnHeaders};
use tollgate_core::http::RequestHead;
use tollgate_core::store::LocalStore;
use tollgate_core::Exchange;

mod fixtures;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let config = fixtures::config();
    let headers = fixtures::headers();
    let body = fixtures::chat_body("gpt-4o-mini");
    let store = LocalStore::default();
    for _ in 0..n {
        let mut x = Exchange::new(Arc::clone(&config));
        let head = RequestHead {
            method: "POST",
            path: "/v1/chat/completions",
            headers: &headers,
        };
        if let OnHeaders::Respond(r) = x.on_request_headers(1, &head, &store) {
            eprintln!("refused: {}", r.status);
            std::process::exit(1);
        }
        match x.on_request_body(2, black_box(&body), &store) {
            OnBody::Forward(f) => black_box(f.provider),
            OnBody::Respond(r) => black_box(r.body.len()),
        };
        black_box(x.finish(3, &store));
    }
}
