//! Issue #6 acceptance: Alembic `upgrade head` and `downgrade -1` through
//! shardgate (the Alembic CLI, psycopg2 driver, in the Python test venv)
//! change every shard in one atomic transaction and keep `alembic_version`
//! identical on all of them.
//!
//! The environment is `tests/fixtures/alembic` (revision a1 creates the
//! replicated table `widgets` with two rows, b2 adds a column and updates a
//! row). Alembic runs each command in one transaction: shardgate broadcasts
//! the DDL and the version-table writes to every shard and commits with
//! two-phase commit; Alembic checks that `UPDATE alembic_version` matched
//! exactly one row, which holds only if shardgate reports one shard's count.
//!
//! The venv is the one of `tests/python_clients.rs` (same requirements file,
//! same cache key): `target/python-venv/<FNV-1a of requirements.txt>/`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::{connect, fleet, shard_map, start_proxy};
use tokio::process::Command;
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(600);

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// FNV-1a, the venv cache key of `tests/python_clients.rs`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn run(command: &mut Command, what: &str) -> Result<Output, String> {
    support::run_checked(command, what, TIMEOUT).await
}

async fn usable(venv: &Path) -> bool {
    let mut command = Command::new(venv.join("bin/python"));
    command.args(["-c", "import psycopg2, sqlalchemy, alembic"]);
    run(&mut command, "import check").await.is_ok()
}

/// The venv's python, built like `tests/python_clients.rs` builds it when
/// missing (staged, then renamed).
async fn python() -> &'static Path {
    static VENV: OnceCell<PathBuf> = OnceCell::const_new();
    VENV.get_or_init(|| async {
        let requirements = manifest().join("tests/python/requirements.txt");
        let text = tokio::fs::read(&requirements)
            .await
            .expect("requirements.txt");
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("python-venv");
        tokio::fs::create_dir_all(&root).await.expect("venv root");
        let venv = root.join(format!("{:016x}", fnv1a(&text)));
        if !usable(&venv).await {
            let interpreter =
                std::env::var("SHARDGATE_PYTHON").unwrap_or_else(|_| "python3".to_string());
            let staging = venv.with_extension(format!("partial-{}", std::process::id()));
            let _ = tokio::fs::remove_dir_all(&staging).await;
            let started = Instant::now();
            run(
                Command::new(&interpreter)
                    .args(["-m", "venv"])
                    .arg(&staging),
                "python3 -m venv",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            run(
                Command::new(staging.join("bin/python"))
                    .args(["-m", "pip", "install", "--disable-pip-version-check"])
                    .args(["--no-input", "-q", "--timeout", "30", "-r"])
                    .arg(&requirements),
                "pip install -r tests/python/requirements.txt",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            if tokio::fs::rename(&staging, &venv).await.is_err() && !usable(&venv).await {
                panic!("could not move the venv into {}", venv.display());
            }
            let _ = tokio::fs::remove_dir_all(&staging).await;
            eprintln!("python venv built in {:.1?}", started.elapsed());
        }
        venv.join("bin/python")
    })
    .await
}

/// `alembic <args>` against `url`; panics with its output when it fails.
async fn alembic(url: &str, args: &[&str]) -> String {
    let ini = manifest().join("tests/fixtures/alembic/alembic.ini");
    let mut command = Command::new(python().await);
    command
        .args(["-m", "alembic", "-c"])
        .arg(&ini)
        .args(args)
        .env("SHARDGATE_ALEMBIC_URL", url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PGCONNECT_TIMEOUT", "10");
    let output = run(&mut command, &format!("alembic {}", args.join(" ")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("alembic {}:\n{text}", args.join(" "));
    text
}

async fn fresh_db(name: &str) -> String {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || support::fresh_db(&name))
        .await
        .expect("fresh_db")
}

/// What one shard holds: the alembic_version rows, widgets' columns, and
/// widgets' rows as text (None: no such table).
#[derive(Debug, PartialEq, Eq)]
struct ShardState {
    versions: Vec<String>,
    columns: Vec<String>,
    rows: Option<Vec<String>>,
}

async fn shard_states(db: &str) -> Vec<ShardState> {
    let mut states = Vec::new();
    for cluster in &fleet().clusters {
        let client = connect(cluster, db).await;
        let versions = match client
            .query("SELECT version_num FROM alembic_version ORDER BY 1", &[])
            .await
        {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(_) => vec!["<no alembic_version>".to_string()],
        };
        let columns = client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_name = 'widgets' ORDER BY ordinal_position",
                &[],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows = client
            .query("SELECT widgets::text FROM widgets ORDER BY id", &[])
            .await
            .ok()
            .map(|rows| rows.iter().map(|r| r.get(0)).collect());
        let prepared: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .expect("pg_prepared_xacts")
            .get(0);
        assert_eq!(
            prepared,
            0,
            "no prepared transaction left on {}",
            cluster.name()
        );
        states.push(ShardState {
            versions,
            columns,
            rows,
        });
    }
    states
}

/// Every shard in `expected`.
fn assert_everywhere(states: &[ShardState], expected: &ShardState, step: &str) {
    for (i, state) in states.iter().enumerate() {
        assert_eq!(state, expected, "shard s{i} after {step}");
    }
}

async fn upgrade_and_downgrade_through_shardgate(name: &str, tables: &str) {
    let db = fresh_db(name).await;
    let server = start_proxy(&shard_map(&db, tables)).await;
    let url = format!(
        "postgresql+psycopg2://app@127.0.0.1:{}/{db}",
        server.address.port()
    );

    alembic(&url, &["upgrade", "head"]).await;
    let head = ShardState {
        versions: vec!["b2".into()],
        columns: vec!["id".into(), "name".into(), "colour".into()],
        rows: Some(vec!["(1,first,red)".into(), "(2,second,blue)".into()]),
    };
    assert_everywhere(&shard_states(&db).await, &head, "upgrade head");
    let current = alembic(&url, &["current"]).await;
    assert!(current.contains("b2 (head)"), "{current}");

    alembic(&url, &["downgrade", "-1"]).await;
    let first = ShardState {
        versions: vec!["a1".into()],
        columns: vec!["id".into(), "name".into()],
        rows: Some(vec!["(1,first)".into(), "(2,second)".into()]),
    };
    assert_everywhere(&shard_states(&db).await, &first, "downgrade -1");

    // And back to nothing, and up again: the version row is deleted and
    // re-inserted on every shard.
    alembic(&url, &["downgrade", "base"]).await;
    let base = ShardState {
        versions: vec![],
        columns: vec![],
        rows: None,
    };
    assert_everywhere(&shard_states(&db).await, &base, "downgrade base");
    alembic(&url, &["upgrade", "head"]).await;
    assert_everywhere(&shard_states(&db).await, &head, "upgrade head again");
    server.stop().await;
}

/// The fixture itself, against one Postgres database directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_fixture_works_on_postgres_directly() {
    let db = fresh_db("alembic_direct").await;
    let url = format!(
        "postgresql+psycopg2://postgres@127.0.0.1:{}/{db}",
        fleet().clusters[0].port()
    );
    alembic(&url, &["upgrade", "head"]).await;
    alembic(&url, &["downgrade", "-1"]).await;
    let client = connect(&fleet().clusters[0], &db).await;
    let version: String = client
        .query_one("SELECT version_num FROM alembic_version", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, "a1");
}

/// `alembic_version` named in the map as replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_with_a_replicated_version_table_changes_every_shard() {
    upgrade_and_downgrade_through_shardgate(
        "alembic_mapped",
        "default_table: error\n\
         tables:\n  \
           widgets: { replicated: true }\n  \
           alembic_version: { replicated: true }\n",
    )
    .await;
}

/// `default_table: replicated` covers both tables (the map names one
/// unrelated sharded table: see the next test for why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_with_default_table_replicated_changes_every_shard() {
    upgrade_and_downgrade_through_shardgate(
        "alembic_default",
        "default_table: replicated\n\
         functions: { by_id: { kind: hash } }\n\
         tables:\n  \
           unrelated: { key: id, function: by_id }\n",
    )
    .await;
}

/// A map with several shards and no `tables:` at all: `server::start`
/// builds no router then, and every statement goes to shard s0, so with
/// `default_table: replicated` Alembic "succeeds" while s1 and s2 stay
/// empty. Fails until the router is built whenever there is more than one
/// shard (see the report of the `atomic` branch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_with_no_tables_in_the_map_changes_every_shard() {
    upgrade_and_downgrade_through_shardgate("alembic_no_tables", "default_table: replicated\n")
        .await;
}

/// Issue #6: migration tools' version tables are replicated without a map
/// entry, even with `default_table: error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alembic_version_is_replicated_without_a_map_entry() {
    upgrade_and_downgrade_through_shardgate(
        "alembic_unmapped",
        "default_table: error\n\
         tables:\n  \
           widgets: { replicated: true }\n",
    )
    .await;
}
