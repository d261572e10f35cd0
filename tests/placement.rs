//! Placement epochs (issue #13), against real shards: a table whose map
//! placement differs from the one recorded on the shards is refused with
//! 55000 naming the table, the map's placement and the shards'; nothing is
//! written anywhere; an unchanged table in the same map keeps working;
//! `placement accept` resumes routing; `check --shards` shows map vs
//! recorded; two proxies on the same shards each follow the records.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{connect, connect_proxy, fleet, fresh_db_with, start_proxy};
use tokio_postgres::Client;

const SCHEMA: &str = "\
    CREATE TABLE items (id bigint PRIMARY KEY, grp bigint NOT NULL, region text NOT NULL, note text);\
    CREATE TABLE keep (id bigint PRIMARY KEY, note text);";

/// `keep` is range-sharded over s0 and s1 only: adding, removing or
/// reordering other shards does not move its rows, so it stays routed.
const KEEP: &str =
    "  by_range: { kind: range, ranges: [ { to: 1000, shard: s0 }, { from: 1000, shard: s1 } ] }\n";

/// A map over the fleet's clusters `shards` (named s<cluster index>, in
/// that order) with `functions` (after `by_range`) and `tables` (after `keep`).
fn map(db: &str, shards: &[usize], functions: &str, tables: &str, extra: &str) -> String {
    let mut text =
        String::from("listen: 127.0.0.1:0\nauth: trust\nusers: [ { name: app } ]\nshards:\n");
    for &i in shards {
        text.push_str(&format!(
            "  - {{ name: s{i}, url: \"{}\" }}\n",
            fleet().clusters[i].url(db)
        ));
    }
    text.push_str("functions:\n");
    text.push_str(KEEP);
    text.push_str(functions);
    text.push_str("tables:\n  keep: { key: id, function: by_range }\n");
    text.push_str(tables);
    text.push_str(extra);
    text
}

const HASH: &str = "  f: { kind: hash }\n";
const ITEMS_BY_ID: &str = "  items: { key: id, function: f }\n";

/// Rows of `items` on each cluster (all three, whatever the map).
async fn items_per_cluster(db: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for cluster in &fleet().clusters {
        out.push(
            connect(cluster, db)
                .await
                .query_one("SELECT count(*) FROM items", &[])
                .await
                .expect("count items")
                .get(0),
        );
    }
    out
}

/// Fills `items` (ids 1..=30) and `keep` (ids 1, 2, 1500) through a proxy
/// with `original`, which records their placement on first start.
async fn populate(original: &str) {
    let server = start_proxy(original).await;
    let client = connect_proxy(&server, "app", None).await;
    for id in 1..=30i64 {
        let region = ["eu", "us", "ap"][(id % 3) as usize];
        client
            .execute(
                "INSERT INTO items (id, grp, region, note) VALUES ($1, $2, $3, 'x')",
                &[&id, &(id * 7), &region],
            )
            .await
            .unwrap_or_else(|e| panic!("insert item {id}: {e}"));
    }
    client
        .batch_execute("INSERT INTO keep VALUES (1, 'a'), (2, 'b'), (1500, 'c')")
        .await
        .expect("insert keep");
    server.stop().await;
}

fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

/// Every kind of statement on `items` is refused with 55000 and a message
/// naming the table, the map's and the shards' placement and the way out;
/// no row changes on any cluster; `keep` is read and written normally.
async fn assert_fenced(db: &str, edited: &str, map_says: &str, shards_hold: &str) {
    let before = items_per_cluster(db).await;
    let server = start_proxy(edited).await;
    let client = connect_proxy(&server, "app", None).await;
    let statements = [
        "SELECT note FROM items WHERE id = 7",
        "SELECT count(*) FROM items",
        "INSERT INTO items (id, grp, region) VALUES (7, 49, 'us')",
        "INSERT INTO items (id, grp, region) VALUES (1001, 1, 'eu')",
        "UPDATE items SET note = 'y' WHERE id = 8",
        "DELETE FROM items WHERE id = 9",
        "SELECT k.note FROM keep k JOIN items i ON i.id = k.id WHERE k.id = 1",
    ];
    for sql in statements {
        for simple in [true, false] {
            let result = if simple {
                client.simple_query(sql).await.map(|_| ())
            } else {
                client.query(sql, &[]).await.map(|_| ())
            };
            let error = match result {
                Ok(()) => panic!("{sql} was routed with an edited map:\n{edited}"),
                Err(e) => e,
            };
            let (code, message) = db_error(&error);
            assert_eq!(code, "55000", "{sql}: {message}");
            for needle in [
                "table \"items\" is not routed",
                map_says,
                shards_hold,
                "shardgate placement accept --table items",
            ] {
                assert!(
                    message.contains(needle),
                    "{sql}: {needle:?} not in: {message}"
                );
            }
        }
    }
    // The unchanged table keeps working.
    let row = client
        .query_one("SELECT note FROM keep WHERE id = 1500", &[])
        .await
        .expect("keep is routed");
    assert_eq!(row.get::<_, String>(0), "c");
    client
        .execute("INSERT INTO keep VALUES (1600, 'd')", &[])
        .await
        .expect("insert into keep");
    let rows = client
        .query("SELECT id FROM keep WHERE id IN (1, 2, 1500, 1600)", &[])
        .await
        .expect("keep lookups");
    assert_eq!(rows.len(), 4);
    server.stop().await;
    assert_eq!(items_per_cluster(db).await, before, "nothing was written");
}

/// One edit: populate with `original`, restart with `edited`, expect the fence.
async fn edit_is_refused(
    name: &str,
    (shards, functions, tables): (&[usize], &str, &str),
    (edited_shards, edited_functions, edited_tables): (&[usize], &str, &str),
    map_says: &str,
    shards_hold: &str,
) {
    let db = fresh_db_with(name, SCHEMA).await;
    populate(&map(&db, shards, functions, tables, "")).await;
    // 30 rows, once (sharded) or on every cluster (replicated).
    let total: i64 = items_per_cluster(&db).await.iter().sum();
    assert!(total == 30 || total == 90, "{total} rows");
    let edited = map(&db, edited_shards, edited_functions, edited_tables, "");
    assert_fenced(&db, &edited, map_says, shards_hold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_kind_changed_is_refused() {
    edit_is_refused(
        "kind",
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        (&[0, 1, 2], "  f: { kind: modulo }\n", ITEMS_BY_ID),
        "The map says: sharded by id (integer) with modulo 3 over [s0, s1, s2]",
        "shard(s) s0, s1, s2 hold version 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_added_is_refused() {
    edit_is_refused(
        "added",
        (&[0, 1], HASH, ITEMS_BY_ID),
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        "with hash modulus 3 over [s0, s1, s2]",
        "shard(s) s0, s1 hold version 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_removed_is_refused() {
    edit_is_refused(
        "removed",
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        (&[0, 1], HASH, ITEMS_BY_ID),
        "with hash modulus 2 over [s0, s1]",
        "hash modulus 3 over [s0, s1, s2]",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_reordered_is_refused() {
    edit_is_refused(
        "reordered",
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        (&[1, 0, 2], HASH, ITEMS_BY_ID),
        "over [s1, s0, s2]",
        "over [s0, s1, s2]",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_bound_moved_is_refused() {
    let range = |bound: i64| {
        format!(
            "  f: {{ kind: range, ranges: [ {{ to: {bound}, shard: s0 }}, {{ from: {bound}, shard: s2 }} ] }}\n"
        )
    };
    edit_is_refused(
        "range",
        (&[0, 1, 2], &range(15), ITEMS_BY_ID),
        (&[0, 1, 2], &range(20), ITEMS_BY_ID),
        "[-inf, 20)->s0 [20, +inf)->s2",
        "[-inf, 15)->s0 [15, +inf)->s2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_value_moved_is_refused() {
    let list =
        |us: &str| format!("  f: {{ kind: list, values: {{ eu: s0, us: {us}, ap: s2 }} }}\n");
    edit_is_refused(
        "list",
        (
            &[0, 1, 2],
            &list("s1"),
            "  items: { key: region, function: f }\n",
        ),
        (
            &[0, 1, 2],
            &list("s0"),
            "  items: { key: region, function: f }\n",
        ),
        "us->s0",
        "us->s1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_to_replicated_and_back_is_refused() {
    edit_is_refused(
        "to_replicated",
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        (&[0, 1, 2], HASH, "  items: { replicated: true }\n"),
        "The map says: replicated on [s0, s1, s2]",
        "sharded by id (integer) with hash modulus 3",
    )
    .await;
    edit_is_refused(
        "to_sharded",
        (&[0, 1, 2], HASH, "  items: { replicated: true }\n"),
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        "The map says: sharded by id (integer) with hash modulus 3",
        "hold version 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_column_changed_is_refused() {
    edit_is_refused(
        "key",
        (&[0, 1, 2], HASH, ITEMS_BY_ID),
        (&[0, 1, 2], HASH, "  items: { key: grp, function: f }\n"),
        "The map says: sharded by grp (integer)",
        "sharded by id (integer)",
    )
    .await;
}

fn shardgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardgate"))
}

/// `shardgate check --shards --config PATH`: its stdout, after asserting its exit code.
fn check_shards(path: &std::path::Path, code: i32) -> String {
    let check = shardgate()
        .args(["check", "--shards", "--config"])
        .arg(path)
        .output()
        .expect("run check --shards");
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(code), "{out}");
    out
}

fn write_map(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write map");
    path
}

async fn records(client: &Client, table: &str) -> Option<(i64, String, String)> {
    client
        .query_opt(
            "SELECT version, function, set_by FROM shardgate.placements WHERE table_name = $1",
            &[&table],
        )
        .await
        .expect("read shardgate.placements")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// hash → modulo: refused; `check --shards` says DIFFERS; rows moved by
/// hand; `placement accept` records version 2 with its actor on every shard
/// and prints what it overwrote; the running proxy, whose refused statements
/// make it re-read the records (periodic reads are off), routes again and
/// every key is found where modulo puts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_after_moving_rows_by_hand_resumes_routing() {
    let db = fresh_db_with("accept", SCHEMA).await;
    populate(&map(&db, &[0, 1, 2], HASH, ITEMS_BY_ID, "")).await;
    let edited = map(
        &db,
        &[0, 1, 2],
        "  f: { kind: modulo }\n",
        ITEMS_BY_ID,
        "catalog_refresh: 0s\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_map(&dir, "edited.yaml", &edited);

    let out = check_shards(&path, 1);
    assert!(
        out.contains("items            DIFFERS (not routed)"),
        "{out}"
    );
    assert!(
        out.contains("map: sharded by id (integer) with modulo 3 over [s0, s1, s2]"),
        "{out}"
    );
    assert!(out.contains("s1: version 1 (set "), "{out}");
    assert!(out.contains("keep             ok (version 1)"), "{out}");

    let server = start_proxy(&edited).await;
    let client = connect_proxy(&server, "app", None).await;
    let error = client
        .query("SELECT note FROM items WHERE id = 5", &[])
        .await
        .expect_err("fenced");
    assert_eq!(db_error(&error).0, "55000");

    // Move the rows by hand to where modulo 3 puts them.
    let mut all = Vec::new();
    for cluster in &fleet().clusters {
        let direct = connect(cluster, &db).await;
        for row in direct
            .query("DELETE FROM items RETURNING id, grp, region, note", &[])
            .await
            .expect("take rows")
        {
            all.push((
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, String>(2),
                row.get::<_, Option<String>>(3),
            ));
        }
    }
    assert_eq!(all.len(), 30);
    for (id, grp, region, note) in &all {
        let cluster = &fleet().clusters[(*id % 3) as usize];
        connect(cluster, &db)
            .await
            .execute(
                "INSERT INTO items VALUES ($1, $2, $3, $4)",
                &[id, grp, region, note],
            )
            .await
            .expect("put row");
    }

    let accepted = shardgate()
        .args(["placement", "accept", "--table", "items", "--config"])
        .arg(&path)
        .output()
        .expect("run placement accept");
    let out = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        accepted.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    for shard in ["s0", "s1", "s2"] {
        assert!(
            out.contains(&format!("{shard}: overwrote version 1 (set ")),
            "{out}"
        );
    }
    assert!(out.contains("hash modulus 3"), "{out}");
    assert!(
        out.contains("placement version 2 recorded on every shard by shardgate placement accept"),
        "{out}"
    );
    for cluster in &fleet().clusters {
        let (version, function, set_by) = records(&connect(cluster, &db).await, "items")
            .await
            .expect("record");
        assert_eq!(version, 2);
        assert_eq!(function, "modulo 3");
        assert!(
            set_by.starts_with("shardgate placement accept ("),
            "{set_by}"
        );
    }

    // The running proxy (no periodic catalog reads) re-reads the records
    // because its statements were refused, and routes again.
    let mut routed = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if client
            .query("SELECT note FROM items WHERE id = 5", &[])
            .await
            .is_ok()
        {
            routed = true;
            break;
        }
    }
    assert!(routed, "routing did not resume after placement accept");
    for id in 1..=30i64 {
        let rows = client
            .query("SELECT id FROM items WHERE id = $1", &[&id])
            .await
            .expect("lookup");
        assert_eq!(rows.len(), 1, "item {id} not found");
    }
    let duplicate = client
        .execute(
            "INSERT INTO items (id, grp, region) VALUES (7, 1, 'eu')",
            &[],
        )
        .await
        .expect_err("duplicate key");
    assert_eq!(db_error(&duplicate).0, "23505");
    server.stop().await;

    let out = check_shards(&path, 0);
    assert!(out.contains("items            ok (version 2)"), "{out}");
}

/// Two proxies on the same shards: the one restarted with an edited map
/// refuses; the other keeps routing with the recorded placement (and its
/// catalog refreshes do not change the records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_one_with_an_edited_map() {
    let db = fresh_db_with("two_proxies", SCHEMA).await;
    let original = map(
        &db,
        &[0, 1, 2],
        HASH,
        ITEMS_BY_ID,
        "catalog_refresh: 200ms\n",
    );
    populate(&original).await;
    let a = start_proxy(&original).await;
    let edited = map(&db, &[0, 1, 2], "  f: { kind: modulo }\n", ITEMS_BY_ID, "");
    let b = start_proxy(&edited).await;
    let client_a = connect_proxy(&a, "app", None).await;
    let client_b = connect_proxy(&b, "app", None).await;
    let error = client_b
        .query("SELECT note FROM items WHERE id = 5", &[])
        .await
        .expect_err("B is fenced");
    assert_eq!(db_error(&error).0, "55000");
    // Let A refresh a few times, then use it.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    for id in 1..=30i64 {
        let rows = client_a
            .query("SELECT id FROM items WHERE id = $1", &[&id])
            .await
            .expect("A routes");
        assert_eq!(rows.len(), 1, "item {id} through A");
    }
    client_a
        .execute(
            "INSERT INTO items (id, grp, region) VALUES (31, 1, 'eu')",
            &[],
        )
        .await
        .expect("A inserts");
    assert_eq!(items_per_cluster(&db).await.iter().sum::<i64>(), 31);
    for cluster in &fleet().clusters {
        let (version, function, _) = records(&connect(cluster, &db).await, "items")
            .await
            .expect("record");
        assert_eq!((version, function.as_str()), (1, "hash modulus 3"));
    }
    a.stop().await;
    b.stop().await;
}

/// A table created through the proxy after it started is recorded by the
/// catalog re-read that DDL through shardgate triggers, before the client
/// gets its CREATE TABLE answer (periodic reads are off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_created_through_the_proxy_is_recorded() {
    let db = fresh_db_with("created", SCHEMA).await;
    let text = map(
        &db,
        &[0, 1, 2],
        HASH,
        "  items: { key: id, function: f }\n  later: { key: name, function: f }\n",
        "catalog_refresh: 0s\n",
    );
    let server = start_proxy(&text).await;
    let client = connect_proxy(&server, "app", None).await;
    client
        .batch_execute("CREATE TABLE later (name text PRIMARY KEY)")
        .await
        .expect("create through the proxy");
    for cluster in &fleet().clusters {
        let (version, function, set_by) = records(&connect(cluster, &db).await, "later")
            .await
            .expect("later is recorded");
        assert_eq!((version, function.as_str()), (1, "hash modulus 3"));
        assert!(
            set_by.starts_with("shardgate serve, first record"),
            "{set_by}"
        );
    }
    client
        .execute("INSERT INTO later VALUES ('a')", &[])
        .await
        .expect("insert");
    server.stop().await;
}

/// With no shard answering at startup, no table is routed by an unchecked
/// placement: 08006 (the cause is the shards) naming the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_routed_before_the_records_were_read() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let text = format!(
        "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\ndatabase: app\n\
         pool: {{ connect_timeout: 500ms }}\nshards:\n  - {{ name: s0, url: \"postgres://postgres@127.0.0.1:{closed_port}/app\" }}\n\
         functions:\n  f: {{ kind: hash }}\ntables:\n  items: {{ key: id, function: f }}\n"
    );
    let server = start_proxy(&text).await;
    // Clients cannot even log in without a shard; ask the proxy's router.
    let router = server.shared.router.as_ref().expect("routing is on");
    let error = router
        .route("SELECT * FROM items WHERE id = 1")
        .expect_err("not routed");
    let message = error.to_string();
    assert_eq!(error.sqlstate(), "08006", "{message}");
    assert!(
        message.contains("table \"items\" is not routed yet: the placements recorded"),
        "{message}"
    );
    server.stop().await;
}

/// Shards that hold different placements for a table: refused the same way
/// (55000, "disagree", each shard's version); `check --shards` shows it,
/// a map table created nowhere yet ("not recorded", routed) and a table
/// missing on one shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_that_disagree_are_refused_and_shown_by_check() {
    let db = fresh_db_with("disagree", SCHEMA).await;
    let original = map(
        &db,
        &[0, 1, 2],
        HASH,
        "  items: { key: id, function: f }\n  absent: { key: id, function: f }\n",
        "",
    );
    populate(&original).await;
    connect(&fleet().clusters[1], &db)
        .await
        .batch_execute(
            "UPDATE shardgate.placements SET version = 2, function = 'modulo 3', \
             set_by = 'someone by hand' WHERE table_name = 'items'",
        )
        .await
        .expect("edit one shard's record");
    connect(&fleet().clusters[2], &db)
        .await
        .batch_execute("DROP TABLE keep")
        .await
        .expect("drop keep on one shard");
    let before = items_per_cluster(&db).await;
    let server = start_proxy(&original).await;
    let client = connect_proxy(&server, "app", None).await;
    let error = client
        .query("SELECT note FROM items WHERE id = 3", &[])
        .await
        .expect_err("fenced");
    let (code, message) = db_error(&error);
    assert_eq!(code, "55000", "{message}");
    for needle in [
        "table \"items\" is not routed: the shards disagree about its placement",
        "shard(s) s0, s2 hold version 1",
        "shard(s) s1 hold version 2 (set ",
        "by someone by hand): sharded by id (integer) with modulo 3",
        "The map says: sharded by id (integer) with hash modulus 3 over [s0, s1, s2]",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    let error = client
        .execute(
            "INSERT INTO items (id, grp, region) VALUES (100, 1, 'eu')",
            &[],
        )
        .await
        .expect_err("fenced");
    assert_eq!(db_error(&error).0, "55000");
    // A map table that exists nowhere yet is routed (the shards answer).
    let error = client
        .query("SELECT * FROM absent WHERE id = 1", &[])
        .await
        .expect_err("no such table");
    assert_eq!(db_error(&error).0, "42P01");
    server.stop().await;
    assert_eq!(items_per_cluster(&db).await, before);

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_map(&dir, "map.yaml", &original);
    let out = check_shards(&path, 1);
    for needle in [
        "items            SHARDS DISAGREE (not routed)",
        "    s1: version 2 (set ",
        "absent           not recorded",
        "    s0: not recorded; table missing on this shard",
        "keep             ok (version 1)",
        "; table missing on this shard",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
}
