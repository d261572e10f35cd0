//! The one way the control plane (2PC recovery, catalog reads, placement
//! records, the migrator) opens a `tokio_postgres` client to a shard.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::ShardConfig;

/// `application_name` of 2PC coordinators and recovery (and placement writes).
pub const TWO_PHASE_APPLICATION: &str = "shardgate-2pc";
/// `application_name` of catalog reads.
pub const CATALOG_APPLICATION: &str = "shardgate-catalog";
/// `application_name` of `shardgate migrate`.
pub const MIGRATE_APPLICATION: &str = "shardgate-migrate";

/// One shared connect so shard address, credentials and `connect_timeout` are applied identically by every control-plane caller.
pub async fn connect_control(
    shard: &ShardConfig,
    application_name: &str,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&shard.host)
        .port(shard.port)
        .user(&shard.user)
        .dbname(&shard.database)
        .application_name(application_name)
        .connect_timeout(timeout);
    if let Some(password) = &shard.password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // A broken connection surfaces as errors on the client side.
        let _ = connection.await;
    });
    Ok(client)
}
