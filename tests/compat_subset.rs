//! The bounded CI subset of the driver compatibility runner (issue #14):
//! a selection of asyncpg's own test suite (`tests/compat/subset.txt`, from
//! asyncpg's source package at the version pinned in
//! `tests/python/requirements.txt`) runs against a fresh Postgres cluster
//! directly and through shardgate B (one shard, `default_table: replicated`,
//! this build's binary). Every selected test that passes directly must pass
//! through shardgate, except those named with their defect in
//! `tests/compat/subset-expected-failures.txt`, which must still fail.
//! The full runner is `tests/compat/run.sh`; see `tests/compat/README.md`.
//!
//! Uses the Python venv of `tests/python_clients.rs` (same pin file, same
//! cache key under the target dir) and needs `python3` with `venv`
//! (`tests/setup.sh` installs it).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn asyncpg_suite_selection_passes_through_shardgate_as_directly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`: the venv and the downloaded
    // suite are cached under the target dir, as the other Python tests do.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir");
    let python = std::env::var("SHARDGATE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let started = Instant::now();
    let output = Command::new(&python)
        .arg(root.join("tests/compat/run.py"))
        .args(["--subset", "--test-timeout", "20", "--run-timeout", "120"])
        .arg("--shardgate-bin")
        .arg(env!("CARGO_BIN_EXE_shardgate"))
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap_or_else(|e| panic!("running {python} tests/compat/run.py --subset: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    eprintln!("compat subset took {:.1?}", started.elapsed());
    assert!(
        output.status.success(),
        "tests/compat/run.py --subset failed ({}):\n{stdout}",
        output.status
    );
}
