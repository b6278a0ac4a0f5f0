//! Where things are: the workspace root and the fixture scripts in
//! `tests/fixtures/`.

use std::path::{Path, PathBuf};

/// The workspace root (this crate is `tests/kit/` below it). For tests,
/// benchmarks and tools run from the checkout they were built in.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// A fixture script in `tests/fixtures/` (`backend.py`, `mock_replica.py`,
/// `metrics_server.py`, `known_answers.py`).
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests").join("fixtures").join(name)
}
