//! The same scripted raw-protocol session against Postgres directly and
//! through shardgate must produce the same backend messages (pids, secret
//! keys and server source locations aside).

mod support;

use std::time::{Duration, Instant};

use support::wire::{self, Msg, Wire};

/// One step of the script: bytes to send and how many ReadyForQuery end it.
struct Step {
    name: &'static str,
    bytes: Vec<u8>,
    ready: usize,
}

fn step(name: &'static str, parts: &[Vec<u8>], ready: usize) -> Step {
    Step {
        name,
        bytes: parts.concat(),
        ready,
    }
}

fn script() -> Vec<Step> {
    use wire::*;
    vec![
        step("ddl", &[query("CREATE TABLE conf_t (a int PRIMARY KEY, b text)")], 1),
        step(
            "multi-statement simple query",
            &[query("SELECT 1 AS a, 'x'::text AS b; SELECT generate_series(1,3) AS g; INSERT INTO conf_t VALUES (1, 'one'), (2, 'two')")],
            1,
        ),
        step("error in simple query", &[query("SELECT 1/0")], 1),
        step("unknown table", &[query("SELECT * FROM no_such_table")], 1),
        step("syntax error with position", &[query("SELEC 1")], 1),
        step("empty query", &[query("")], 1),
        step(
            "named statement: parse, describe, bind, execute",
            &[
                parse("s1", "SELECT $1::int + 1 AS n, $2::text AS t", &[23, 25]),
                describe(b'S', "s1"),
                bind("", "s1", &[Some("41"), None]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ],
            1,
        ),
        step(
            "named statement reused in a later batch",
            &[bind("", "s1", &[Some("1"), Some("x")]), execute("", 0), sync()],
            1,
        ),
        step(
            "pipeline with an error in the middle",
            &[
                parse("", "SELECT 1", &[]),
                bind("", "", &[]),
                execute("", 0),
                parse("", "SELECT 1/0", &[]),
                bind("", "", &[]),
                execute("", 0),
                parse("", "SELECT 2", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
                parse("", "SELECT 3", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
            ],
            2,
        ),
        step(
            "max_rows and PortalSuspended inside a transaction",
            &[
                query("BEGIN"),
                parse("", "SELECT generate_series(1,5)", &[]),
                bind("p1", "", &[]),
                execute("p1", 2),
                execute("p1", 2),
                execute("p1", 2),
                sync(),
                query("COMMIT"),
            ],
            3,
        ),
        step(
            "error inside a transaction block, then rollback",
            &[query("BEGIN"), query("SELECT * FROM no_such_table"), query("SELECT 1"), query("ROLLBACK")],
            4,
        ),
        step(
            "copy from stdin",
            &[
                query("COPY conf_t FROM STDIN"),
                copy_data(b"10\tten\n11\televen\n"),
                copy_data(b"12\t\\N\n"),
                copy_done(),
            ],
            1,
        ),
        step("copy to stdout", &[query("COPY (SELECT * FROM conf_t ORDER BY a) TO STDOUT")], 1),
        step(
            "copy fail",
            &[query("COPY conf_t FROM STDIN"), copy_data(b"20\ttwenty\n"), copy_fail("client gave up")],
            1,
        ),
        step(
            "copy with bad data",
            &[query("COPY conf_t FROM STDIN"), copy_data(b"not-a-number\tx\n"), copy_done()],
            1,
        ),
        step(
            "extended copy",
            &[parse("", "COPY conf_t FROM STDIN", &[]), bind("", "", &[]), execute("", 0), copy_data(b"30\tthirty\n"), copy_done(), sync()],
            1,
        ),
        step("rows after copies", &[query("SELECT * FROM conf_t ORDER BY a")], 1),
        step(
            "notice",
            &[query("DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$")],
            1,
        ),
        step("listen and notify in one transaction", &[query("LISTEN conf_chan; NOTIFY conf_chan, 'payload'; UNLISTEN conf_chan")], 1),
        step(
            "close a statement, then use it",
            &[close(b'S', "s1"), sync(), bind("", "s1", &[Some("1"), Some("x")]), execute("", 0), sync()],
            2,
        ),
        step(
            "redefine a named statement that exists",
            &[parse("s2", "SELECT 1", &[]), parse("s2", "SELECT 2", &[]), sync(), close(b'S', "s2"), sync()],
            2,
        ),
        step("flush then sync", &[parse("s3", "SELECT 7", &[]), flush()], 0),
        step("after flush", &[bind("", "s3", &[]), execute("", 0), sync()], 1),
        step(
            "describe an unknown statement",
            &[describe(b'S', "nope"), sync()],
            1,
        ),
        step("set and show", &[query("SET application_name = 'conformance'"), query("SHOW application_name")], 2),
    ]
}

#[tokio::test]
async fn scripted_session_matches_postgres() {
    let direct_db = support::fresh_db("conformance_direct");
    let proxy_db = support::fresh_db("conformance_proxy");
    let cluster = &support::fleet().clusters[0];
    let server = support::start_proxy(&support::shard_map(&proxy_db, "")).await;

    let mut direct = Wire::connect(cluster.port(), "postgres", &direct_db).await;
    let mut proxied = Wire::connect(server.address.port(), "app", &proxy_db).await;

    // Startup parameters mirror the real backend, not pgwire's defaults.
    for name in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
        "IntervalStyle",
    ] {
        assert_eq!(
            proxied.parameter(name),
            direct.parameter(name),
            "ParameterStatus {name} differs"
        );
    }
    assert_ne!(
        proxied.key, direct.key,
        "shardgate issues its own BackendKeyData"
    );

    for step in script() {
        let expected: Vec<String> = direct
            .exchange(&step.bytes, step.ready)
            .await
            .iter()
            .map(Msg::normalized)
            .collect();
        let got: Vec<String> = proxied
            .exchange(&step.bytes, step.ready)
            .await
            .iter()
            .map(Msg::normalized)
            .collect();
        assert_eq!(got, expected, "step `{}` differs", step.name);
    }
    server.stop().await;
}

#[tokio::test]
async fn cancel_request_reaches_the_running_query() {
    let db = support::fresh_db("conformance_cancel");
    let server = support::start_proxy(&support::shard_map(&db, "")).await;
    let mut client = Wire::connect(server.address.port(), "app", &db).await;
    client.send(&wire::query("SELECT pg_sleep(30)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut cancel = tokio::net::TcpStream::connect(server.address)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut cancel,
        &wire::cancel_packet(client.key.0, client.key.1),
    )
    .await
    .expect("send cancel");
    let answer = client.until_ready(1).await;
    let error = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(
        error.error_code().as_deref(),
        Some("57014"),
        "{}",
        error.normalized()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );

    // A cancel with a wrong secret does nothing.
    client
        .send(&wire::query("SELECT pg_sleep(1), 'survived'"))
        .await;
    let mut cancel = tokio::net::TcpStream::connect(server.address)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut cancel,
        &wire::cancel_packet(client.key.0, client.key.1 ^ 1),
    )
    .await
    .expect("send cancel");
    let answer = client.until_ready(1).await;
    assert!(
        answer.iter().all(|m| m.tag != b'E'),
        "wrong secret must not cancel: {:?}",
        answer.iter().map(|m| m.normalized()).collect::<Vec<_>>()
    );
    server.stop().await;
}
