//! A failing shard hurts only its own keys (#15-2, #15-3): a backend that
//! ends between a client's statements never reaches that client as a stray
//! message, a lost transaction is reported once at the client's next
//! statement, and with a shard down, statements for the other shards (and
//! the Describe a driver sends before it binds) keep working.

mod support;

use std::time::{Duration, Instant};

use shardgate::devcluster::DevCluster;
use support::wire::{self, Wire};
use support::{connect, fleet, fresh_db_with, keys_on_three_shards, shard_map, start_proxy};

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);";

const MAP: &str = "\
functions:
  by_user: { kind: hash }
tables:
  users: { key: id, function: by_user }
";

fn select(id: i64) -> Vec<u8> {
    wire::query(&format!("SELECT name FROM users WHERE id = {id}"))
}

fn tags(messages: &[wire::Msg]) -> String {
    messages.iter().map(|m| m.tag as char).collect()
}

/// Terminates every backend of `db` on fleet cluster `cluster` (as a
/// shard's shutdown or an operator's `pg_terminate_backend` would).
async fn terminate_backends(cluster: usize, db: &str) -> i64 {
    connect(&fleet().clusters[cluster], db)
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_terminate_backend")
        .get(0)
}

/// Nothing arrives unasked within `wait`.
async fn nothing_arrives(raw: &mut Wire, wait: Duration, what: &str) {
    if let Ok(message) = tokio::time::timeout(wait, raw.recv()).await {
        panic!(
            "{what}: unrequested {:?}",
            message.map(|m| (m.tag as char, m.normalized()))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ending_between_statements_reaches_no_client() {
    let db = fresh_db_with("backend_ends_idle", SCHEMA).await;
    let server = start_proxy(&shard_map(&db, MAP)).await;
    let [k0, k1, k2] = keys_on_three_shards();
    let mut setup = Wire::connect(server.address.port(), "app", &db).await;
    for (k, name) in [(k0, "zero"), (k1, "one"), (k2, "two")] {
        let answer = setup
            .exchange(
                &wire::query(&format!(
                    "INSERT INTO users (id, name) VALUES ({k}, '{name}')"
                )),
                1,
            )
            .await;
        assert_eq!(tags(&answer), "CZ", "insert {k}");
    }

    // Autocommit: the client's backend on shard s1 is terminated after
    // its answer. Nothing reaches the client; its next statements, on any
    // shard, run.
    let mut idle = Wire::connect(server.address.port(), "app", &db).await;
    assert_eq!(tags(&idle.exchange(&select(k1), 1).await), "TDCZ");
    // A transaction holds shard s1's backend while idle, so the FATAL of
    // its termination arrives while nothing of that client is in flight.
    let mut in_tx = Wire::connect(server.address.port(), "app", &db).await;
    assert_eq!(tags(&in_tx.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    assert_eq!(tags(&in_tx.exchange(&select(k1), 1).await), "TDCZ");

    assert!(terminate_backends(1, &db).await >= 1, "backends terminated");
    nothing_arrives(&mut idle, Duration::from_millis(300), "autocommit client").await;
    nothing_arrives(
        &mut in_tx,
        Duration::from_millis(300),
        "client in a transaction",
    )
    .await;

    for k in [k0, k1, k2, k1] {
        let answer = idle.exchange(&select(k), 1).await;
        assert_eq!(tags(&answer), "TDCZ", "autocommit key {k}: {answer:?}");
    }

    // The transaction is gone: its next statement (for another shard) is
    // told so, once, naming the shard; the transaction stays failed until
    // the client ends it, then everything runs.
    let answer = in_tx.exchange(&select(k0), 1).await;
    assert_eq!(tags(&answer), "EZ", "{answer:?}");
    let text = answer[0].normalized();
    assert!(text.contains("08006") && text.contains("s1"), "{text}");
    assert_eq!(answer[1].body, b"E", "transaction failed until it ends");
    let answer = in_tx.exchange(&select(k2), 1).await;
    assert_eq!(tags(&answer), "EZ", "{answer:?}");
    assert!(answer[0].normalized().contains("25P02"), "{answer:?}");
    let answer = in_tx.exchange(&wire::query("ROLLBACK"), 1).await;
    assert_eq!(tags(&answer), "CZ", "{answer:?}");
    assert_eq!(answer[1].body, b"I");
    for k in [k0, k1, k2] {
        let answer = in_tx.exchange(&select(k), 1).await;
        assert_eq!(tags(&answer), "TDCZ", "after ROLLBACK, key {k}: {answer:?}");
    }
    server.stop().await;
}

/// A map whose third shard is a cluster of this test's own, so it can be
/// killed without touching the shared fleet.
fn map_with_own_third_shard(db: &str, own: &DevCluster) -> String {
    let fleet = &fleet().clusters;
    format!(
        "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\n\
         pool: {{ size: 4, connect_timeout: 1s }}\n\
         shards:\n  - {{ name: s0, url: \"{}\" }}\n  - {{ name: s1, url: \"{}\" }}\n  - {{ name: s2, url: \"{}\" }}\n{MAP}",
        fleet[0].url(db),
        fleet[1].url(db),
        own.url(db),
    )
}

async fn connect_through(port: u16, db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through shardgate");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_fails_only_its_own_keys() {
    let db = fresh_db_with("dead_shard", SCHEMA).await;
    let mut own = DevCluster::start("dead-shard").expect("own cluster");
    own.create_database(&db).expect("database on own cluster");
    own.psql(&db, SCHEMA).expect("schema on own cluster");
    let server = start_proxy(&map_with_own_third_shard(&db, &own)).await;
    let port = server.address.port();
    let keys = keys_on_three_shards();
    let setup = connect_through(port, &db).await;
    for k in keys {
        setup
            .execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&k])
            .await
            .expect("insert");
    }
    // Clients that used every shard before it died.
    let mut before = Vec::new();
    for _ in 0..5 {
        let client = connect_through(port, &db).await;
        for k in keys {
            client
                .query_one("SELECT name FROM users WHERE id = $1", &[&k])
                .await
                .expect("lookup before the kill");
        }
        before.push(client);
    }

    own.kill().expect("kill -9 the third shard");

    // Fresh connections prepare first as asyncpg does (Parse, Describe,
    // Flush: no Bind yet, so no key: the Describe may go to any shard),
    // then look up live keys.
    let mut failures = Vec::new();
    for i in 0..30 {
        let mut raw = Wire::connect(port, "app", &db).await;
        let mut prepare = wire::parse("s1", "SELECT name FROM users WHERE id = $1", &[20]);
        prepare.extend(wire::describe(b'S', "s1"));
        prepare.extend(wire::flush());
        raw.send(&prepare).await;
        let mut described = String::new();
        while !described.ends_with('T') && !described.ends_with('E') {
            match raw.recv().await {
                Some(message) => {
                    described.push(message.tag as char);
                    if message.tag == b'E' {
                        failures.push(format!(
                            "connection {i}: describe: {}",
                            message.normalized()
                        ));
                    }
                }
                None => {
                    failures.push(format!("connection {i}: closed during describe"));
                    break;
                }
            }
        }
        if described.ends_with('E') {
            raw.exchange(&wire::sync(), 1).await;
        }
        for k in &keys[..2] {
            let id = k.to_string();
            let mut lookup = wire::bind("", "s1", &[Some(&id)]);
            lookup.extend(wire::execute("", 0));
            lookup.extend(wire::sync());
            let answer = raw.exchange(&lookup, 1).await;
            if tags(&answer) != "2DCZ" {
                failures.push(format!("connection {i}: key {k}: {answer:?}"));
            }
        }
        // Statements any shard can answer pass over the dead one.
        let answer = raw.exchange(&wire::query("SELECT 1"), 1).await;
        if tags(&answer) != "TDCZ" {
            failures.push(format!("connection {i}: SELECT 1: {answer:?}"));
        }
    }
    for (i, client) in before.iter().enumerate() {
        for k in &keys[..2] {
            if let Err(error) = client
                .query_one("SELECT name FROM users WHERE id = $1", &[k])
                .await
            {
                failures.push(format!("earlier client {i}: key {k}: {error}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "statements for live shards failed:\n{}",
        failures.join("\n")
    );

    // The dead shard's own keys fail with 08006 naming it.
    let error = before[0]
        .query_one("SELECT name FROM users WHERE id = $1", &[&keys[2]])
        .await
        .expect_err("dead shard");
    let db_error = error.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "08006", "{db_error:?}");
    assert!(db_error.message().contains("s2"), "{db_error:?}");

    // Back: its keys answer again, on the same client connections (the
    // row itself may be gone: test clusters run without fsync).
    own.restart().expect("restart the third shard");
    let restarted = Instant::now();
    loop {
        match before[0]
            .query("SELECT name FROM users WHERE id = $1", &[&keys[2]])
            .await
        {
            Ok(_) => break,
            Err(error) => assert!(
                restarted.elapsed() < Duration::from_secs(10),
                "shard s2 still failing 10 s after its restart: {error:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "shard s2 answered {:?} after its restart",
        restarted.elapsed()
    );
    server.stop().await;
}

/// Stops (SIGSTOP) a cluster's postmaster and every backend, as a hung
/// host would look; continues them when dropped, whatever the test did.
struct Frozen(i32);

impl Frozen {
    fn freeze(cluster: &DevCluster) -> Frozen {
        let pid = cluster.postmaster_pid().expect("postmaster running");
        signal_tree(pid, "-STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_tree(self.0, "-CONT");
    }
}

fn signal_tree(pid: i32, signal: &str) {
    let _ = std::process::Command::new("pkill")
        .args([signal, "-P", &pid.to_string()])
        .status();
    let _ = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// A proxy over two shared shards and a third shard on a cluster of its
/// own (so a test can freeze it), with `query_timeout` set, one row per
/// shard loaded, and a client connected through it.
struct OwnThirdShard {
    db: String,
    own: DevCluster,
    server: shardgate::server::RunningServer,
    keys: [i64; 3],
    client: tokio_postgres::Client,
}

async fn proxy_with_own_third_shard(name: &str, query_timeout: &str) -> OwnThirdShard {
    let db = fresh_db_with(name, SCHEMA).await;
    let own = DevCluster::start(&name.replace('_', "-")).expect("own cluster");
    own.create_database(&db).expect("database on own cluster");
    own.psql(&db, SCHEMA).expect("schema on own cluster");
    // connect_timeout above query_timeout: a statement that needs a new
    // connection to the hung shard must still fail within query_timeout.
    let map = map_with_own_third_shard(&db, &own).replace(
        "connect_timeout: 1s }",
        &format!("connect_timeout: 10s, query_timeout: {query_timeout} }}"),
    );
    assert!(
        map.contains(&format!("query_timeout: {query_timeout}")),
        "{map}"
    );
    let server = start_proxy(&map).await;
    let keys = keys_on_three_shards();
    let client = connect_through(server.address.port(), &db).await;
    for k in keys {
        client
            .execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&k])
            .await
            .expect("insert");
    }
    OwnThirdShard {
        db,
        own,
        server,
        keys,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shard_fails_its_statements_within_query_timeout() {
    let OwnThirdShard {
        db,
        own,
        server,
        keys,
        client,
    } = proxy_with_own_third_shard("hung_shard", "2s").await;
    let port = server.address.port();

    // Two idle pooled connections to s2 (one per statement below; each
    // timed-out statement drops its backend, and a new connection to a
    // hung server fails with 08006 after connect_timeout instead).
    let second = connect_through(port, &db).await;
    for c in [&client, &second] {
        c.batch_execute("BEGIN").await.expect("begin");
        c.query_one("SELECT name FROM users WHERE id = $1", &[&keys[2]])
            .await
            .expect("warm s2");
    }
    for c in [&client, &second] {
        c.batch_execute("COMMIT").await.expect("commit");
    }

    let frozen = Frozen::freeze(&own);
    let bound = Duration::from_secs(2) + Duration::from_millis(1500);
    // A statement over every shard, and one for the hung shard.
    for sql in [
        "SELECT count(*) FROM users".to_string(),
        format!("SELECT name FROM users WHERE id = {}", keys[2]),
    ] {
        let started = Instant::now();
        let error = client.simple_query(&sql).await.expect_err("hung shard");
        let elapsed = started.elapsed();
        let db_error = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {error}"));
        assert_eq!(db_error.code().code(), "57014", "{sql}: {db_error:?}");
        assert!(db_error.message().contains("s2"), "{sql}: {db_error:?}");
        assert!(
            elapsed < bound,
            "{sql}: failed after {elapsed:?}, bound {bound:?}"
        );
        eprintln!("{sql}: {} after {elapsed:?}", db_error.message());
        // The same client goes on with the live shards (simple queries:
        // they take no pooled connection of s2, which the next statement
        // needs; a Describe may, see below).
        for k in &keys[..2] {
            client
                .simple_query(&format!("SELECT name FROM users WHERE id = {k}"))
                .await
                .unwrap_or_else(|e| panic!("key {k} after the timeout: {e}"));
        }
    }
    // Both pooled connections to s2 are gone: the next statement for it
    // waits for a new one, which the stopped server never gives.
    let started = Instant::now();
    let error = client
        .simple_query(&format!("SELECT name FROM users WHERE id = {}", keys[2]))
        .await
        .expect_err("no connection to the hung shard");
    let db_error = error.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "57014", "{db_error:?}");
    assert!(db_error.message().contains("s2"), "{db_error:?}");
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    eprintln!("{} after {:?}", db_error.message(), started.elapsed());
    // Prepared lookups of live keys: their Describe, which any shard may
    // answer, does not wait on the hung one: it timed out above, so it is
    // tried last for a while.
    for round in 0..3 {
        for k in &keys[..2] {
            let started = Instant::now();
            let fresh = connect_through(port, &db).await;
            fresh
                .query_one("SELECT name FROM users WHERE id = $1", &[k])
                .await
                .unwrap_or_else(|e| panic!("prepared lookup of key {k}: {e}"));
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "round {round}, key {k}: {:?}",
                started.elapsed()
            );
        }
    }
    drop(frozen);
    let resumed = Instant::now();
    loop {
        match client
            .query_one("SELECT name FROM users WHERE id = $1", &[&keys[2]])
            .await
        {
            Ok(_) => break,
            Err(error) => assert!(
                resumed.elapsed() < Duration::from_secs(10),
                "shard s2 still failing 10 s after SIGCONT: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_transaction_is_ended_after_idle_transaction_timeout() {
    let db = fresh_db_with("idle_transaction", SCHEMA).await;
    let server = start_proxy(&shard_map(
        &db,
        &format!("pool: {{ size: 1, checkout_timeout: 10s, idle_transaction_timeout: 1s }}\n{MAP}"),
    ))
    .await;
    let [k0, _, _] = keys_on_three_shards();
    let mut idle = Wire::connect(server.address.port(), "app", &db).await;
    assert_eq!(tags(&idle.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    let insert = format!("INSERT INTO users (id, name) VALUES ({k0}, 'never')");
    assert_eq!(tags(&idle.exchange(&wire::query(&insert), 1).await), "CZ");
    let started = Instant::now();
    let message = idle.recv().await.expect("the timeout's FATAL");
    let elapsed = started.elapsed();
    let text = message.normalized();
    assert!(text.contains("FATAL") && text.contains("25P03"), "{text}");
    assert!(idle.recv().await.is_none(), "connection closed");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // Rolled back, and the one backend of the shard is free again.
    let mut other = Wire::connect(server.address.port(), "app", &db).await;
    let answer = other.exchange(&select(k0), 1).await;
    assert_eq!(tags(&answer), "TCZ", "nothing committed: {answer:?}");
    // A client that is busy, not idle, is not cut off.
    assert_eq!(tags(&other.exchange(&wire::query("BEGIN"), 1).await), "CZ");
    let slow = format!("SELECT pg_sleep(1.5), name FROM users WHERE id = {k0}");
    assert_eq!(tags(&other.exchange(&wire::query(&slow), 1).await), "TCZ");
    assert_eq!(tags(&other.exchange(&wire::query("COMMIT"), 1).await), "CZ");
    server.stop().await;
}

/// A Describe (asyncpg and tokio-postgres prepare with Parse/Describe
/// before Bind) that lands on a shard that has just hung — before any of
/// its statements has failed, so it is not yet suspect — waits at most
/// about a second there and is answered by another shard, instead of
/// waiting for the whole query_timeout (seen by the reliability suite:
/// fresh clients' lookups of live keys took up to query_timeout early in a
/// SIGSTOP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_describe_does_not_wait_out_query_timeout_on_a_newly_hung_shard() {
    let OwnThirdShard {
        db,
        own,
        server,
        keys,
        client: _loader,
    } = proxy_with_own_third_shard("hung_describe", "5s").await;
    let port = server.address.port();
    // Idle pooled connections to every shard, s2 included: a Describe
    // there gets a connection at once and then waits on the hung server.
    let warm: Vec<_> = futures::future::join_all((0..3).map(|_| connect_through(port, &db))).await;
    for c in &warm {
        c.batch_execute("BEGIN").await.expect("begin");
        c.query_one(
            "SELECT 1 FROM users WHERE id = $1 OR true LIMIT 1",
            &[&keys[2]],
        )
        .await
        .expect("warm s2");
    }
    for c in &warm {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    let frozen = Frozen::freeze(&own);
    let mut slowest = Duration::ZERO;
    for round in 0..6 {
        let k = keys[round % 2];
        let started = Instant::now();
        let fresh = connect_through(port, &db).await;
        fresh
            .query_one("SELECT name FROM users WHERE id = $1", &[&k])
            .await
            .unwrap_or_else(|e| panic!("prepared lookup of key {k}: {e}"));
        slowest = slowest.max(started.elapsed());
    }
    drop(frozen);
    eprintln!("slowest prepared lookup of a live key: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(2500),
        "a live key's lookup waited {slowest:?} (query_timeout 5 s)"
    );
    server.stop().await;
}

/// A backend that dies while a statement's hidden Parse is in flight (the
/// pool handed out a connection terminated moments before, too recently
/// used to be checked) leaves nothing behind for the next backend: the
/// failed Parse's statement was once marked as missing on whichever
/// backend came next, so its fresh copy there was created again
/// (`42P05 prepared statement "sg_…" already exists`; seen in
/// `a_dead_shard_fails_only_its_own_keys` under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_lost_during_a_parse_leaves_the_next_backend_consistent() {
    let db = fresh_db_with("lost_parse", SCHEMA).await;
    let cluster = &fleet().clusters[0];
    let map = format!(
        "listen: 127.0.0.1:0\nauth: trust\nusers:\n  - {{ name: app }}\n\
         pool: {{ mode: transaction, size: 1 }}\n\
         shards:\n  - {{ name: s0, url: \"{}\" }}\n",
        cluster.url(&db)
    );
    let server = start_proxy(&map).await;
    let port = server.address.port();
    let direct = connect(cluster, &db).await;
    let select = "SELECT name FROM users WHERE id = $1";
    let run = |name: &str, id: &str| {
        let mut batch = wire::parse(name, select, &[20]);
        batch.extend(wire::bind("", name, &[Some(id)]));
        batch.extend(wire::execute("", 0));
        batch.extend(wire::sync());
        batch
    };
    let errors = |answers: &[wire::Msg]| -> Vec<String> {
        answers.iter().filter_map(wire::Msg::error_code).collect()
    };
    // The race needs the terminated backend to be handed out again within
    // the pool's health-check grace (250 ms): tried a few times.
    let mut raced = false;
    for attempt in 0..10 {
        let mut c = Wire::connect(port, "app", &db).await;
        let answers = c.exchange(&run(&format!("a{attempt}"), "1"), 1).await;
        assert_eq!(errors(&answers), Vec::<String>::new(), "first run");
        let answers = c.exchange(&wire::query("SELECT pg_backend_pid()"), 1).await;
        let pid: i32 = answers
            .iter()
            .find(|m| m.tag == b'D')
            .and_then(|m| wire::fields_of_row(&m.body).into_iter().next().flatten())
            .and_then(|p| p.parse().ok())
            .expect("the backend's pid");
        direct
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("terminate");
        while direct
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .expect("pg_stat_activity")
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A new name for the same text: its Parse goes to the dead backend.
        let answers = c.exchange(&run(&format!("b{attempt}"), "1"), 1).await;
        if errors(&answers) != vec!["08006"] {
            // The pool noticed the dead connection first: no race this time.
            assert_eq!(errors(&answers), Vec::<String>::new(), "{answers:?}");
            continue;
        }
        raced = true;
        // The next backend: the statement is created there under a new
        // name, bound again, and parsed under yet another name.
        let bind_again = {
            let mut batch = wire::bind("", &format!("c{attempt}"), &[Some("3")]);
            batch.extend(wire::execute("", 0));
            batch.extend(wire::sync());
            batch
        };
        for (step, batch) in [
            ("parse c", run(&format!("c{attempt}"), "2")),
            ("bind c again", bind_again),
            ("parse d", run(&format!("d{attempt}"), "1")),
        ] {
            let answers = c.exchange(&batch, 1).await;
            assert_eq!(
                errors(&answers),
                Vec::<String>::new(),
                "attempt {attempt}, {step} after the lost backend: {answers:?}"
            );
        }
        break;
    }
    assert!(raced, "the terminated backend was never handed out again");
}
