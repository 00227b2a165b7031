//! The fuzz targets' logic, shared with `core/tests/fuzz_corpora.rs` (which replays the
//! checked-in corpora on stable): both `include!` `harness.rs`.

include!("../harness.rs");
