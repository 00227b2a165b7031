//! Measures `tollgate_core::tokens::estimate_text` against OpenAI's tokenizers (o200k_base,
//! cl100k_base) on a generated, deterministic sample, and its throughput. Prints Markdown.
//!
//!     cargo run --release --manifest-path tools/token-accuracy/Cargo.toml [-- OPTIONS]
//!
//! Options: `--seed N` (default 1), `--worst N` (also list the N worst texts per tokenizer),
//! `--cat CATEGORY` (with `--worst`: only that category), `--show CATEGORY` (print that
//! category's first texts, to eyeball the generator), `--files PATH...` (also measure these
//! files, cut at blank lines into pieces of up to 3 KB, as one more category: a check on real
//! text besides the generated sample, such as this repository's own sources and docs).

mod corpus;
mod gen;

use std::hint::black_box;
use std::time::{Duration, Instant};

use tollgate_core::tokens::estimate_text;

struct Row {
    cat: usize,
    text: String,
    est: u64,
    old: u64,
    o200k: u64,
    cl100k: u64,
}

#[derive(Default)]
struct Stats {
    n: usize,
    tokens: u64,
    mean_signed: f64,
    mean_abs: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    under: f64,
    ratio: f64,
    old_mean_abs: f64,
}

fn rel(est: u64, truth: u64) -> f64 {
    (est as f64 - truth as f64) / truth.max(1) as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn stats<'a>(rows: impl Iterator<Item = &'a Row>, truth: fn(&Row) -> u64) -> Stats {
    let (mut signed, mut abs, mut old_abs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut under, mut sum_est, mut sum_true) = (0usize, 0u64, 0u64);
    for r in rows {
        let t = truth(r);
        let e = rel(r.est, t);
        signed.push(e);
        abs.push(e.abs());
        old_abs.push(rel(r.old, t).abs());
        under += usize::from(r.est < t);
        sum_est += r.est;
        sum_true += t;
    }
    let n = signed.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    abs.sort_by(f64::total_cmp);
    Stats {
        n,
        tokens: sum_true,
        mean_signed: mean(&signed),
        mean_abs: mean(&abs),
        p50: percentile(&abs, 0.50),
        p90: percentile(&abs, 0.90),
        p99: percentile(&abs, 0.99),
        under: under as f64 / n.max(1) as f64,
        ratio: sum_est as f64 / sum_true.max(1) as f64,
        old_mean_abs: mean(&old_abs),
    }
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", 100.0 * x)
}

fn upct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Single-thread estimate throughput over `texts`, in MB/s (10^6 bytes per second).
fn throughput(texts: &[&str], min: Duration) -> f64 {
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    if bytes == 0 {
        return f64::NAN;
    }
    // Warm up, then repeat whole passes until `min` has elapsed.
    let mut sink = 0u64;
    for t in texts {
        sink = sink.wrapping_add(estimate_text(black_box(t)));
    }
    let start = Instant::now();
    let mut passes = 0u64;
    while start.elapsed() < min {
        for t in texts {
            sink = sink.wrapping_add(estimate_text(black_box(t)));
        }
        passes += 1;
    }
    black_box(sink);
    (bytes as u64 * passes) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn table(
    title: &str,
    names: &[&str],
    rows: &[Row],
    truth: fn(&Row) -> u64,
    mbps: &[f64],
    total_mbps: f64,
) {
    println!("### Against {title}\n");
    println!("| category | texts | true tokens | mean signed err | mean abs err | p50 abs | p90 abs | p99 abs | under-estimated | sum est / sum true | bytes/4 mean abs err | MB/s |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let line = |name: &str, s: Stats, mb: f64| {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {} | {:.0} |",
            s.n,
            s.tokens,
            pct(s.mean_signed),
            upct(s.mean_abs),
            upct(s.p50),
            upct(s.p90),
            upct(s.p99),
            upct(s.under),
            s.ratio,
            upct(s.old_mean_abs),
            mb
        );
    };
    for (ci, name) in names.iter().enumerate() {
        line(
            name,
            stats(rows.iter().filter(|r| r.cat == ci), truth),
            mbps[ci],
        );
    }
    line("**overall**", stats(rows.iter(), truth), total_mbps);
    println!();
}

fn worst(
    title: &str,
    names: &[&str],
    rows: &[Row],
    truth: fn(&Row) -> u64,
    n: usize,
    cat: Option<&str>,
) {
    let mut v: Vec<&Row> = rows
        .iter()
        .filter(|r| cat.is_none_or(|c| names[r.cat] == c))
        .collect();
    v.sort_by(|a, b| {
        rel(b.est, truth(b))
            .abs()
            .total_cmp(&rel(a.est, truth(a)).abs())
    });
    println!("### Worst {n} against {title}\n");
    for r in v.into_iter().take(n) {
        let t: String = r.text.chars().take(120).collect();
        println!(
            "- [{}] est {} true {} ({}): {:?}",
            names[r.cat],
            r.est,
            truth(r),
            pct(rel(r.est, truth(r))),
            t
        );
    }
    println!();
}

/// `text` cut at blank lines into pieces of at most about `max` bytes (a longer paragraph
/// stays whole).
fn pieces(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for para in text.split("\n\n") {
        if !cur.is_empty() && cur.len() + para.len() + 2 > max {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(para);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out.retain(|p| !p.is_empty());
    out
}

fn main() {
    let mut seed = 1u64;
    let mut n_worst = 0usize;
    let mut show: Option<String> = None;
    let mut cat: Option<String> = None;
    let mut files: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            "--worst" => n_worst = args.next().and_then(|v| v.parse().ok()).unwrap_or(10),
            "--show" => show = args.next(),
            "--cat" => cat = args.next(),
            "--files" => files.extend(args.by_ref()),
            _ => {
                eprintln!(
                    "usage: token-accuracy [--seed N] [--worst N [--cat CATEGORY]] [--show CATEGORY] \
                     [--files PATH...]"
                );
                std::process::exit(2);
            }
        }
    }

    let mut sample = gen::sample(seed);
    let mut names: Vec<&str> = gen::CATEGORIES.iter().map(|c| c.name).collect();
    if !files.is_empty() {
        let ci = names.len();
        names.push("files (not generated)");
        for path in &files {
            match std::fs::read_to_string(path) {
                Ok(text) => sample.extend(pieces(&text, 3000).into_iter().map(|p| (ci, p))),
                Err(e) => eprintln!("skipping {path}: {e}"),
            }
        }
    }
    if let Some(name) = show {
        for (ci, t) in sample.iter().filter(|(ci, _)| names[*ci] == name).take(8) {
            println!("----- [{}] {} bytes\n{t}", names[*ci], t.len());
        }
        return;
    }

    let o200k = tiktoken_rs::o200k_base().expect("o200k_base loads");
    let cl100k = tiktoken_rs::cl100k_base().expect("cl100k_base loads");
    let rows: Vec<Row> = sample
        .into_iter()
        .map(|(cat, text)| Row {
            est: estimate_text(&text),
            old: (text.len() as u64).div_ceil(4),
            o200k: o200k.encode_ordinary(&text).len() as u64,
            cl100k: cl100k.encode_ordinary(&text).len() as u64,
            cat,
            text,
        })
        .collect();

    let bytes: usize = rows.iter().map(|r| r.text.len()).sum();
    let mbps: Vec<f64> = (0..names.len())
        .map(|ci| {
            let texts: Vec<&str> = rows
                .iter()
                .filter(|r| r.cat == ci)
                .map(|r| r.text.as_str())
                .collect();
            throughput(&texts, Duration::from_millis(200))
        })
        .collect();
    let all: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let total_mbps = throughput(&all, Duration::from_secs(2));

    println!("## tollgate token estimator accuracy\n");
    println!(
        "Sample: {} texts, {} bytes, seed {seed}. Errors are relative to the tokenizer's count \
         ((estimate - true) / true, per text, each text weighted equally); under-estimated is \
         the share of texts whose estimate is below the true count. MB/s: single-thread \
         `estimate_text` throughput in this run (overall row: the whole sample).\n",
        rows.len(),
        bytes
    );
    table(
        "o200k_base (gpt-4o, gpt-4.1, o-series)",
        &names,
        &rows,
        |r| r.o200k,
        &mbps,
        total_mbps,
    );
    table(
        "cl100k_base (gpt-4, gpt-3.5-turbo)",
        &names,
        &rows,
        |r| r.cl100k,
        &mbps,
        total_mbps,
    );
    if n_worst > 0 {
        worst(
            "o200k_base",
            &names,
            &rows,
            |r| r.o200k,
            n_worst,
            cat.as_deref(),
        );
        worst(
            "cl100k_base",
            &names,
            &rows,
            |r| r.cl100k,
            n_worst,
            cat.as_deref(),
        );
    }
}
