//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through the fuzz targets' own
//! logic on stable, so every `cargo test` re-checks what fuzzing found interesting (inputs
//! that reached new code, and fixed crashes once added there). The targets and their input
//! layouts are in `fuzz/harness.rs`; fuzzing itself needs nightly and cargo-fuzz, see
//! `docs/fuzzing.md`.

#[allow(dead_code)]
mod harness {
    include!("../../fuzz/harness.rs");
}

use std::path::PathBuf;

/// Runs every file of `fuzz/corpus/<target>/` through `run`, naming the file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    replay_dir("corpus", target, run);
}

/// Runs every file of `fuzz/<kind>/<target>/` through `run`.
fn replay_dir(kind: &str, target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails; reproduce with `cargo +nightly fuzz run {target} {}`",
            file.display(),
            file.display()
        );
    }
}

macro_rules! corpus_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), harness::$target);
            }
        )*
    };
}

corpus_tests!(
    sse,
    openai_usage,
    openai_wire,
    config_load,
    prompt_render,
    signals,
    anthropic_provider,
    anthropic_client,
    refusal,
    exchange,
);
