//! `shardgate demo`: local clusters, an example sharded schema, and a shard map for them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;
use crate::devcluster::DevFleet;

/// The database the demo creates on every shard.
pub const DEMO_DATABASE: &str = "app";

/// Schema applied to every shard: `users` and `orders` are sharded (co-located
/// by user id), `countries` is replicated in full.
pub const DEMO_SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text);
CREATE TABLE orders (id bigint NOT NULL, user_id bigint NOT NULL, amount numeric(12,2) NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, id));
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO countries VALUES ('de', 'Germany'), ('fr', 'France'), ('jp', 'Japan'), ('us', 'United States');
";

/// The shard map for clusters on `ports`, in the shape of `shard-config/demo.yaml`.
pub fn demo_map(ports: &[u16]) -> String {
    let mut map = String::from(
        "# Written by `shardgate demo`; see shard-config/demo.yaml for the commented original.\n\
         listen: 127.0.0.1:6432\n\
         metrics: 127.0.0.1:9930\n\
         auth: trust\n\
         users:\n  - { name: app }\n\
         pool: { mode: transaction, size: 10 }\n\
         shards:\n",
    );
    for (i, port) in ports.iter().enumerate() {
        map.push_str(&format!(
            "  - {{ name: s{i}, url: \"postgres://postgres@127.0.0.1:{port}/{DEMO_DATABASE}\" }}\n"
        ));
    }
    map.push_str(
        "functions:\n  by_user: { kind: hash }\n\
         tables:\n  users:     { key: id, function: by_user }\n  orders:    { key: user_id, function: by_user }\n  countries: { replicated: true }\n\
         default_table: error\n\
         two_phase_commit: true\n",
    );
    map
}

/// Starts the clusters, prepares them, writes the map, runs the proxy until Ctrl-C.
pub fn run(shards: usize) -> anyhow::Result<()> {
    if shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    eprintln!("starting {shards} PostgreSQL clusters…");
    let fleet = DevFleet::start(shards, "shard").context("starting the demo clusters")?;
    for cluster in &fleet.clusters {
        cluster
            .create_database(DEMO_DATABASE)
            .with_context(|| format!("creating database {DEMO_DATABASE} on {}", cluster.name()))?;
        cluster
            .psql(DEMO_DATABASE, DEMO_SCHEMA)
            .with_context(|| format!("creating the demo schema on {}", cluster.name()))?;
    }
    let ports: Vec<u16> = fleet.clusters.iter().map(|c| c.port()).collect();
    let map_path = write_map(&demo_map(&ports))?;
    let mut config = Config::load(&map_path).context("the demo map does not validate")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async {
        let server = match crate::server::start(config.clone()).await {
            Ok(server) => server,
            Err(crate::server::ServerError::Listen { .. }) => {
                // 6432 is taken (a PgBouncer?): any free port will do for a demo.
                config.listen = "127.0.0.1:0".to_string();
                crate::server::start(config.clone()).await?
            }
            Err(error) => return Err(error.into()),
        };
        println!("shard map written to {}:\n", map_path.display());
        print!("{}", crate::check::summary(&config));
        println!("\nshards (connect directly):");
        for cluster in &fleet.clusters {
            println!("  psql -h 127.0.0.1 -p {} -U postgres {DEMO_DATABASE}", cluster.port());
        }
        println!("\nshardgate is listening on {}. Connect with:\n", server.address);
        println!("  psql -h 127.0.0.1 -p {} -U app {DEMO_DATABASE}\n", server.address.port());
        println!("Try: INSERT INTO users (id, name) VALUES (1, 'ann'), (2, 'bob');  (each row goes to its shard)");
        println!("     SELECT * FROM users WHERE id = 1;   EXPLAIN (SHARDS) SELECT count(*) FROM users;");
        println!("Press Ctrl-C to stop the proxy and delete the clusters.");
        std::io::stdout().flush().ok();
        wait_for_shutdown_async().await;
        server.shutdown(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    });
    eprintln!("stopping the clusters…");
    drop(fleet);
    let _ = std::fs::remove_file(&map_path);
    result
}

fn write_map(text: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("shardgate-demo-{}.yaml", std::process::id()));
    write_file(&path, text)?;
    Ok(path)
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown_async() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_map_validates() {
        let text = demo_map(&[5501, 5502, 5503]);
        let config = Config::parse(Path::new("demo.yaml"), &text, &|_| None)
            .unwrap_or_else(|e| panic!("demo map invalid: {e}"));
        assert_eq!(config.shards.len(), 3);
        assert_eq!(config.shards[2].port, 5503);
        assert_eq!(config.database, DEMO_DATABASE);
    }
}
