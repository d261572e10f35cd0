//! COPY through the routing proxy, against real shards: rows of a COPY
//! FROM STDIN (text, csv, binary; with and without a column list; simple
//! and extended protocol) land on the shard their key names (checked with
//! Postgres' own hash partitioning), bad rows end the COPY with an error
//! naming the line and nothing committed anywhere, replicated tables get
//! every row on every shard, and COPY TO STDOUT over several shards gives
//! back every row once.

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{pin_mut, SinkExt, StreamExt};
use support::wire::{self, Msg, Wire};
use support::{connect, connect_proxy, fleet, fresh_db, shard_map, start_proxy};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

const SCHEMA: &str = "\
    CREATE TABLE users (id bigint PRIMARY KEY, name text, score int);\
    CREATE TABLE docs (slug text PRIMARY KEY, body text, n int);\
    CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, note text);\
    CREATE TABLE countries (code text PRIMARY KEY, name text);";

const MAP: &str = "\
functions:
  h: { kind: hash }
tables:
  users: { key: id, function: h }
  docs: { key: slug, function: h }
  orders: { key: user_id, function: h }
  countries: { replicated: true }
";

const ROWS: i64 = 20_000;

/// The schema on every shard (created directly).
async fn sharded_db(name: &str) -> String {
    support::fresh_db_with(name, SCHEMA).await
}

/// Hash-partitioned tables (modulus = shard count) to check placement with.
async fn oracle(name: &str) -> Client {
    let db = fresh_db(name);
    let client = connect(&fleet().clusters[0], &db).await;
    client
        .batch_execute(
            "CREATE TABLE hp_int (k bigint) PARTITION BY HASH (k);\
             CREATE TABLE hp_text (k text) PARTITION BY HASH (k);",
        )
        .await
        .expect("oracle");
    client
}

/// Every shard's rows of `sql` (first column is the key, as text).
async fn rows_by_shard(db: &str, sql: &str) -> Vec<Vec<Vec<Option<String>>>> {
    let mut out = Vec::new();
    for cluster in &fleet().clusters {
        let direct = connect(cluster, db).await;
        let rows = direct.simple_query(sql).await.expect("read a shard");
        out.push(
            rows.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect(),
        );
    }
    out
}

/// Asserts every key of `per_shard` (first column) is on the shard
/// Postgres' PARTITION BY HASH puts it; returns all rows, sorted.
async fn placed(
    oracle: &Client,
    per_shard: Vec<Vec<Vec<Option<String>>>>,
    text_key: bool,
) -> Vec<Vec<Option<String>>> {
    let mut all = Vec::new();
    for (shard, rows) in per_shard.into_iter().enumerate() {
        let keys: Vec<String> = rows.iter().map(|r| r[0].clone().unwrap()).collect();
        let (table, cast) = if text_key {
            ("hp_text", "text")
        } else {
            ("hp_int", "bigint")
        };
        let misplaced: i64 = oracle
            .query_one(
                &format!(
                    "SELECT count(*) FROM unnest($1::text[]) k \
                     WHERE NOT satisfies_hash_partition('{table}'::regclass, 3, $2, k::{cast})"
                ),
                &[&keys, &(shard as i32)],
            )
            .await
            .expect("placement check")
            .get(0);
        assert_eq!(misplaced, 0, "rows on shard s{shard} that belong elsewhere");
        assert!(!rows.is_empty(), "shard s{shard} got no rows");
        all.extend(rows);
    }
    all.sort();
    all
}

fn user_name(i: i64) -> String {
    format!("user {i}\twith tab, back\\slash and \"quotes\"\nnewline")
}

fn user_score(i: i64) -> Option<i32> {
    (i % 7 != 0).then(|| ((i * 37) % 1000 - 500) as i32)
}

/// COPY text escaping.
fn text_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn expected_users(n: i64) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> = (1..=n)
        .map(|i| {
            vec![
                Some(i.to_string()),
                Some(user_name(i)),
                user_score(i).map(|s| s.to_string()),
            ]
        })
        .collect();
    rows.sort();
    rows
}

/// The users rows as COPY text with column order (name, id, score).
fn users_text(n: i64) -> Vec<u8> {
    let mut data = String::new();
    for i in 1..=n {
        let score = user_score(i).map_or("\\N".to_string(), |s| s.to_string());
        data.push_str(&format!("{}\t{i}\t{score}\n", text_escape(&user_name(i))));
    }
    data.into_bytes()
}

/// Sends `data` through tokio-postgres' copy_in (extended protocol) in
/// chunks that do not align with rows.
async fn copy_in(
    client: &Client,
    sql: &str,
    data: &[u8],
    chunk: usize,
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in(sql).await?;
    pin_mut!(sink);
    for piece in data.chunks(chunk) {
        sink.send(Bytes::copy_from_slice(piece)).await?;
    }
    sink.finish().await
}

async fn count_everywhere(db: &str, table: &str) -> Vec<i64> {
    let mut counts = Vec::new();
    for cluster in &fleet().clusters {
        let direct = connect(cluster, db).await;
        counts.push(
            direct
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .expect("count")
                .get(0),
        );
    }
    counts
}

async fn prepared_xacts(db: &str) -> i64 {
    let mut total = 0;
    for cluster in &fleet().clusters {
        let direct = connect(cluster, db).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("prepared xacts")
            .get(0);
        total += n;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_text_csv_and_binary_route_every_row_to_its_shard() {
    let db = sharded_db("copy_formats").await;
    let oracle = oracle("copy_formats_oracle").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;

    // Text, extended protocol, a column list with the key in the middle.
    let data = users_text(ROWS);
    let n = copy_in(
        &client,
        "COPY users (name, id, score) FROM STDIN",
        &data,
        7777,
    )
    .await
    .expect("text COPY");
    assert_eq!(n, ROWS as u64, "the tag counts every row once");
    let rows = placed(
        &oracle,
        rows_by_shard(&db, "SELECT id, name, score FROM users").await,
        false,
    )
    .await;
    assert_eq!(rows, expected_users(ROWS));

    // CSV with a header, quoted fields holding delimiters, quotes and
    // newlines, no column list, simple protocol (psql \copy).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("docs.csv");
    let mut csv = String::from("slug,body,n\n");
    let mut expected = Vec::new();
    for i in 1..=ROWS {
        let body = if i % 3 == 0 {
            format!("line one, with comma\nline \"two\" {i}")
        } else {
            format!("plain {i}")
        };
        let n = (i % 5 != 0).then(|| i.to_string());
        csv.push_str(&format!(
            "doc-{i},\"{}\",{}\n",
            body.replace('"', "\"\""),
            n.clone().unwrap_or_default()
        ));
        expected.push(vec![Some(format!("doc-{i}")), Some(body), n]);
    }
    expected.sort();
    std::fs::write(&path, &csv).expect("write csv");
    let output = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &server.address.port().to_string(),
            "-U",
            "app",
            &db,
            "-c",
            &format!(
                "\\copy docs FROM '{}' WITH (FORMAT csv, HEADER)",
                path.display()
            ),
        ])
        .output()
        .await
        .expect("psql");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "psql: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("COPY {ROWS}")), "{stdout}");
    let rows = placed(
        &oracle,
        rows_by_shard(&db, "SELECT slug, body, n FROM docs").await,
        true,
    )
    .await;
    assert_eq!(rows, expected);

    // Binary, no column list, tokio-postgres' binary writer; routed by
    // the second column.
    let sink = client
        .copy_in("COPY orders FROM STDIN (FORMAT binary)")
        .await
        .expect("binary COPY");
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::INT8, Type::TEXT]);
    pin_mut!(writer);
    let mut expected = Vec::new();
    for i in 1..=ROWS {
        let user = (i * 7919) % 5000 + 1;
        let note = (i % 4 != 0).then(|| format!("order {i}"));
        writer
            .as_mut()
            .write(&[&i, &user, &note])
            .await
            .expect("binary row");
        expected.push(vec![Some(user.to_string()), Some(i.to_string()), note]);
    }
    let n = writer.finish().await.expect("binary COPY done");
    assert_eq!(n, ROWS as u64);
    expected.sort();
    let rows = placed(
        &oracle,
        rows_by_shard(&db, "SELECT user_id, id, note FROM orders").await,
        false,
    )
    .await;
    assert_eq!(rows, expected);
    assert_eq!(prepared_xacts(&db).await, 0, "two-phase commits finished");
    server.stop().await;
}

/// Starts `COPY …` on a raw connection; panics unless CopyInResponse.
async fn wire_copy(wire: &mut Wire, sql: &str) {
    wire.send(&wire::query(sql)).await;
    let first = wire.recv().await.expect("answer");
    assert_eq!(
        first.tag,
        b'G',
        "CopyInResponse expected: {}",
        first.normalized()
    );
}

fn error_of(messages: &[Msg]) -> (String, String) {
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error in {messages:?}"));
    (
        error.error_code().unwrap_or_default(),
        error.error_message().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_name_their_line_and_commit_nothing() {
    let db = sharded_db("copy_bad_rows").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let port = server.address.port();

    // Line 17 has a key that is not an integer (no column list: table order).
    let mut data = String::new();
    for i in 1..=40 {
        if i == 17 {
            data.push_str("abc\tbad\t1\n");
        } else {
            data.push_str(&format!("{i}\tname {i}\t{i}\n"));
        }
    }
    let mut wire = Wire::connect(port, "app", &db).await;
    wire_copy(&mut wire, "COPY users FROM STDIN").await;
    wire.send(&wire::copy_data(data.as_bytes())).await;
    wire.send(&wire::copy_done()).await;
    let answer = wire.until_ready(1).await;
    let (code, message) = error_of(&answer);
    assert_eq!(code, "22P02", "{message}");
    assert!(
        message.starts_with("COPY users, line 17, column id:"),
        "{message}"
    );
    assert_eq!(answer.last().map(|m| m.body.clone()), Some(b"I".to_vec()));

    // NULL key on line 3 (CSV, column list).
    wire_copy(&mut wire, "COPY users (id, name) FROM STDIN (FORMAT csv)").await;
    wire.send(&wire::copy_data(b"1,a\n2,b\n,c\n4,d\n")).await;
    wire.send(&wire::copy_done()).await;
    let (code, message) = error_of(&wire.until_ready(1).await);
    assert_eq!(code, "23502", "{message}");
    assert!(message.contains("line 3"), "{message}");

    // A row missing its key field (line 2).
    wire_copy(&mut wire, "COPY users (name, id) FROM STDIN").await;
    wire.send(&wire::copy_data(b"a\t1\nb\n")).await;
    wire.send(&wire::copy_done()).await;
    let (code, message) = error_of(&wire.until_ready(1).await);
    assert_eq!(code, "22P04", "{message}");
    assert!(
        message.contains("line 2") && message.contains("missing data for column \"id\""),
        "{message}"
    );

    // A key column left out of the column list is refused up front.
    wire.send(&wire::query("COPY users (name) FROM STDIN"))
        .await;
    let (code, _) = error_of(&wire.until_ready(1).await);
    assert_eq!(code, "0A000");

    // The client gives up: CopyFail.
    wire_copy(&mut wire, "COPY users FROM STDIN").await;
    wire.send(&wire::copy_data(b"1\ta\t1\n2\tb\t2\n3\tc\t3\n"))
        .await;
    wire.send(&wire::copy_fail("client gave up")).await;
    let (code, message) = error_of(&wire.until_ready(1).await);
    assert_eq!(code, "57014");
    assert_eq!(message, "COPY from stdin failed: client gave up");

    // The session still works.
    let answer = wire
        .exchange(&wire::query("SELECT count(*) FROM users"), 1)
        .await;
    assert!(
        answer
            .iter()
            .any(|m| m.tag == b'D' && m.body.ends_with(b"0")),
        "{answer:?}"
    );
    assert_eq!(count_everywhere(&db, "users").await, vec![0, 0, 0]);
    assert_eq!(prepared_xacts(&db).await, 0);

    // A shard's own error (duplicate key on one shard): nothing anywhere.
    let client = connect_proxy(&server, "app", None).await;
    client
        .simple_query("INSERT INTO users VALUES (5, 'already here', 0)")
        .await
        .expect("insert");
    let mut data = String::new();
    for i in 1..=3000 {
        data.push_str(&format!("{i}\tname {i}\t{i}\n"));
    }
    let error = copy_in(&client, "COPY users FROM STDIN", data.as_bytes(), 4096)
        .await
        .expect_err("duplicate key");
    let db_error = error.as_db_error().expect("server error");
    assert_eq!(db_error.code().code(), "23505", "{db_error:?}");
    // The shard's own fields, unchanged; the shard named in CONTEXT.
    assert_eq!(db_error.constraint(), Some("users_pkey"), "{db_error:?}");
    assert!(
        db_error
            .detail()
            .unwrap_or_default()
            .starts_with("Key (id)="),
        "{db_error:?}"
    );
    assert!(
        db_error
            .where_()
            .unwrap_or_default()
            .contains("on shard \"s"),
        "{db_error:?}"
    );
    assert_eq!(count_everywhere(&db, "users").await.iter().sum::<i64>(), 1);
    assert_eq!(prepared_xacts(&db).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_inside_a_transaction_and_into_a_replicated_table() {
    let db = sharded_db("copy_transaction").await;
    let oracle = oracle("copy_transaction_oracle").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    let data = users_text(2000);

    client.simple_query("BEGIN").await.expect("begin");
    copy_in(
        &client,
        "COPY users (name, id, score) FROM STDIN",
        &data,
        1000,
    )
    .await
    .expect("COPY in a transaction");
    let seen: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count inside")
        .get(0);
    assert_eq!(seen, 2000, "the transaction sees its rows");
    // A second COPY in the same (now multi-shard) transaction.
    let more: String = (3001..=3100).map(|i| format!("x\t{i}\t1\n")).collect();
    copy_in(
        &client,
        "COPY users (name, id, score) FROM STDIN",
        more.as_bytes(),
        50,
    )
    .await
    .expect("second COPY in the transaction");
    let seen: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count inside")
        .get(0);
    assert_eq!(seen, 2100);
    client.simple_query("ROLLBACK").await.expect("rollback");
    assert_eq!(count_everywhere(&db, "users").await, vec![0, 0, 0]);

    client.simple_query("BEGIN").await.expect("begin");
    copy_in(
        &client,
        "COPY users (name, id, score) FROM STDIN",
        &data,
        999,
    )
    .await
    .expect("COPY in a transaction");
    client.simple_query("COMMIT").await.expect("commit");
    let rows = placed(
        &oracle,
        rows_by_shard(&db, "SELECT id, name, score FROM users").await,
        false,
    )
    .await;
    assert_eq!(rows, expected_users(2000));
    assert_eq!(prepared_xacts(&db).await, 0);

    // A failed COPY inside a transaction aborts it, as in Postgres.
    client.simple_query("BEGIN").await.expect("begin");
    let error = copy_in(
        &client,
        "COPY users FROM STDIN",
        b"99999\tx\t1\nzz\ty\t2\n",
        100,
    )
    .await
    .expect_err("bad key");
    assert_eq!(error.code().map(|c| c.code()), Some("22P02"));
    let error = client
        .simple_query("SELECT 1")
        .await
        .expect_err("transaction aborted");
    assert_eq!(error.code().map(|c| c.code()), Some("25P02"));
    client.simple_query("ROLLBACK").await.expect("rollback");
    assert_eq!(
        count_everywhere(&db, "users").await.iter().sum::<i64>(),
        2000
    );

    // Replicated: every shard gets every row; the tag is one shard's count.
    let mut wire = Wire::connect(server.address.port(), "app", &db).await;
    wire_copy(&mut wire, "COPY countries FROM STDIN (FORMAT csv)").await;
    let mut csv = String::new();
    for i in 0..300 {
        csv.push_str(&format!("c{i},\"Country, {i}\"\n"));
    }
    wire.send(&wire::copy_data(csv.as_bytes())).await;
    wire.send(&wire::copy_done()).await;
    let answer = wire.until_ready(1).await;
    assert!(
        answer
            .iter()
            .any(|m| m.tag == b'C' && m.body == b"COPY 300\0"),
        "{answer:?}"
    );
    assert_eq!(
        count_everywhere(&db, "countries").await,
        vec![300, 300, 300]
    );
    assert_eq!(prepared_xacts(&db).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_gives_back_every_row_once() {
    let db = sharded_db("copy_out").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    let n = 5000;
    copy_in(
        &client,
        "COPY users (name, id, score) FROM STDIN",
        &users_text(n),
        4096,
    )
    .await
    .expect("load");
    let expected = expected_users(n);

    // Text (extended protocol).
    let stream = client
        .copy_out("COPY users (id, name, score) TO STDOUT")
        .await
        .expect("copy out");
    pin_mut!(stream);
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk.expect("chunk"));
    }
    let mut lines: Vec<String> = String::from_utf8(text)
        .expect("utf8")
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    let mut want: Vec<String> = expected
        .iter()
        .map(|r| {
            format!(
                "{}\t{}\t{}",
                r[0].as_deref().unwrap(),
                text_escape(r[1].as_deref().unwrap()),
                r[2].as_deref().unwrap_or("\\N")
            )
        })
        .collect();
    want.sort();
    assert_eq!(lines, want);

    // CSV with a header (simple protocol): one header line.
    let mut wire = Wire::connect(server.address.port(), "app", &db).await;
    wire.send(&wire::query(
        "COPY (SELECT id FROM users) TO STDOUT (FORMAT csv, HEADER)",
    ))
    .await;
    let answer = wire.until_ready(1).await;
    assert_eq!(answer[0].tag, b'H');
    let data: Vec<String> = answer
        .iter()
        .filter(|m| m.tag == b'd')
        .map(|m| String::from_utf8_lossy(&m.body).trim_end().to_string())
        .collect();
    assert_eq!(data.iter().filter(|l| *l == "id").count(), 1, "one header");
    assert_eq!(data[0], "id");
    assert_eq!(data.len() as i64, n + 1);
    assert!(answer
        .iter()
        .any(|m| m.tag == b'C' && m.body == format!("COPY {n}\0").into_bytes()));

    // Binary: one header, one trailer, every tuple.
    let stream = client
        .copy_out("COPY users (id, score) TO STDOUT (FORMAT binary)")
        .await
        .expect("binary copy out");
    let rows = BinaryCopyOutStream::new(stream, &[Type::INT8, Type::INT4]);
    pin_mut!(rows);
    let mut got = BTreeMap::new();
    while let Some(row) = rows.next().await {
        let row = row.expect("binary row");
        got.insert(row.get::<i64>(0), row.get::<Option<i32>>(1));
    }
    assert_eq!(got.len() as i64, n);
    assert!((1..=n).all(|i| got.get(&i) == Some(&user_score(i))));

    // Options with string literals.
    let mut wire = Wire::connect(server.address.port(), "app", &db).await;
    let answer = wire
        .exchange(
            &wire::query(
                "COPY users (id, score) TO STDOUT (FORMAT csv, DELIMITER ';', NULL 'none')",
            ),
            1,
        )
        .await;
    let lines: Vec<String> = answer
        .iter()
        .filter(|m| m.tag == b'd')
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(lines.len() as i64, n, "{:?}", answer.last());
    assert!(lines.contains(&"7;none\n".to_string()), "{:?}", &lines[..3]);

    // A key subset, and what cannot be a concatenation.
    let mut wire = Wire::connect(server.address.port(), "app", &db).await;
    let answer = wire
        .exchange(
            &wire::query("COPY (SELECT id FROM users WHERE id IN (1, 2, 3, 4)) TO STDOUT"),
            1,
        )
        .await;
    assert_eq!(answer.iter().filter(|m| m.tag == b'd').count(), 4);
    let answer = wire
        .exchange(
            &wire::query("COPY (SELECT id FROM users ORDER BY id LIMIT 3) TO STDOUT"),
            1,
        )
        .await;
    assert_eq!(error_of(&answer).0, "0A000");
    let answer = wire
        .exchange(
            &wire::query("COPY (SELECT count(*) FROM users) TO STDOUT"),
            1,
        )
        .await;
    assert_eq!(error_of(&answer).0, "0A000");
    server.stop().await;
}

#[tokio::test]
async fn a_cancel_request_stops_a_copy_to_stdout_on_every_shard() {
    let db = sharded_db("copy_cancel").await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let client = connect_proxy(&server, "app", None).await;
    for id in 1..=30i64 {
        client
            .execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&id])
            .await
            .expect("insert");
    }
    let canceller = support::cancel_after(&client, std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    // Every shard sleeps 0.5 s per row: seconds of work unless cancelled.
    let result = async {
        let stream = client
            .copy_out("COPY (SELECT id, pg_sleep(0.5) FROM users) TO STDOUT")
            .await?;
        pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            chunk?;
        }
        Ok::<(), tokio_postgres::Error>(())
    }
    .await;
    canceller.await.expect("canceller");
    let error = result.expect_err("cancelled");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code().to_string()),
        Some("57014".to_string()),
        "{error:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "cancelled promptly: {:?}",
        started.elapsed()
    );
    assert_eq!(
        support::active_queries_like(&db, "pg_sleep(0.5)").await,
        0,
        "no shard still running it"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("session usable after the cancel")
        .get(0);
    assert_eq!(n, 30);
    server.stop().await;
}
