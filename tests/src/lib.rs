//! End-to-end test harness (see tests/e2e.rs).
