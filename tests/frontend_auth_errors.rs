//! Authentication (SCRAM with passwords and stored verifiers, md5, TLS) and
//! the errors a client gets for bad logins, a down shard and a full pool.

mod support;

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

async fn try_connect(
    port: u16,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(user).dbname(db);
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn code(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|c| c.code())
}

/// A SCRAM verifier made by a real Postgres for `password`.
async fn verifier_from_postgres(db: &str, password: &str) -> String {
    let shard = support::connect(&support::fleet().clusters[0], db).await;
    shard
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; DROP ROLE IF EXISTS verifier_{db}; CREATE ROLE verifier_{db} PASSWORD '{password}'"
        ))
        .await
        .expect("create role");
    shard
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&format!("verifier_{db}")],
        )
        .await
        .expect("read verifier")
        .get(0)
}

#[tokio::test]
async fn scram_with_password_and_stored_verifier() {
    let db = support::fresh_db("auth_scram");
    let verifier = verifier_from_postgres(&db, "s3cret-v").await;
    let extra = format!(
        "auth: scram-sha-256\nusers:\n  - {{ name: app, password: \"pw-app\" }}\n  - {{ name: stored, password: \"{verifier}\" }}\n"
    );
    let server = support::start_proxy(&support::shard_map(&db, &extra)).await;
    let port = server.address.port();

    let client = try_connect(port, "app", Some("pw-app"), &db)
        .await
        .expect("scram login");
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(one, 1);
    try_connect(port, "stored", Some("s3cret-v"), &db)
        .await
        .expect("login with a stored verifier");

    let wrong = try_connect(port, "app", Some("nope"), &db)
        .await
        .expect_err("wrong password must fail");
    assert_eq!(code(&wrong), Some("28P01"), "{wrong}");
    let wrong = try_connect(port, "stored", Some("pw-app"), &db)
        .await
        .expect_err("wrong password must fail");
    assert_eq!(code(&wrong), Some("28P01"), "{wrong}");
    // Like Postgres: an unknown user fails like a wrong password (28P01),
    // after the same exchange, so user names cannot be enumerated.
    let unknown = try_connect(port, "mallory", Some("x"), &db)
        .await
        .expect_err("unknown user must fail");
    assert_eq!(code(&unknown), Some("28P01"), "{unknown}");
    let no_db = try_connect(port, "app", Some("pw-app"), "elsewhere")
        .await
        .expect_err("unknown database must fail");
    assert_eq!(code(&no_db), Some("3D000"), "{no_db}");
    // Failed logins took no backend connection.
    server.stop().await;
}

#[tokio::test]
async fn md5_logins() {
    let db = support::fresh_db("auth_md5");
    let extra = "auth: md5\nusers:\n  - { name: app, password: \"pw-md5\" }\n  - { name: hashed, password: \"md5a0cfb6c5a8ec2e5d0b34e5d5e5a3e7d1\" }\n";
    let server = support::start_proxy(&support::shard_map(&db, extra)).await;
    let port = server.address.port();
    try_connect(port, "app", Some("pw-md5"), &db)
        .await
        .expect("md5 login");
    let wrong = try_connect(port, "app", Some("pw-md6"), &db)
        .await
        .expect_err("wrong password must fail");
    assert_eq!(code(&wrong), Some("28P01"));
    server.stop().await;
}

#[tokio::test]
async fn md5_hash_from_the_map_is_accepted() {
    let db = support::fresh_db("auth_md5_hash");
    // 'md5' || md5(password || user), as in pg_authid.
    let hash = format!("md5{:x}", md5::compute(b"hunter2hashed"));
    let extra = format!("auth: md5\nusers:\n  - {{ name: hashed, password: \"{hash}\" }}\n");
    let server = support::start_proxy(&support::shard_map(&db, &extra)).await;
    try_connect(server.address.port(), "hashed", Some("hunter2"), &db)
        .await
        .expect("md5 hash login");
    server.stop().await;
}

#[tokio::test]
async fn tls_with_the_configured_certificate() {
    let db = support::fresh_db("auth_tls");
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let extra = format!(
        "tls: {{ cert: \"{}\", key: \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let server = support::start_proxy(&support::shard_map(&db, &extra)).await;
    // psql with sslmode=require proves the TLS handshake and a query over it.
    let output = tokio::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=app dbname={db} sslmode=require",
            server.address.port()
        ))
        .args(["-XAtc", "SELECT 'over tls'"])
        .output()
        .await
        .expect("psql");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "over tls");
    let port = server.address.port();
    // Plain connections still work (TLS is offered, not required).
    try_connect(port, "app", None, &db)
        .await
        .expect("plain login");
    server.stop().await;
}

#[tokio::test]
async fn a_down_shard_is_08006_naming_it_and_the_session_survives() {
    let db = support::fresh_db("down_shard");
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut map = support::shard_map(&db, "pool: { connect_timeout: 2s }\n");
    map = map.replace("shards:\n", &format!("shards:\n  - {{ name: gone, url: \"postgres://postgres@127.0.0.1:{closed_port}/{db}\" }}\n"));
    // `gone` is now shard 0; route explicitly to keep s0.. reachable.
    let server = support::start_proxy(&map).await;
    let client = try_connect(server.address.port(), "app", None, &db)
        .await
        .expect("login works while one shard is down");
    let started = Instant::now();
    let error = client
        .simple_query("/* shardgate: shard=gone */ SELECT 1")
        .await
        .expect_err("down shard");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code(&error), Some("08006"), "{error}");
    let text = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(text.contains("gone"), "the error names the shard: {text}");
    let rows = client
        .simple_query("/* shardgate: shard=s1 */ SELECT 2")
        .await
        .expect("other shard works");
    assert!(!rows.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_53300_after_checkout_timeout() {
    let db = support::fresh_db("full_pool");
    let map = support::shard_map(&db, "pool: { size: 1, checkout_timeout: 300ms }\n");
    let server = support::start_proxy(&map).await;
    let holder = support::connect_proxy(&server, "app", None).await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("hold the only connection");
    let waiter = support::connect_proxy(&server, "app", None).await;
    let started = Instant::now();
    let error = waiter
        .simple_query("SELECT 1")
        .await
        .expect_err("pool is full");
    let waited = started.elapsed();
    assert_eq!(code(&error), Some("53300"), "{error}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    let text = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(text.contains("s0"), "names the shard: {text}");
    holder.batch_execute("COMMIT").await.expect("commit");
    // Once the connection is free the waiter proceeds.
    waiter
        .simple_query("SELECT 1")
        .await
        .expect("after release");
    server.stop().await;
}
