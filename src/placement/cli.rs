//! `shardgate check --shards` and `shardgate placement accept`.

use std::collections::HashMap;

use super::{accept, actor, assess, expected, read_all, render, PlacementError};
use crate::config::Config;
use crate::router::catalog;
use crate::router::ShardMap;
use crate::sharding::KeyType;

/// Key column types from the first shard whose catalog answers (empty when
/// none does: hash placements are then compared without the type).
pub async fn key_types(config: &Config) -> HashMap<String, KeyType> {
    let Ok(map) = ShardMap::from_config(config) else {
        return HashMap::new();
    };
    for shard in &config.shards {
        if let Ok(facts) = catalog::load(shard, &map, config.pool.connect_timeout).await {
            return facts.key_types;
        }
    }
    HashMap::new()
}

/// The text of `check --shards` and whether every table is routed.
pub async fn check_shards(config: &Config) -> (String, bool) {
    let types = key_types(config).await;
    let expected = expected(config, &types);
    let tables: Vec<String> = expected.keys().cloned().collect();
    let reads = read_all(config, &tables).await;
    let reports = assess(config, &expected, &reads);
    let mut out = String::new();
    let ok = render(&reports, &mut out) && reads.iter().all(Result::is_ok);
    (out, ok)
}

/// `placement accept --table T`: records the map's placement of T on every
/// shard and returns the report to print.
pub async fn accept_table(config: &Config, table: &str) -> Result<String, PlacementError> {
    let types = key_types(config).await;
    let set_by = actor("shardgate placement accept");
    let done = accept(config, &types, table, &set_by).await?;
    tracing::info!(
        table = %done.written.table,
        version = done.written.version,
        set_by = %set_by,
        "placement accepted: {}",
        done.written.placement.describe()
    );
    let mut out = String::new();
    for (shard, old) in &done.overwritten {
        match old {
            Some(old) => out.push_str(&format!(
                "{shard}: overwrote version {} (set {} by {}): {}\n",
                old.version,
                old.set_at,
                old.set_by,
                old.placement.describe()
            )),
            None => out.push_str(&format!("{shard}: had no record\n")),
        }
    }
    out.push_str(&format!(
        "table \"{}\": placement version {} recorded on every shard by {set_by}: {}\n",
        done.written.table,
        done.written.version,
        done.written.placement.describe()
    ));
    out.push_str(
        "proxies still running with another map for it stop routing it at their next catalog \
         read (catalog_refresh); proxies with this map that refused it resume within a second\n",
    );
    Ok(out)
}
