//! Signals an operator sends to `shardgate serve`.

mod support;

use support::process::ChildProxy;

async fn login(port: u16, db: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let url = format!("host=127.0.0.1 port={port} user=app password={password} dbname={db}");
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Err(error) => Err(error
            .as_db_error()
            .map_or_else(|| error.to_string(), |e| e.code().code().to_string())),
    }
}

/// SIGHUP (`systemctl reload`) used to end the process — the default
/// action — and drop every client. Now it re-reads the map: a changed
/// password applies to new logins while connected clients go on; an
/// invalid file is reported with its line and the running map stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_map_and_keeps_every_client() {
    let db = support::fresh_db("signals_sighup");
    let map = |password: &str| {
        support::shard_map(
            &db,
            &format!("auth: scram-sha-256\nusers: [ {{ name: app, password: {password} }} ]\n"),
        )
    };
    let proxy = ChildProxy::start(&map("first")).await;
    let before = login(proxy.port, &db, "first").await.expect("login");
    before.simple_query("SELECT 1").await.expect("query");

    proxy.rewrite_map(&map("second"));
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("shard map reloaded").await;
    let reloads = "shardgate_config_reloads_total{result=\"success\"}";
    assert_eq!(proxy.metric(reloads).await, 1.0);
    before
        .simple_query("SELECT 2")
        .await
        .expect("the connected client goes on");
    assert_eq!(
        login(proxy.port, &db, "first").await.err().as_deref(),
        Some("28P01"),
        "the old password no longer logs in"
    );
    login(proxy.port, &db, "second")
        .await
        .expect("the new password logs in");

    proxy.rewrite_map("listen: [unclosed\n");
    proxy.signal(libc::SIGHUP);
    let log = proxy.wait_for_log("shard map reload failed").await;
    assert!(
        log.contains("map.yaml:2:1: YAML syntax error"),
        "file, line and what is wrong:\n{log}"
    );
    let failures = "shardgate_config_reloads_total{result=\"failure\"}";
    assert_eq!(proxy.metric(failures).await, 1.0);
    before.simple_query("SELECT 3").await.expect("still served");
    login(proxy.port, &db, "second")
        .await
        .expect("the running map stays in force");
    assert!(proxy.log_text().lines().all(|l| !l.contains("panicked")));
}

/// SIGTERM used to end the process in ~5 ms with a bare EOF for every
/// client. Now a connected client is told why (Postgres' own FATAL 57P01)
/// and the process exits once its clients are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_why_and_exits() {
    use support::wire::Wire;
    let db = support::fresh_db("signals_sigterm");
    let mut proxy = ChildProxy::start(&support::shard_map(&db, "")).await;
    let mut client = Wire::connect(proxy.port, "app", &db).await;
    proxy.signal(libc::SIGTERM);
    let message = told_why_then_exits(&mut proxy, &mut client).await;
    assert!(
        message.normalized().contains("FATAL"),
        "{}",
        message.normalized()
    );
    assert!(
        proxy.log_text().contains("shutting down"),
        "{}",
        proxy.log_text()
    );
}

/// The admin console's SHUTDOWN stops the process as SIGTERM does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shutdown_stops_like_sigterm() {
    use support::wire::Wire;
    let db = support::fresh_db("signals_console_shutdown");
    let map = support::shard_map(
        &db,
        "auth: trust\nusers: [ { name: app }, { name: ops } ]\nadmin: { users: [ ops ] }\n",
    );
    let mut proxy = ChildProxy::start(&map).await;
    let mut client = Wire::connect(proxy.port, "app", &db).await;
    let url = format!(
        "host=127.0.0.1 port={} user=ops dbname=shardgate",
        proxy.port
    );
    let (ops, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("console");
    tokio::spawn(connection);
    ops.simple_query("SHUTDOWN").await.expect("SHUTDOWN");
    told_why_then_exits(&mut proxy, &mut client).await;
    assert!(proxy.log_text().contains("SHUTDOWN from the admin console"));
}

/// The connected `client` is told why within 2 s (57P01, returned for more
/// checks), and the process then exits with status 0 within 5 s.
async fn told_why_then_exits(
    proxy: &mut ChildProxy,
    client: &mut support::wire::Wire,
) -> support::wire::Msg {
    let message = tokio::time::timeout(std::time::Duration::from_secs(2), client.recv())
        .await
        .expect("told within 2 s")
        .expect("a message before EOF");
    assert_eq!(
        message.error_code().as_deref(),
        Some("57P01"),
        "{}",
        message.normalized()
    );
    let status = proxy.wait_exit(std::time::Duration::from_secs(5)).await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        proxy.log_text()
    );
    message
}
