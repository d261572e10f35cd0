//! pgjdbc (Debian's libpostgresql-jdbc-java, run with the machine's JDK)
//! against a table sharded over 3 shards: batch inserts with autocommit
//! off, ResultSets read with a fetch size (multi-shard portals fetched in
//! parts), another query between two fetches, a failing batch rolled back,
//! server-prepared statements. The program (tests/java/ShardgateJdbc.java)
//! runs against Postgres directly first, then through shardgate.
//! `.ci/run` installs the driver and a JDK when they are missing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);

/// The pgjdbc jar: `SHARDGATE_PGJDBC_JAR`, or Debian's.
fn driver_jar() -> PathBuf {
    let jar = std::env::var("SHARDGATE_PGJDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.exists(),
        "the JDBC test needs pgjdbc at {} (Debian: apt-get install libpostgresql-jdbc-java \
         default-jdk-headless; or set SHARDGATE_PGJDBC_JAR)",
        jar.display()
    );
    jar
}

/// Compiles the test program into the target directory; its class path.
async fn compile(jar: &Path) -> String {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/ShardgateJdbc.java");
    let classes = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jdbc-classes");
    tokio::fs::create_dir_all(&classes)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", classes.display()));
    let mut javac = Command::new("javac");
    javac
        .arg("-d")
        .arg(&classes)
        .arg("-cp")
        .arg(jar)
        .arg(&source);
    if let Err(e) = support::run_checked(&mut javac, "javac", PROGRAM_TIMEOUT).await {
        panic!("{e}\n(the JDBC test needs a JDK: apt-get install default-jdk-headless)");
    }
    format!("{}:{}", classes.display(), jar.display())
}

async fn run_program(class_path: &str, url: &str, against: &str) {
    let mut java = Command::new("java");
    java.arg("-cp")
        .arg(class_path)
        .arg("ShardgateJdbc")
        .arg(url);
    match support::run_checked(
        &mut java,
        &format!("pgjdbc against {against}"),
        PROGRAM_TIMEOUT,
    )
    .await
    {
        Ok(output) => eprintln!(
            "pgjdbc against {against}:\n{}",
            String::from_utf8_lossy(&output.stdout)
        ),
        Err(report) => panic!("{report}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_batches_and_fetch_size_over_a_sharded_table() {
    let class_path = compile(&driver_jar()).await;
    let direct_db = support::fresh_db("jdbc_direct");
    let cluster = &support::fleet().clusters[0];
    let direct = format!(
        "jdbc:postgresql://{}:{}/{direct_db}?user=postgres",
        cluster.host(),
        cluster.port()
    );
    run_program(&class_path, &direct, "Postgres directly").await;

    let db = support::fresh_db("jdbc_sharded");
    let server = support::start_proxy(&support::shard_map(
        &db,
        "pool: { mode: transaction, size: 4 }\n\
         functions:\n  by_id: { kind: hash }\n\
         tables:\n  jitems: { key: id, function: by_id }\n",
    ))
    .await;
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/{db}?user=app",
        server.address.port()
    );
    run_program(&class_path, &url, "shardgate").await;
    server.stop().await;
    // The program's rows really are spread over the shards.
    let per_shard = support::rows_per_shard(&db, "jitems").await;
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "rows per shard: {per_shard:?}"
    );
    assert_eq!(per_shard.iter().sum::<i64>(), 1000);
}
