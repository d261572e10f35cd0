//! Issue #14: protocol details real drivers depend on, over the raw wire,
//! each checked against Postgres directly, through shardgate as a plain
//! pooler (one shard, no `tables`) and with routing on over three shards:
//! - a fresh Parse never inherits a plan from before a schema change
//!   (`cached plan must not change result type` after an ALTER);
//! - protocol and SQL prepared statements share one namespace
//!   (`DEALLOCATE s1` of a Parse'd `s1`; `DEALLOCATE ALL`);
//! - a Parse the server rejected leaves no name behind;
//! - `BEGIN; <error>; SELECT 1` gives 25P02 and status E;
//! - a shard's error reaches the client with every field (constraint,
//!   table, schema, …) as Postgres sends it.

mod support;

use support::wire::{self, Msg, Wire};
use support::{connect, fleet, fresh_db, shard_map, start_proxy};

/// Where a scenario runs.
struct Targets {
    /// (label, port, database, user)
    list: Vec<(&'static str, u16, String, &'static str)>,
    _servers: Vec<shardgate::server::RunningServer>,
}

const SCHEMA: &str = "CREATE TABLE sp (id bigint PRIMARY KEY, b int);\
                      INSERT INTO sp VALUES (1, 10), (2, 20), (3, 30);\
                      CREATE TABLE ck (id int PRIMARY KEY, v int CHECK (v > 0));\
                      CREATE TABLE names (name text PRIMARY KEY);";

async fn targets(name: &str) -> Targets {
    // Postgres itself.
    let direct_db = fresh_db(&format!("{name}_direct"));
    connect(&fleet().clusters[0], &direct_db)
        .await
        .batch_execute(SCHEMA)
        .await
        .expect("direct schema");
    // A: a plain pooler over one shard, one backend (every client shares it).
    let pooler_db = fresh_db(&format!("{name}_pool"));
    connect(&fleet().clusters[0], &pooler_db)
        .await
        .batch_execute(SCHEMA)
        .await
        .expect("pooler schema");
    let pooler_map = format!(
        "listen: 127.0.0.1:0\nauth: trust\nusers:\n  - {{ name: app }}\n\
         pool: {{ mode: transaction, size: 1 }}\n\
         shards:\n  - {{ name: s0, url: \"{}\" }}\n",
        fleet().clusters[0].url(&pooler_db)
    );
    let pooler = start_proxy(&pooler_map).await;
    // C: routing on, three shards, `sp` sharded by id.
    let routed_db = fresh_db(&format!("{name}_routed"));
    let routed = start_proxy(&shard_map(
        &routed_db,
        "pool: { mode: transaction, size: 1 }\nfunctions:\n  by_id: { kind: hash }\n\
         tables:\n  sp: { key: id, function: by_id }\n  names: { key: name, function: by_id }\n\
         default_table: replicated\n",
    ))
    .await;
    let mut loader = Wire::connect(routed.address.port(), "app", &routed_db).await;
    for statement in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        let answers = loader.exchange(&wire::query(statement), 1).await;
        assert!(
            answers.iter().all(|m| m.tag != b'E'),
            "{statement}: {answers:?}"
        );
    }
    Targets {
        list: vec![
            (
                "postgres",
                fleet().clusters[0].port(),
                direct_db,
                "postgres",
            ),
            ("pooler", pooler.address.port(), pooler_db, "app"),
            ("routed", routed.address.port(), routed_db, "app"),
        ],
        _servers: vec![pooler, routed],
    }
}

fn codes(messages: &[Msg]) -> Vec<String> {
    messages.iter().filter_map(Msg::error_code).collect()
}

fn tags(messages: &[Msg]) -> String {
    messages.iter().map(|m| m.tag as char).collect()
}

fn rows(messages: &[Msg]) -> usize {
    messages.iter().filter(|m| m.tag == b'D').count()
}

/// Each DataRow's fields joined by `|` (NULL as empty).
fn rows_joined(messages: &[Msg]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            wire::fields_of_row(&m.body)
                .into_iter()
                .map(|f| f.unwrap_or_default())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

fn status(messages: &[Msg]) -> u8 {
    messages
        .iter()
        .rev()
        .find(|m| m.tag == b'Z')
        .and_then(|m| m.body.first().copied())
        .unwrap_or(0)
}

fn batch(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Bind of statement `name` to the unnamed portal, Execute, Sync.
fn bind_and_run(name: &str, params: &[Option<&str>]) -> Vec<u8> {
    batch(&[
        wire::bind("", name, params),
        wire::execute("", 0),
        wire::sync(),
    ])
}

/// Parse of `name`, Bind of it to the unnamed portal, Execute, Sync.
fn parse_and_run(name: &str, sql: &str, types: &[i32], params: &[Option<&str>]) -> Vec<u8> {
    batch(&[
        wire::parse(name, sql, types),
        wire::bind("", name, params),
        wire::execute("", 0),
        wire::sync(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_parse_after_a_schema_change_gets_a_fresh_plan() {
    let targets = targets("cc_stale").await;
    let select = "SELECT * FROM sp WHERE id = $1";
    for (label, port, db, user) in &targets.list {
        let run = parse_and_run("s", select, &[20], &[Some("1")]);
        let mut first = Wire::connect(*port, user, db).await;
        let answers = first.exchange(&run, 1).await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: first client"
        );
        drop(first);
        let mut ddl = Wire::connect(*port, user, db).await;
        let answers = ddl
            .exchange(&wire::query("ALTER TABLE sp ALTER b TYPE text"), 1)
            .await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}: ALTER");
        drop(ddl);
        // A new client parses the same text: Postgres plans it now.
        let mut second = Wire::connect(*port, user, db).await;
        let answers = second.exchange(&run, 1).await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: a new client's Parse after the ALTER: {answers:?}"
        );
        assert_eq!(rows(&answers), 1, "{label}: the row");
    }
}

/// A client that was told a statement's result columns (Describe) and
/// binds it after a schema change changed them: Postgres fails the Bind
/// with 0A000 on every backend, also one that prepares the statement only
/// now (another shard, another pooled backend): its rows would otherwise
/// come in the new types and be decoded by the old description (asyncpg:
/// `insufficient data in buffer`; a change between two 4-byte types would
/// be misread without any error). A client that describes it afresh runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_described_statement_fails_once_its_result_columns_changed() {
    let targets = targets("cc_described").await;
    let select = "SELECT * FROM sp WHERE id = $1";
    let run = |id: &'static str| bind_and_run("s", &[Some(id)]);
    for (label, port, db, user) in &targets.list {
        let mut client = Wire::connect(*port, user, db).await;
        let answers = client
            .exchange(
                &batch(&[
                    wire::parse("s", select, &[20]),
                    wire::describe(b'S', "s"),
                    wire::parse("all", "SELECT * FROM sp ORDER BY id", &[]),
                    wire::describe(b'S', "all"),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "1tT1tTZ", "{label}: Parse, Describe");
        // Run on one backend (shard) before the change.
        let answers = client.exchange(&run("1"), 1).await;
        assert_eq!(rows(&answers), 1, "{label}: before: {answers:?}");
        // Described statements over every shard (merged, aggregated, sorted
        // by a column not shown) run as described.
        for (i, sql) in [
            "SELECT * FROM sp ORDER BY id",
            "SELECT count(*), sum(b), avg(b), max(b), min(id) AS low FROM sp",
            "SELECT b % 2 AS odd, count(*) FROM sp GROUP BY b % 2 ORDER BY 1",
            "SELECT b FROM sp ORDER BY id DESC LIMIT 2",
            "SELECT DISTINCT b FROM sp ORDER BY b",
        ]
        .iter()
        .enumerate()
        {
            let name = format!("m{i}");
            let answers = client
                .exchange(
                    &batch(&[
                        wire::parse(&name, sql, &[]),
                        wire::describe(b'S', &name),
                        wire::sync(),
                    ]),
                    1,
                )
                .await;
            assert_eq!(tags(&answers), "1tTZ", "{label}: {sql}: {answers:?}");
            let answers = client.exchange(&bind_and_run(&name, &[]), 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {sql}: {answers:?}"
            );
            assert!(rows(&answers) >= 1, "{label}: {sql}");
        }
        let mut ddl = Wire::connect(*port, user, db).await;
        let answers = ddl
            .exchange(&wire::query("ALTER TABLE sp ALTER b TYPE text"), 1)
            .await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}: ALTER");
        drop(ddl);
        // Every key (each shard, with routing on), twice: always refused.
        for round in 0..2 {
            for id in ["1", "2", "3"] {
                let answers = client.exchange(&run(id), 1).await;
                assert_eq!(
                    codes(&answers),
                    vec!["0A000"],
                    "{label}: round {round}, id {id}: {answers:?}"
                );
                assert_eq!(rows(&answers), 0, "{label}: no rows in new types");
                assert_eq!(
                    answers
                        .iter()
                        .find_map(Msg::error_message)
                        .unwrap_or_default(),
                    "cached plan must not change result type",
                    "{label}"
                );
                // Drivers know it by its routine (asyncpg re-prepares).
                let error = answers.iter().find(|m| m.tag == b'E').expect("an error");
                assert!(
                    wire::fields(&error.body)
                        .contains(&(b'R', "RevalidateCachedQuery".to_string())),
                    "{label}: routine of {error:?}"
                );
            }
        }
        // Over every shard too.
        let answers = client.exchange(&bind_and_run("all", &[]), 1).await;
        assert_eq!(
            codes(&answers),
            vec!["0A000"],
            "{label}: all rows: {answers:?}"
        );
        // A client describing it now is told the new columns and runs it.
        let mut fresh = Wire::connect(*port, user, db).await;
        let answers = fresh
            .exchange(
                &batch(&[
                    wire::parse("s", select, &[20]),
                    wire::describe(b'S', "s"),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "1tTZ", "{label}: fresh Describe");
        for id in ["1", "2", "3"] {
            let answers = fresh.exchange(&run(id), 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: fresh client, id {id}: {answers:?}"
            );
            assert_eq!(rows(&answers), 1, "{label}: fresh client, id {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_and_sql_statement_names_are_one_namespace() {
    let targets = targets("cc_names").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let answers = c
            .exchange(
                &batch(&[
                    wire::parse("s1", "SELECT b FROM sp WHERE id = $1", &[20]),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "1Z", "{label}: Parse s1");
        let answers = c.exchange(&wire::query("DEALLOCATE s1"), 1).await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: DEALLOCATE s1"
        );
        let answers = c.exchange(&bind_and_run("s1", &[Some("1")]), 1).await;
        assert_eq!(codes(&answers), vec!["26000"], "{label}: s1 is gone");
        // The name is free again, and DEALLOCATE ALL frees every name.
        for round in 0..2 {
            let answers = c
                .exchange(
                    &batch(&[
                        wire::parse("s1", "SELECT b FROM sp WHERE id = $1", &[20]),
                        wire::parse("s2", "SELECT 2", &[]),
                        wire::bind("", "s1", &[Some("2")]),
                        wire::execute("", 0),
                        wire::sync(),
                    ]),
                    1,
                )
                .await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: round {round}: {answers:?}"
            );
            assert_eq!(rows(&answers), 1, "{label}: round {round}");
            let answers = c.exchange(&wire::query("DEALLOCATE ALL"), 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: DEALLOCATE ALL"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_parse_leaves_no_name_behind() {
    let targets = targets("cc_rejected").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        // Rejected by the server (pooler) or at its first use (routing mode
        // records the Parse and creates it where its Bind routes).
        let answers = c
            .exchange(
                &parse_and_run("bad", "SELECT $1::no_such_type", &[], &[Some("1")]),
                1,
            )
            .await;
        assert_eq!(codes(&answers), vec!["42704"], "{label}: {answers:?}");
        // At the Parse, as from Postgres: no ParseComplete first (a driver
        // that saw one would keep the name).
        assert_eq!(tags(&answers), "EZ", "{label}: {answers:?}");
        // Parsed again correctly under the same name: no 42P05.
        let answers = c
            .exchange(
                &parse_and_run("bad", "SELECT $1::int", &[], &[Some("7")]),
                1,
            )
            .await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: {answers:?}"
        );
        assert_eq!(rows(&answers), 1, "{label}");
        // A Parse that was only recorded may be defined again too.
        let answers = c
            .exchange(
                &batch(&[
                    wire::parse("bad2", "SELECT $1::no_such_type", &[]),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        let rejected_at_parse = codes(&answers) == vec!["42704"];
        let answers = c
            .exchange(&parse_and_run("bad2", "SELECT 1", &[], &[]), 1)
            .await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label} (rejected at Parse: {rejected_at_parse}): {answers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_inside_a_transaction_aborts_it() {
    let targets = targets("cc_abort").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        assert_eq!(status(&c.exchange(&wire::query("BEGIN"), 1).await), b'T');
        let extended = |sql: &str| {
            batch(&[
                wire::parse("", sql, &[]),
                wire::bind("", "", &[]),
                wire::execute("", 0),
                wire::sync(),
            ])
        };
        let answers = c.exchange(&extended("INVALID SQL"), 1).await;
        assert_eq!(codes(&answers), vec!["42601"], "{label}");
        assert_eq!(status(&answers), b'E', "{label}: status after the error");
        let answers = c.exchange(&extended("SELECT 1"), 1).await;
        assert_eq!(codes(&answers), vec!["25P02"], "{label}: {answers:?}");
        assert_eq!(status(&answers), b'E', "{label}");
        let answers = c
            .exchange(&wire::query("SELECT b FROM sp WHERE id = 1"), 1)
            .await;
        assert_eq!(codes(&answers), vec!["25P02"], "{label}: {answers:?}");
        let answers = c.exchange(&wire::query("COMMIT"), 1).await;
        assert_eq!(tags(&answers), "CZ", "{label}");
        assert_eq!(status(&answers), b'I', "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_errors_keep_every_field() {
    let targets = targets("cc_fields").await;
    let mut expected: Option<Vec<(u8, String)>> = None;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        // `ck` is replicated in the routed map: the INSERT runs on every
        // shard (two-phase commit) and the error comes from the fan-out.
        let answers = c
            .exchange(&wire::query("INSERT INTO ck VALUES (1, -1)"), 1)
            .await;
        let error = answers
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("{label}: no error: {answers:?}"));
        let fields: Vec<(u8, String)> = wire::fields(&error.body)
            .into_iter()
            .filter(|(k, _)| !matches!(k, b'F' | b'L' | b'R' | b'W'))
            .collect();
        for kind in [b'n', b't', b's', b'D'] {
            assert!(
                fields.iter().any(|(k, v)| *k == kind && !v.is_empty()),
                "{label}: field {} missing: {fields:?}",
                kind as char
            );
        }
        match &expected {
            None => expected = Some(fields),
            Some(postgres) => assert_eq!(&fields, postgres, "{label} vs Postgres"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_name_is_empty_unless_the_client_sets_one() {
    let targets = targets("cc_appname").await;
    for (label, port, db, user) in &targets.list {
        let c = Wire::connect(*port, user, db).await;
        assert_eq!(c.parameter("application_name"), Some(""), "{label}");
        let mut c = c;
        let answers = c.exchange(&wire::query("SHOW application_name"), 1).await;
        let row = answers
            .iter()
            .find(|m| m.tag == b'D')
            .unwrap_or_else(|| panic!("{label}: {answers:?}"));
        // One column: length 0, an empty string.
        assert_eq!(row.body, vec![0, 1, 0, 0, 0, 0], "{label}");
    }
}

/// A client whose backend is terminated mid-statement: Postgres sends
/// FATAL 57P01 and closes. Through shardgate (transaction pooling) the
/// client's session holds nothing of that backend, so it gets one ERROR
/// (08006 naming the shard, the server's words kept) and ReadyForQuery,
/// and its next statement runs on another backend: a shard that restarts
/// must not disconnect clients that also use other shards (#15-2). Never a
/// FATAL on a connection that stays open (drivers then wait for a close
/// that never comes: #14-5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_fails_only_its_statement() {
    let targets = targets("cc_fatal").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        c.send(&wire::query(
            "SELECT pg_terminate_backend(pg_backend_pid())",
        ))
        .await;
        if *label == "postgres" {
            let mut seen = Vec::new();
            let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while let Some(msg) = c.recv().await {
                    seen.push(msg);
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "{label}: the connection stayed open: {seen:?}"
            );
            assert_eq!(codes(&seen), vec!["57P01"], "{label}: {seen:?}");
            assert!(!seen.iter().any(|m| m.tag == b'Z'), "{label}: {seen:?}");
            continue;
        }
        let seen = c.until_ready(1).await;
        // The row may come first (the backend notices the signal after
        // sending it), as from Postgres.
        let shape = tags(&seen);
        assert!(shape == "EZ" || shape == "TDEZ", "{label}: {seen:?}");
        let error = seen[seen.len() - 2].normalized();
        assert!(
            error.contains("S=ERROR") && error.contains("C=08006") && error.contains("s0"),
            "{label}: {error}"
        );
        assert!(error.contains("administrator command"), "{label}: {error}");
        assert_eq!(status(&seen), b'I', "{label}");
        let answers = c.exchange(&wire::query("SELECT 1"), 1).await;
        assert_eq!(
            tags(&answers),
            "TDCZ",
            "{label}: the session goes on: {answers:?}"
        );
    }
}

/// psycopg's pipeline: two statements and one Sync, the first failing.
/// Postgres skips the rest up to the Sync; a fan-out (here DDL, run on
/// every shard) must be skipped too and the Sync answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pipeline_skips_a_fanout_and_answers_its_sync() {
    let targets = targets("cc_pipeline").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let unnamed = |sql: &str| {
            batch(&[
                wire::parse("", sql, &[]),
                wire::bind("", "", &[]),
                wire::describe(b'P', ""),
                wire::execute("", 0),
            ])
        };
        let pipeline = batch(&[
            unnamed("SELECT * FROM nosuchtable"),
            unnamed("CREATE TABLE voila ()"),
            wire::sync(),
        ]);
        let answers = c.exchange(&pipeline, 1).await;
        assert_eq!(codes(&answers), vec!["42P01"], "{label}: {answers:?}");
        assert_eq!(status(&answers), b'I', "{label}");
        let answers = c
            .exchange(
                &wire::query("SELECT count(*) FROM pg_class WHERE relname = 'voila'"),
                1,
            )
            .await;
        let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(row.body.ends_with(b"0"), "{label}: CREATE TABLE ran");
    }
}

/// A temporary table over three shards is refused with a hint (it failed
/// in two-phase commit); pinned to one shard it works, and with one shard
/// (the pooler) it always does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_need_one_shard() {
    let targets = targets("cc_temp").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let create = wire::query("CREATE TEMP TABLE tt (a int)");
        let answers = c.exchange(&create, 1).await;
        if *label == "routed" {
            assert_eq!(codes(&answers), vec!["0A000"], "{label}: {answers:?}");
            let answers = c
                .exchange(&wire::query("SET shardgate.shard = 's1'"), 1)
                .await;
            assert_eq!(codes(&answers), Vec::<String>::new(), "{label}");
            let answers = c.exchange(&create, 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {answers:?}"
            );
        } else {
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {answers:?}"
            );
        }
        let answers = c
            .exchange(&wire::query("INSERT INTO tt VALUES (1), (2)"), 1)
            .await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: {answers:?}"
        );
        let answers = c.exchange(&wire::query("SELECT a FROM tt"), 1).await;
        assert_eq!(rows(&answers), 2, "{label}: {answers:?}");
    }
}

/// A Terminate before the startup packet: Postgres closes without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_startup_closes_silently() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let targets = targets("cc_terminate").await;
    for (label, port, _, _) in &targets.list {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .expect("connect");
        stream.write_all(&wire::terminate()).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut answer),
        )
        .await
        .unwrap_or_else(|_| panic!("{label}: the connection stayed open"))
        .ok();
        assert_eq!(answer, Vec::<u8>::new(), "{label}: answered a Terminate");
    }
}

/// `client_encoding` LATIN9: a statement with a non-ASCII byte is answered
/// (shardgate closed the connection with 08P01), and a text key in it is
/// placed as the server stores it (a UTF-8 client finds the row by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latin9_client_is_answered_and_its_text_keys_route() {
    let targets = targets("cc_latin9").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let answers = c
            .exchange(&wire::query("SET client_encoding TO 'LATIN9'"), 1)
            .await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}");
        // 'Müller €' in LATIN9: ü = 0xFC, € = 0xA4.
        let mut insert = b"INSERT INTO names VALUES ('M\xfcller \xa4')".to_vec();
        insert.push(0);
        let mut frame = vec![b'Q'];
        frame.extend_from_slice(&((insert.len() + 4) as i32).to_be_bytes());
        frame.extend_from_slice(&insert);
        let answers = c.exchange(&frame, 1).await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: {answers:?}"
        );
        let answers = c.exchange(&wire::query("SELECT name FROM names"), 1).await;
        let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(
            row.body.ends_with(b"M\xfcller \xa4"),
            "{label}: {:?}",
            row.body
        );
        // A UTF-8 client finds it by its key (routed to the same shard).
        let mut utf8 = Wire::connect(*port, user, db).await;
        let answers = utf8
            .exchange(
                &wire::query("SELECT name FROM names WHERE name = 'Müller €'"),
                1,
            )
            .await;
        assert_eq!(rows(&answers), 1, "{label}: {answers:?}");
        // An error whose text is in LATIN9 (a relation named `€`), from a
        // statement that runs on every shard with routing on: the text
        // reaches the client as the server wrote it (psycopg's
        // `test_error_encoding[latin9]`).
        let answers = c
            .exchange(
                &wire::query(
                    "DO $$BEGIN EXECUTE format('INSERT INTO \"%s\" VALUES (1)', chr(8364)); END$$",
                ),
                1,
            )
            .await;
        assert_eq!(codes(&answers), vec!["42P01"], "{label}: {answers:?}");
        let error = answers.iter().find(|m| m.tag == b'E').expect("an error");
        assert!(
            error.body.windows(3).any(|w| w == b"\"\xa4\""),
            "{label}: the message keeps its LATIN9 bytes: {:?}",
            String::from_utf8_lossy(&error.body)
        );
    }
}

/// One extended batch (one Sync) with a one-shard write, a write on every
/// shard (replicated table) and a failing write: as in Postgres, nothing of
/// it stays; without the failure, all of it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_one_shard_and_all_shard_writes_is_atomic() {
    let targets = targets("cc_mixed_batch").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let write = |sql: &str| {
            batch(&[
                wire::parse("", sql, &[]),
                wire::bind("", "", &[]),
                wire::execute("", 0),
            ])
        };
        let failing = batch(&[
            write("INSERT INTO sp VALUES (100, 1)"),
            write("INSERT INTO ck VALUES (100, 5)"),
            write("INSERT INTO sp VALUES (1, 0)"),
            wire::sync(),
        ]);
        let answers = c.exchange(&failing, 1).await;
        assert_eq!(codes(&answers), vec!["23505"], "{label}: {answers:?}");
        for (sql, want) in [
            ("SELECT count(*) FROM sp WHERE id = 100", "0"),
            ("SELECT count(*) FROM ck WHERE id = 100", "0"),
        ] {
            let answers = c.exchange(&wire::query(sql), 1).await;
            let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
            assert!(
                row.body.ends_with(want.as_bytes()),
                "{label}: {sql}: {answers:?}"
            );
        }
        let good = batch(&[
            write("INSERT INTO sp VALUES (101, 1)"),
            write("INSERT INTO ck VALUES (101, 5)"),
            wire::sync(),
        ]);
        let answers = c.exchange(&good, 1).await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: {answers:?}"
        );
        let answers = c
            .exchange(&wire::query("SELECT count(*) FROM ck WHERE id = 101"), 1)
            .await;
        let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(row.body.ends_with(b"1"), "{label}: {answers:?}");
    }
}

/// SQL `EXECUTE` of a statement prepared with the protocol's Parse
/// (asyncpg's `prepare(name=…)` then `EXECUTE name`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_runs_a_protocol_prepared_statement() {
    let targets = targets("cc_execute").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let answers = c
            .exchange(
                &batch(&[
                    wire::parse("s1", "SELECT b FROM sp WHERE id = 2", &[]),
                    wire::parse("s2", "SELECT $1::int + 1", &[]),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "11Z", "{label}");
        for (sql, want) in [("EXECUTE s1", "20"), ("EXECUTE s2(41)", "42")] {
            let answers = c.exchange(&wire::query(sql), 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {sql}: {answers:?}"
            );
            let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
            assert!(
                row.body.ends_with(want.as_bytes()),
                "{label}: {sql}: {answers:?}"
            );
        }
        // Over the extended protocol (asyncpg's `fetchval('EXECUTE s1')`):
        // Parse, Describe of the statement, then Bind and Execute.
        let answers = c
            .exchange(
                &batch(&[
                    wire::parse("", "EXECUTE s1", &[]),
                    wire::describe(b'S', ""),
                    wire::bind("", "", &[]),
                    wire::execute("", 0),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "1tT2DCZ", "{label}: {answers:?}");
        let row = answers.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(row.body.ends_with(b"20"), "{label}: {answers:?}");
        let done = answers.iter().find(|m| m.tag == b'C').expect("a tag");
        assert_eq!(done.body, b"SELECT 1\0", "{label}: {answers:?}");
        // The name is taken: a second Parse of it fails as in Postgres.
        let answers = c
            .exchange(
                &batch(&[wire::parse("s1", "SELECT 1", &[]), wire::sync()]),
                1,
            )
            .await;
        assert_eq!(codes(&answers), vec!["42P05"], "{label}: {answers:?}");
    }
}

/// Savepoints and SET in a transaction that spans shards (psycopg's nested
/// transactions): every shard of the transaction gets them, shards joining
/// later too, and `ROLLBACK TO` after an error undoes the same work on all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_span_the_shards_of_a_transaction() {
    savepoints_across_shards("cc_savepoints", false).await;
}

/// The same with every statement sent with the extended protocol, as
/// psycopg 3 sends them (SQLAlchemy's `begin_nested()`): Parse, Bind,
/// Describe, Execute, Sync each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_savepoints_span_the_shards_of_a_transaction() {
    savepoints_across_shards("cc_savepoints_ext", true).await;
}

async fn savepoints_across_shards(name: &str, extended: bool) {
    let targets = targets(name).await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let script = [
            "BEGIN",
            "INSERT INTO sp VALUES (200, 0)",
            "SAVEPOINT a",
            "INSERT INTO sp VALUES (201, 0), (202, 0), (203, 0), (204, 0), (205, 0)",
            "INSERT INTO sp VALUES (1, 0)",
            "ROLLBACK TO SAVEPOINT a",
            "SET LOCAL statement_timeout = '5s'",
            "INSERT INTO sp VALUES (206, 0), (207, 0), (208, 0), (209, 0), (210, 0)",
            "SAVEPOINT b",
            "INSERT INTO sp VALUES (211, 0), (212, 0), (213, 0)",
            "RELEASE SAVEPOINT b",
            "COMMIT",
        ];
        let mut errors = Vec::new();
        for sql in script {
            let message = if extended {
                batch(&[
                    wire::parse("", sql, &[]),
                    wire::bind("", "", &[]),
                    wire::describe(b'P', ""),
                    wire::execute("", 0),
                    wire::sync(),
                ])
            } else {
                wire::query(sql)
            };
            let answers = c.exchange(&message, 1).await;
            if extended && codes(&answers).is_empty() {
                assert_eq!(tags(&answers), "12nCZ", "{label}: {sql}: {answers:?}");
            }
            errors.extend(
                codes(&answers)
                    .into_iter()
                    .map(|code| format!("{sql}: {code}")),
            );
        }
        assert_eq!(
            errors,
            vec!["INSERT INTO sp VALUES (1, 0): 23505".to_string()],
            "{label}"
        );
        let answers = c
            .exchange(
                &wire::query("SELECT id FROM sp WHERE id >= 200 ORDER BY id"),
                1,
            )
            .await;
        let ids: Vec<String> = answers
            .iter()
            .filter(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
            .collect();
        assert_eq!(
            ids,
            ["200", "206", "207", "208", "209", "210", "211", "212", "213"],
            "{label}"
        );
    }
}

/// `pg_prepared_statements` lists the client's own statements, by its
/// names, in the order it prepared them — not shardgate's `sg_…` copies or
/// another client's (#14-D4: psycopg's and asyncpg's tests count its rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_prepared_statements_lists_the_clients_own_statements() {
    let targets = targets("cc_prepared_view").await;
    let listing = "SELECT name, statement, parameter_types::text FROM pg_prepared_statements \
                   WHERE name <> '' ORDER BY prepare_time";
    for (label, port, db, user) in &targets.list {
        // Another client's statements stay on the shared backend.
        let mut other = Wire::connect(*port, user, db).await;
        let answers = other
            .exchange(
                &parse_and_run(
                    "theirs",
                    "SELECT b FROM sp WHERE id = $1",
                    &[20],
                    &[Some("1")],
                ),
                1,
            )
            .await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}");
        drop(other);
        let mut c = Wire::connect(*port, user, db).await;
        let answers = c.exchange(&wire::query(listing), 1).await;
        assert_eq!(
            rows(&answers),
            0,
            "{label}: a fresh client has none: {answers:?}"
        );
        // s_three leaves its parameter's type to the server, and runs on
        // every shard with routing on (`ck` is replicated): the type
        // Postgres inferred is listed, as psycopg's `test_untyped_json`
        // expects.
        for (name, sql) in [
            ("s_one", "SELECT b FROM sp WHERE id = $1"),
            ("s_two", "SELECT 2"),
            ("s_three", "INSERT INTO ck (id, v) VALUES ($1, 5)"),
        ] {
            let types: &[i32] = if name == "s_one" { &[20] } else { &[] };
            let params: &[Option<&str>] = match name {
                "s_one" => &[Some("2")],
                "s_three" => &[Some("7")],
                _ => &[],
            };
            let answers = c
                .exchange(&parse_and_run(name, sql, types, params), 1)
                .await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {answers:?}"
            );
        }
        // Over the extended protocol too (psycopg reads it so).
        for message in [wire::query(listing), parse_and_run("", listing, &[], &[])] {
            let answers = c.exchange(&message, 1).await;
            let listed = rows_joined(&answers);
            assert_eq!(
                listed,
                [
                    "s_one|SELECT b FROM sp WHERE id = $1|{bigint}",
                    "s_two|SELECT 2|{}",
                    "s_three|INSERT INTO ck (id, v) VALUES ($1, 5)|{integer}"
                ],
                "{label}: {answers:?}"
            );
        }
    }
}

/// psycopg's `test_untyped_json` runs in a transaction that creates its
/// table: the parameter type the server infers is listed by
/// `pg_prepared_statements` there too, and the transaction goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inferred_parameter_types_are_listed_inside_a_transaction() {
    let targets = targets("cc_untyped_json").await;
    let listing = "SELECT name, parameter_types::text FROM pg_prepared_statements WHERE name <> ''";
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        for sql in ["BEGIN", "CREATE TABLE testjson (data jsonb)"] {
            let answers = c.exchange(&wire::query(sql), 1).await;
            assert_eq!(codes(&answers), Vec::<String>::new(), "{label}: {sql}");
        }
        let answers = c
            .exchange(
                &parse_and_run(
                    "ins",
                    "INSERT INTO testjson (data) VALUES ($1)",
                    &[],
                    &[Some("{}")],
                ),
                1,
            )
            .await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}: insert");
        let answers = c.exchange(&parse_and_run("", listing, &[], &[]), 1).await;
        let listed = rows_joined(&answers);
        assert_eq!(listed, ["ins|{jsonb}"], "{label}: {answers:?}");
        let answers = c
            .exchange(&wire::query("SELECT count(*) FROM testjson"), 1)
            .await;
        assert_eq!(
            codes(&answers),
            Vec::<String>::new(),
            "{label}: the transaction goes on"
        );
        assert_eq!(status(&answers), b'T', "{label}");
        let answers = c.exchange(&wire::query("ROLLBACK"), 1).await;
        assert_eq!(codes(&answers), Vec::<String>::new(), "{label}");
    }
}

/// A statement the server described is defined: a second Parse of its
/// name gets 42P05, as in Postgres — also with routing on, where the
/// Describe runs on a borrowed backend of any shard (asyncpg's
/// `test_prepare_explicitly_named` through three shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_described_statement_name_is_taken() {
    let targets = targets("cc_described_name").await;
    for (label, port, db, user) in &targets.list {
        let mut c = Wire::connect(*port, user, db).await;
        let answers = c
            .exchange(
                &batch(&[
                    wire::parse("dup", "SELECT 1", &[]),
                    wire::describe(b'S', "dup"),
                    wire::sync(),
                ]),
                1,
            )
            .await;
        assert_eq!(tags(&answers), "1tTZ", "{label}: {answers:?}");
        let answers = c
            .exchange(
                &batch(&[wire::parse("dup", "SELECT 2", &[]), wire::sync()]),
                1,
            )
            .await;
        assert_eq!(codes(&answers), vec!["42P05"], "{label}: {answers:?}");
    }
}

/// `DEALLOCATE ALL` inside a transaction that spans shards (psycopg sends
/// it after DDL or ROLLBACK once it has prepared statements): answered,
/// the client's statements are gone, the transaction goes on — over the
/// simple and the extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_inside_a_transaction_over_several_shards() {
    let targets = targets("cc_deallocate_multi").await;
    for (label, port, db, user) in &targets.list {
        for extended in [false, true] {
            let mut c = Wire::connect(*port, user, db).await;
            let run = |sql: &str| {
                if extended {
                    parse_and_run("", sql, &[], &[])
                } else {
                    wire::query(sql)
                }
            };
            let base = if extended { 300 } else { 400 };
            let script = [
                "BEGIN".to_string(),
                // Five keys: over several shards with routing on.
                format!(
                    "INSERT INTO sp VALUES ({}, 0), ({}, 0), ({}, 0), ({}, 0), ({}, 0)",
                    base,
                    base + 1,
                    base + 2,
                    base + 3,
                    base + 4
                ),
            ];
            for sql in &script {
                let answers = c.exchange(&run(sql), 1).await;
                assert_eq!(codes(&answers), Vec::<String>::new(), "{label}: {sql}");
            }
            let answers = c
                .exchange(
                    &batch(&[wire::parse("s1", "SELECT 1", &[]), wire::sync()]),
                    1,
                )
                .await;
            assert_eq!(tags(&answers), "1Z", "{label}");
            let answers = c.exchange(&run("DEALLOCATE ALL"), 1).await;
            assert_eq!(
                codes(&answers),
                Vec::<String>::new(),
                "{label}: {answers:?}"
            );
            let done = answers.iter().find(|m| m.tag == b'C').expect("a tag");
            assert_eq!(done.body, b"DEALLOCATE ALL\0", "{label}");
            assert_eq!(status(&answers), b'T', "{label}");
            let answers = c.exchange(&bind_and_run("s1", &[]), 1).await;
            assert_eq!(
                codes(&answers),
                vec!["26000"],
                "{label} extended={extended}: s1 is gone"
            );
            let answers = c.exchange(&run("ROLLBACK"), 1).await;
            assert_eq!(codes(&answers), Vec::<String>::new(), "{label}");
        }
    }
}
