//! Real Python clients through shardgate in transaction pooling mode:
//! psycopg2, psycopg 3 (pipeline mode, prepared statements, binary), asyncpg
//! (named prepared statements everywhere, binary, a pool of 10 with 200
//! concurrent jobs) and SQLAlchemy 2 (psycopg and asyncpg drivers).
//!
//! The scripts live in `tests/python/`; each takes a URL, asserts real
//! results and exits non-zero naming the failed step. Every script runs
//! first against Postgres directly (so a failure there is the script's fault)
//! and then through shardgate. The venv is built once with
//! `python3 -m venv` + `pip install -r tests/python/requirements.txt` and
//! cached under `target/python-venv/<hash of requirements.txt>/`.
//! `SHARDGATE_PYTHON` overrides the interpreter used to create it.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::OnceCell;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const VENV_TIMEOUT: Duration = Duration::from_secs(600);

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// FNV-1a: a hash that is the same on every build and machine (the cache key).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn venv_is_usable(venv: &Path) -> bool {
    let mut command = Command::new(venv.join("bin/python"));
    command.args(["-c", "import psycopg2, psycopg, asyncpg, sqlalchemy"]);
    support::run_checked(&mut command, "import check", Duration::from_secs(60))
        .await
        .is_ok()
}

async fn build_venv(requirements: &Path, venv: &Path) -> Result<(), String> {
    let interpreter = std::env::var("SHARDGATE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    // Build next to the final place and rename, so a half-built venv is never used
    // and concurrent test processes do not trip over each other.
    let staging = venv.with_extension(format!("partial-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&staging).await;
    let result = async {
        support::run_checked(
            Command::new(&interpreter)
                .args(["-m", "venv"])
                .arg(&staging),
            &format!("`{interpreter} -m venv` (Debian/Ubuntu: apt-get install python3-venv)"),
            VENV_TIMEOUT,
        )
        .await?;
        support::run_checked(
            Command::new(staging.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "-q",
                ])
                .args(["--timeout", "30", "-r"])
                .arg(requirements),
            "`pip install -r tests/python/requirements.txt` (is PyPI reachable? CI has PyPI)",
            VENV_TIMEOUT,
        )
        .await?;
        if !venv_is_usable(&staging).await {
            return Err(
                "the new venv cannot import psycopg2, psycopg, asyncpg and sqlalchemy".to_string(),
            );
        }
        match tokio::fs::rename(&staging, venv).await {
            Ok(()) => Ok(()),
            // Another test process finished first: use its venv.
            Err(_) if venv_is_usable(venv).await => Ok(()),
            Err(e) => Err(format!(
                "moving {} to {}: {e}",
                staging.display(),
                venv.display()
            )),
        }
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&staging).await;
    result
}

/// The venv's python, built on first use (once per test binary).
async fn python() -> &'static Path {
    static VENV: OnceCell<PathBuf> = OnceCell::const_new();
    VENV.get_or_init(|| async {
        let requirements = python_dir().join("requirements.txt");
        let text = tokio::fs::read(&requirements)
            .await
            .unwrap_or_else(|e| panic!("reading {}: {e}", requirements.display()));
        // CARGO_TARGET_TMPDIR is `<target dir>/tmp`, so this honours CARGO_TARGET_DIR.
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_path_buf();
        let root = target.join("python-venv");
        tokio::fs::create_dir_all(&root)
            .await
            .unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
        let venv = root.join(format!("{:016x}", fnv1a(&text)));
        if !venv_is_usable(&venv).await {
            let _ = tokio::fs::remove_dir_all(&venv).await;
            let started = Instant::now();
            build_venv(&requirements, &venv).await.unwrap_or_else(|e| {
                panic!(
                    "could not create the Python venv for the client tests at {}:\n{e}",
                    venv.display()
                )
            });
            eprintln!(
                "python venv built in {:.1?} at {}",
                started.elapsed(),
                venv.display()
            );
        }
        venv.join("bin/python")
    })
    .await
}

/// Runs one script against `url`; panics with its output unless it succeeds.
/// `target` is "direct" or "shardgate" (scripts tolerate known shardgate bugs
/// only through shardgate).
async fn run_script(script: &str, url: &str, target: &str) {
    let against = if target == "direct" {
        "Postgres directly"
    } else {
        "shardgate (transaction pooling)"
    };
    let started = Instant::now();
    let mut command = Command::new(python().await);
    command
        .arg(python_dir().join(script))
        .arg(url)
        .current_dir(python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("SHARDGATE_TEST_TARGET", target);
    match support::run_checked(
        &mut command,
        &format!("{script} against {against}"),
        SCRIPT_TIMEOUT,
    )
    .await
    {
        Ok(output) => eprintln!(
            "{script} against {against}: passed in {:.1?}\n{}",
            started.elapsed(),
            String::from_utf8_lossy(&output.stdout)
        ),
        Err(report) => panic!("{report}"),
    }
}

async fn fresh_db(name: &str) -> String {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || support::fresh_db(&name))
        .await
        .expect("fresh_db panicked")
}

/// The script against Postgres itself (user postgres), then through shardgate
/// (user app, trust auth, transaction pooling with 4 backends per shard).
async fn client_through_shardgate(script: &str, name: &str) {
    python().await;
    let direct_db = fresh_db(&format!("{name}_direct")).await;
    let direct_url = support::fleet().clusters[0].url(&direct_db);
    run_script(script, &direct_url, "direct").await;

    let db = fresh_db(name).await;
    let server = support::start_proxy(&support::shard_map(
        &db,
        "pool: { mode: transaction, size: 4 }\n",
    ))
    .await;
    let url = format!("postgresql://app@127.0.0.1:{}/{db}", server.address.port());
    run_script(script, &url, "shardgate").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_through_shardgate() {
    client_through_shardgate("psycopg2_client.py", "py_psycopg2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_pipeline_prepared_binary_through_shardgate() {
    client_through_shardgate("psycopg3_client.py", "py_psycopg3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_binary_pool_through_shardgate() {
    client_through_shardgate("asyncpg_client.py", "py_asyncpg").await;
}

/// asyncpg over a table sharded on 3 shards: cursors (Execute with a row
/// limit, MOVE), every fetch a part of a multi-shard portal (issue #5), and
/// executemany inside a transaction (one batch over several shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_cursors_and_batches_over_a_sharded_table() {
    script_over_three_shards(
        "asyncpg_sharded.py",
        "py_cursor",
        "functions:\n  by_id: { kind: hash }\n\
         tables:\n  cur_items: { key: id, function: by_id }\n",
        ("cur_items", 1100),
    )
    .await;
}

/// The script against Postgres, then through shardgate over the three
/// shards with `map` (transaction pooling, 4 backends per shard); then
/// `table` must have rows on every shard and `rows` in all.
async fn script_over_three_shards(script: &str, name: &str, map: &str, (table, rows): (&str, i64)) {
    python().await;
    let direct_db = fresh_db(&format!("{name}_direct")).await;
    run_script(
        script,
        &support::fleet().clusters[0].url(&direct_db),
        "direct",
    )
    .await;
    let db = fresh_db(name).await;
    let server = support::start_proxy(&support::shard_map(
        &db,
        &format!("pool: {{ mode: transaction, size: 4 }}\n{map}"),
    ))
    .await;
    let url = format!("postgresql://app@127.0.0.1:{}/{db}", server.address.port());
    run_script(script, &url, "shardgate").await;
    server.stop().await;
    // The rows really are spread over the shards.
    let per_shard = support::rows_per_shard(&db, table).await;
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "{table}: rows per shard: {per_shard:?}"
    );
    assert_eq!(per_shard.iter().sum::<i64>(), rows, "{table}: rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_psycopg_and_asyncpg_through_shardgate() {
    client_through_shardgate("sqlalchemy_client.py", "py_sqlalchemy").await;
}

/// Issue #14 through a 3-shard map with routing on: SQLAlchemy ORM flush,
/// bulk insert, row locks, JSONB and an asyncpg async engine on a sharded
/// table; asyncpg pool reset at 40 releases; an `executemany` failing
/// half-way leaves nothing; DEALLOCATE ALL, CLOSE ALL, server-side cursors;
/// 25P02 after an error in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_applications_over_three_shards() {
    script_over_three_shards(
        "routed_apps.py",
        "py_routed",
        "functions:\n  by_id: { kind: hash }\n\
         tables:\n  ra_employee: { key: id, function: by_id }\n\
         default_table: replicated\n",
        ("ra_employee", 51),
    )
    .await;
}

/// Issue #14: an enum type with a different OID on each of three shards
/// (a padding type created on two of them first): asyncpg (type
/// introspection by OID, binary enum arrays) and psycopg (a registered enum,
/// its OID declared in Parse) read and write rows on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_defined_types_with_different_oids_per_shard() {
    python().await;
    let schema = "CREATE TYPE rt_mood AS ENUM ('sad', 'ok', 'happy');\
                  CREATE TABLE rt_items (id bigint PRIMARY KEY, m rt_mood, ms rt_mood[]);";
    let direct_db = fresh_db("py_types_direct").await;
    support::connect(&support::fleet().clusters[0], &direct_db)
        .await
        .batch_execute(schema)
        .await
        .expect("direct schema");
    run_script(
        "routed_types.py",
        &support::fleet().clusters[0].url(&direct_db),
        "direct",
    )
    .await;
    let db = fresh_db("py_types").await;
    let mut oids = Vec::new();
    for (i, cluster) in support::fleet().clusters.iter().enumerate() {
        let client = support::connect(cluster, &db).await;
        for pad in 0..i {
            client
                .batch_execute(&format!("CREATE TYPE rt_pad{pad} AS (a int)"))
                .await
                .expect("padding type");
        }
        client
            .batch_execute(schema)
            .await
            .expect("schema on a shard");
        let oid: u32 = client
            .query_one("SELECT 'rt_mood'::regtype::oid", &[])
            .await
            .expect("oid")
            .get(0);
        oids.push(oid);
    }
    assert!(
        oids.windows(2).all(|w| w[0] != w[1]),
        "OIDs do not differ: {oids:?}"
    );
    let server = support::start_proxy(&support::shard_map(
        &db,
        "pool: { mode: transaction, size: 4 }\n\
         functions:\n  by_id: { kind: hash }\n\
         tables:\n  rt_items: { key: id, function: by_id }\n\
         default_table: replicated\n",
    ))
    .await;
    let url = format!("postgresql://app@127.0.0.1:{}/{db}", server.address.port());
    run_script("routed_types.py", &url, "shardgate").await;
    server.stop().await;
    let per_shard = support::rows_per_shard(&db, "rt_items").await;
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "rows per shard: {per_shard:?}"
    );
}
