//! Live reload of the shard map (`cluster`): a valid map applies from each
//! session's next transaction without disconnecting anyone; a map that
//! disagrees with the placements recorded on the shards, or changes the
//! shards, is refused and the running map stays.

mod support;

use shardgate::cluster::ReloadError;
use shardgate::config::Config;

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE countries (code int PRIMARY KEY, name text NOT NULL);";

const USERS_BY_HASH: &str = "functions: { by_id: { kind: hash } }
tables:
  users: { key: id, function: by_id }
";

fn parse(map: &str) -> Result<Config, String> {
    Config::parse(std::path::Path::new("reload-map.yaml"), map, &|_| None)
        .map_err(|e| e.to_string())
}

async fn found(client: &tokio_postgres::Client, keys: &[i64]) -> usize {
    let mut found = 0;
    for k in keys {
        let rows = client
            .simple_query(&format!("SELECT name FROM users WHERE id = {k}"))
            .await
            .expect("key lookup");
        found += rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_between_transactions_and_refuses_unsafe_maps() {
    let db = support::fresh_db_with("reload", SCHEMA).await;
    let first = support::shard_map(&db, USERS_BY_HASH);
    let server = support::start_proxy(&first).await;
    let idle = support::connect_proxy(&server, "app", None).await;
    let keys: Vec<i64> = (1..=30).collect();
    for k in &keys {
        idle.execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[k])
            .await
            .expect("insert");
    }
    // A client inside a transaction when the map changes.
    let busy = support::connect_proxy(&server, "app", None).await;
    busy.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(found(&busy, &keys[..3]).await, 3);

    // 1. A valid map that adds a replicated table: applied, pools kept.
    let second = format!("{first}  countries: {{ replicated: true }}\n");
    let reloaded = server
        .cluster
        .reload(parse(&second))
        .await
        .expect("a valid map reloads");
    assert_eq!((reloaded.generation, reloaded.pools_kept), (2, true));
    assert!(reloaded.needs_restart.is_empty(), "{reloaded:?}");
    // The open transaction keeps the map it started with…
    let error = busy
        .simple_query("SELECT count(*) FROM countries")
        .await
        .expect_err("countries is not in the map this transaction started with");
    eprintln!("inside the old transaction: {error}");
    busy.batch_execute("ROLLBACK").await.expect("rollback");
    // …and takes the new one at its next transaction, as does every other client.
    busy.simple_query("SELECT count(*) FROM countries")
        .await
        .expect("the new map after the transaction");
    idle.execute("INSERT INTO countries (code, name) VALUES (1, 'x')", &[])
        .await
        .expect("a write to the new replicated table");
    assert_eq!(
        support::rows_per_shard(&db, "countries").await,
        vec![1, 1, 1]
    );
    assert_eq!(found(&idle, &keys).await, 30);

    // 2. The same tables with another function: rows would be looked for on
    // other shards. Refused; the running map stays.
    let modulo = second.replace("kind: hash", "kind: modulo");
    match server.cluster.reload(parse(&modulo)).await {
        Err(ReloadError::PlacementDiffers(message)) => {
            assert!(message.contains("users"), "{message}");
            eprintln!("refused: {message}");
        }
        other => panic!("a placement change must be refused, got {other:?}"),
    }
    assert_eq!(
        found(&idle, &keys).await,
        30,
        "still routed by the recorded placement"
    );
    assert_eq!(found(&busy, &keys).await, 30);

    // 3. A shard removed: needs a restart (and moving rows).
    let two_shards: String = second
        .lines()
        .filter(|line| !line.contains("name: s2,"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(
        matches!(
            server.cluster.reload(parse(&two_shards)).await,
            Err(ReloadError::ShardsChanged { .. })
        ),
        "removing a shard must be refused"
    );
    // 4. A file that does not load.
    assert!(matches!(
        server.cluster.reload(parse("shards: [")).await,
        Err(ReloadError::Invalid(_))
    ));
    let metrics = server.shared.metrics.render();
    assert!(
        metrics.contains("shardgate_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardgate_config_reloads_total{result=\"failure\"} 3"),
        "{metrics}"
    );
    assert_eq!(server.cluster.current().generation, 2);
    assert!(
        metrics.contains("\nshardgate_map_generation 2\n"),
        "{metrics}"
    );
    server.stop().await;
}
