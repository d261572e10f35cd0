//! Fan-out executor behaviour beyond result equality: writes and their
//! command tags, Broadcast, Split INSERT, shard errors, transactions, the
//! memory limit, collation and protocol refusals, schema drift.

mod fanout_util;
mod support;

use std::collections::BTreeMap;

use fanout_util::{Fixture, Proto};
use shardgate::router::Route;

const MAP: &str = "functions:\n  by_id: { kind: hash }\ntables:\n  t: { key: id, function: by_id }\n  r: { replicated: true }\n";

async fn fixture(name: &str, extra: &str) -> Fixture {
    let fx = Fixture::new(name, &format!("{MAP}{extra}")).await;
    fx.everywhere(
        "CREATE TABLE t (id int8 PRIMARY KEY, v int4, s text); CREATE TABLE r (k int4, name text);",
    )
    .await;
    let rows: Vec<(String, String)> = (1..=300)
        .map(|i| (i.to_string(), format!("({i}, {}, 's{}')", i % 10, i % 7)))
        .collect();
    fx.load("t", "id", &rows).await;
    fx
}

async fn shard_count(fx: &Fixture, shard: usize, sql: &str) -> i64 {
    let c = support::connect(&support::fleet().clusters[shard], &fx.db).await;
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sum_tags_and_concatenate_returning() {
    let mut fx = fixture("fanout_writes", "").await;
    for (proto, sql) in [
        (
            Proto::Simple,
            "UPDATE t SET v = v + 10 WHERE v = 3 RETURNING id, v",
        ),
        (
            Proto::ExtText,
            "UPDATE t SET v = v + 10 WHERE v = 4 RETURNING id, v",
        ),
    ] {
        let got = fx.via_executor(sql, &[], proto).await;
        let want = fx.via_oracle(sql, &[], proto).await;
        assert_eq!(got.error, None);
        assert_eq!(got.tag, want.tag);
        assert_eq!(got.tag.as_deref(), Some("UPDATE 30"));
        let (mut a, mut b) = (got.rows.clone(), want.rows.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(got.fields, want.fields);
    }
    let got = fx
        .via_executor("DELETE FROM t WHERE v = 5", &[], Proto::Simple)
        .await;
    let want = fx
        .via_oracle("DELETE FROM t WHERE v = 5", &[], Proto::Simple)
        .await;
    assert_eq!(got.tag, want.tag);
    assert_eq!(got.tag.as_deref(), Some("DELETE 30"));
    // A subquery co-located on the sharding key runs per shard.
    let sql = "UPDATE t SET v = v + 100 WHERE id IN (SELECT id FROM t WHERE s = 's3') AND EXISTS (SELECT 1 FROM t t2 WHERE t2.id = t.id AND t2.v < 8)";
    let got = fx.via_executor(sql, &[], Proto::Simple).await;
    let want = fx.via_oracle(sql, &[], Proto::Simple).await;
    assert_eq!(got.error, None);
    assert_eq!(got.tag, want.tag);
    let check = "SELECT count(*), sum(v) FROM t";
    assert_eq!(
        fx.via_executor(check, &[], Proto::Simple).await.rows,
        fx.via_oracle(check, &[], Proto::Simple).await.rows
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_runs_everywhere_and_reports_one_shard() {
    let mut fx = fixture("fanout_broadcast", "").await;
    let got = fx
        .via_executor_route(
            "CREATE TABLE b (x int)",
            &[],
            Proto::Simple,
            &Route::Broadcast,
        )
        .await;
    assert_eq!(
        (got.error.clone(), got.tag.as_deref()),
        (None, Some("CREATE TABLE"))
    );
    // Notices come once, from one shard.
    let got = fx
        .via_executor_route(
            "DROP TABLE IF EXISTS nothing_here",
            &[],
            Proto::Simple,
            &Route::Broadcast,
        )
        .await;
    assert_eq!(got.notices, 1, "{got:?}");
    let got = fx
        .via_executor_route(
            "INSERT INTO r VALUES (1, 'a'), (2, 'b') RETURNING k",
            &[],
            Proto::ExtText,
            &Route::Broadcast,
        )
        .await;
    assert_eq!(got.tag.as_deref(), Some("INSERT 0 2"));
    assert_eq!(got.rows.len(), 2, "RETURNING rows of one shard");
    for shard in 0..3 {
        assert_eq!(shard_count(&fx, shard, "SELECT count(*) FROM r").await, 2);
    }
    // A shard where the statement fails fails the broadcast, naming the shard.
    let c = support::connect(&support::fleet().clusters[1], &fx.db).await;
    c.batch_execute("CREATE TABLE only_s1 (x int)")
        .await
        .unwrap();
    let got = fx
        .via_executor_route(
            "CREATE TABLE only_s1 (x int)",
            &[],
            Proto::Simple,
            &Route::Broadcast,
        )
        .await;
    let (code, _, detail) = got.error.expect("error");
    assert_eq!(code, "42P07");
    assert!(detail.contains("s1"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_insert_sends_each_shard_its_rows_and_keeps_values_order() {
    let mut fx = fixture("fanout_split", "").await;
    let ids = [1001i64, 1002, 1003, 1004, 1005, 1006, 1007, 1008];
    let mut rows_by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        rows_by_shard
            .entry(fx.shard_of("t", "id", &id.to_string()))
            .or_default()
            .push(i);
    }
    assert!(rows_by_shard.len() > 1);
    let route = Route::Split { rows_by_shard };
    // Simple protocol: literal rows.
    let values: Vec<String> = ids.iter().map(|i| format!("({i}, {i}, 'x')")).collect();
    let sql = format!(
        "INSERT INTO t (id, v, s) VALUES {} RETURNING id",
        values.join(", ")
    );
    let got = fx
        .via_executor_route(&sql, &[], Proto::Simple, &route)
        .await;
    assert_eq!(got.error, None);
    assert_eq!(got.tag.as_deref(), Some("INSERT 0 8"));
    let returned: Vec<String> = (0..8).map(|r| got.text(r, 0).unwrap()).collect();
    let expected: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    assert_eq!(returned, expected, "RETURNING in VALUES order");
    for id in ids {
        let shard = fx.shard_of("t", "id", &id.to_string());
        let n = shard_count(
            &fx,
            shard,
            &format!("SELECT count(*) FROM t WHERE id = {id}"),
        )
        .await;
        assert_eq!(n, 1, "row {id} on its shard");
    }
    // Extended protocol: parameters renumbered per shard, only the referenced sent.
    let ids2: Vec<String> = (2001..=2006).map(|i: i64| i.to_string()).collect();
    let mut rows_by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, id) in ids2.iter().enumerate() {
        rows_by_shard
            .entry(fx.shard_of("t", "id", id))
            .or_default()
            .push(i);
    }
    let placeholders: Vec<String> = (0..6)
        .map(|i| format!("(${}, ${}, $13)", 2 * i + 1, 2 * i + 2))
        .collect();
    let sql = format!(
        "INSERT INTO t (id, v, s) VALUES {} RETURNING id, s",
        placeholders.join(", ")
    );
    let mut params: Vec<Option<&str>> = Vec::new();
    for id in &ids2 {
        params.push(Some(id));
        params.push(Some("7"));
    }
    params.push(Some("p"));
    let got = fx
        .via_executor_route(
            &sql,
            &params,
            Proto::ExtText,
            &Route::Split { rows_by_shard },
        )
        .await;
    assert_eq!(got.error, None);
    assert_eq!(got.tag.as_deref(), Some("INSERT 0 6"));
    let returned: Vec<String> = (0..6).map(|r| got.text(r, 0).unwrap()).collect();
    assert_eq!(returned, ids2);
    assert_eq!(got.text(0, 1).as_deref(), Some("p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_error_keeps_sqlstate_names_the_shard_and_leaves_connections_usable() {
    let mut fx = fixture("fanout_errors", "").await;
    // Division by zero only where id = 17.
    let got = fx
        .via_executor(
            "SELECT id, 1 / (id - 17) FROM t ORDER BY id",
            &[],
            Proto::ExtText,
        )
        .await;
    let (code, message, detail) = got.error.expect("error");
    assert_eq!(code, "22012");
    assert_eq!(message, "division by zero");
    let shard = fx.shard_of("t", "id", "17");
    assert!(detail.contains(&format!("s{shard}")), "{detail}");
    for c in &fx.shards {
        assert_eq!(c.transaction_status(), b'I');
    }
    let again = fx
        .via_executor("SELECT count(*) FROM t", &[], Proto::Simple)
        .await;
    assert_eq!(again.text(0, 0).as_deref(), Some("300"));

    // Inside a transaction block an error leaves every shard failed ('E').
    for c in fx.shards.iter_mut() {
        let a = fanout_util::read_answer(c, &Fixture::request("BEGIN", &[], Proto::Simple)).await;
        assert_eq!(a.error, None);
    }
    let got = fx
        .via_executor("SELECT 1 / (id - 17) FROM t", &[], Proto::Simple)
        .await;
    assert_eq!(got.error.map(|e| e.0).as_deref(), Some("22012"));
    for c in fx.shards.iter_mut() {
        let _ =
            fanout_util::read_answer(c, &Fixture::request("ROLLBACK", &[], Proto::Simple)).await;
        assert_eq!(c.transaction_status(), b'I');
    }
    // A successful fan-out inside a transaction block reports 'T'.
    for c in fx.shards.iter_mut() {
        let _ = fanout_util::read_answer(c, &Fixture::request("BEGIN", &[], Proto::Simple)).await;
    }
    let got = fx
        .via_executor("SELECT id FROM t ORDER BY id LIMIT 3", &[], Proto::Simple)
        .await;
    assert_eq!(got.rows.len(), 3);
    for c in fx.shards.iter_mut() {
        assert_eq!(c.transaction_status(), b'T');
        let _ = fanout_util::read_answer(c, &Fixture::request("COMMIT", &[], Proto::Simple)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_ends_the_query_with_53200_and_the_session_survives() {
    let mut fx = fixture("fanout_memory", "max_merge_memory: 256kB\n").await;
    // 6,000 groups / distinct rows do not fit in 256 kB.
    let got = fx
        .via_executor(
            "SELECT s, v, g, count(*) FROM t, generate_series(1, 20) g GROUP BY s, v, id, g",
            &[],
            Proto::Simple,
        )
        .await;
    assert_eq!(
        got.error.as_ref().map(|e| e.0.as_str()),
        Some("53200"),
        "{:?}",
        got.error
    );
    let got = fx
        .via_executor(
            "SELECT DISTINCT id, s, g FROM t, generate_series(1, 20) g",
            &[],
            Proto::ExtText,
        )
        .await;
    assert_eq!(
        got.error.as_ref().map(|e| e.0.as_str()),
        Some("53200"),
        "{:?}",
        got.error
    );
    for c in &fx.shards {
        assert_eq!(c.transaction_status(), b'I');
    }
    // A streaming ordered merge holds O(shards) rows, whatever the result size.
    let got = fx
        .via_executor(
            "SELECT t.*, g FROM t, generate_series(1, 20) g ORDER BY id, g",
            &[],
            Proto::Simple,
        )
        .await;
    assert_eq!((got.error, got.rows.len()), (None, 6000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_order_needs_a_bytewise_collation_or_collate_c() {
    let mut fx = fixture("fanout_collation", "").await;
    fx.executor.set_text_collation_bytewise(false);
    let got = fx
        .via_executor("SELECT s FROM t ORDER BY s", &[], Proto::Simple)
        .await;
    let (code, message, _) = got.error.expect("refused");
    assert_eq!(code, "0A000");
    assert!(message.contains("collation"), "{message}");
    let got = fx
        .via_executor(
            "SELECT s, id FROM t ORDER BY s COLLATE \"C\", id",
            &[],
            Proto::Simple,
        )
        .await;
    let want = fx
        .via_oracle(
            "SELECT s, id FROM t ORDER BY s COLLATE \"C\", id",
            &[],
            Proto::Simple,
        )
        .await;
    assert_eq!(got.error, None);
    assert_eq!(got.rows, want.rows);
    // Numbers still merge.
    let got = fx
        .via_executor(
            "SELECT id FROM t ORDER BY v, id LIMIT 5",
            &[],
            Proto::Simple,
        )
        .await;
    assert_eq!(got.rows.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_without_order_returns_exactly_limit_rows() {
    let mut fx = fixture("fanout_limit", "").await;
    for n in [0usize, 1, 7, 299, 300, 1000] {
        let got = fx
            .via_executor(&format!("SELECT id FROM t LIMIT {n}"), &[], Proto::Simple)
            .await;
        assert_eq!(got.rows.len(), n.min(300));
        assert_eq!(got.tag, Some(format!("SELECT {}", n.min(300))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_is_an_error_naming_the_shards() {
    let mut fx = fixture("fanout_drift", "").await;
    let c = support::connect(&support::fleet().clusters[2], &fx.db).await;
    c.batch_execute("ALTER TABLE t ALTER COLUMN v TYPE int8")
        .await
        .unwrap();
    let got = fx.via_executor("SELECT v FROM t", &[], Proto::Simple).await;
    let (code, message, _) = got.error.expect("drift");
    assert_eq!(code, "42804");
    assert!(message.contains("s2"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_concatenates_shards() {
    let mut fx = fixture("fanout_copy", "").await;
    for sql in [
        "COPY t TO STDOUT",
        "COPY (SELECT id, s FROM t WHERE v > 5) TO STDOUT WITH (FORMAT csv)",
    ] {
        for proto in [Proto::Simple, Proto::ExtText] {
            let got = fx.via_executor(sql, &[], proto).await;
            let want = fx.via_oracle(sql, &[], proto).await;
            assert_eq!(got.error, None, "{sql}");
            assert!(got.copy_started && got.copy_done, "{sql}");
            assert_eq!(got.tag, want.tag, "{sql}");
            let (mut a, mut b) = (got.copy.clone(), want.copy.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "{sql}");
            assert!(!a.is_empty());
        }
    }
    for sql in [
        "COPY t TO STDOUT WITH (FORMAT binary)",
        "COPY t TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT id FROM t ORDER BY id) TO STDOUT",
        "COPY (SELECT v, count(*) FROM t GROUP BY v) TO STDOUT",
        "COPY t FROM STDIN",
    ] {
        let got = fx
            .via_executor_route(sql, &[], Proto::Simple, &Route::All)
            .await;
        assert_eq!(
            got.error.as_ref().map(|e| e.0.as_str()),
            Some("0A000"),
            "{sql}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_cannot_run_per_shard_are_refused() {
    let mut fx = fixture("fanout_write_refusals", "").await;
    for sql in [
        "UPDATE t SET v = 0 WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 3)",
        "DELETE FROM t WHERE v > (SELECT avg(v) FROM t)",
        "INSERT INTO t (id, v) SELECT max(id) + 1, 0 FROM t",
        "DECLARE c CURSOR FOR SELECT * FROM t",
        "CREATE TABLE copy_of_t AS SELECT count(*) FROM t",
        "SELECT * FROM t FOR NO KEY UPDATE",
    ] {
        let got = fx
            .via_executor_route(sql, &[], Proto::Simple, &Route::All)
            .await;
        assert_eq!(
            got.error.as_ref().map(|e| e.0.as_str()),
            Some("0A000"),
            "{sql}: {:?}",
            got.error
        );
    }
    // Nothing changed.
    let got = fx
        .via_executor("SELECT count(*), sum(v) FROM t", &[], Proto::Simple)
        .await;
    let want = fx
        .via_oracle("SELECT count(*), sum(v) FROM t", &[], Proto::Simple)
        .await;
    assert_eq!(got.rows, want.rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_error_cancels_the_other_shards() {
    let mut fx = fixture("fanout_cancel", "").await;
    let bad = fx.shard_of("t", "id", "17");
    // One slow row on each other shard.
    let mut ids = vec!["17".to_string()];
    for shard in (0..3).filter(|s| *s != bad) {
        let id = (1..=300)
            .find(|i| fx.shard_of("t", "id", &i.to_string()) == shard)
            .unwrap();
        ids.push(id.to_string());
    }
    let sql = format!(
        "SELECT CASE WHEN id = 17 THEN 1 / 0 ELSE (SELECT 1 FROM pg_sleep(20)) END FROM t WHERE id IN ({})",
        ids.join(", ")
    );
    let started = std::time::Instant::now();
    let got = fx
        .via_executor_route(&sql, &[], Proto::Simple, &Route::All)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(got.error.as_ref().map(|e| e.0.as_str()), Some("22012"));
    assert!(
        elapsed < std::time::Duration::from_secs(10),
        "took {elapsed:?}: the sleeping shards were not cancelled"
    );
    for c in &fx.shards {
        assert_eq!(c.transaction_status(), b'I');
    }
    let again = fx
        .via_executor("SELECT count(*) FROM t", &[], Proto::Simple)
        .await;
    assert_eq!(again.text(0, 0).as_deref(), Some("300"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_defined_aggregates_are_refused_once_known() {
    let mut fx = fixture("fanout_user_agg", "").await;
    fx.everywhere("CREATE AGGREGATE my_sum(int4) (sfunc = int4pl, stype = int4)")
        .await;
    let c = support::connect(&support::fleet().clusters[0], &fx.db).await;
    let names: Vec<String> = c
        .query(
            "SELECT DISTINCT proname::text FROM pg_proc WHERE prokind = 'a'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.contains(&"my_sum".to_string()));
    fx.executor.set_aggregate_names(names);
    let got = fx
        .via_executor_route("SELECT my_sum(v) FROM t", &[], Proto::Simple, &Route::All)
        .await;
    assert_eq!(
        got.error.as_ref().map(|e| e.0.as_str()),
        Some("0A000"),
        "{got:?}"
    );
    // Built-in aggregates the executor merges still work.
    let got = fx
        .via_executor("SELECT sum(v), count(*) FROM t", &[], Proto::Simple)
        .await;
    let want = fx
        .via_oracle("SELECT sum(v), count(*) FROM t", &[], Proto::Simple)
        .await;
    assert_eq!(got.rows, want.rows);
}
