//! `shardgate check`: a one-screen summary of a valid shard map.

use std::fmt::Write;

use crate::config::{AuthMethod, Config, FunctionKind, PoolMode, TablePlacement, TenantMode};

/// Renders what the proxy will do with this map, for a human to confirm.
pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", config.source.display());
    let auth = match config.auth {
        AuthMethod::ScramSha256 => "scram-sha-256",
        AuthMethod::Md5 => "md5",
        AuthMethod::Trust => "trust",
    };
    let mode = match config.pool.mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    };
    let _ = writeln!(
        out,
        "listen {}  database {}  auth {}  users {}  tls {}  metrics {}",
        config.listen,
        config.database,
        auth,
        config.users.len(),
        if config.tls.is_some() { "on" } else { "off" },
        config.metrics.as_deref().unwrap_or("off")
    );
    let _ = writeln!(
        out,
        "pool {} mode, {} per shard, connect {:?}, checkout {:?}; two-phase commit {}",
        mode,
        config.pool.size,
        config.pool.connect_timeout,
        config.pool.checkout_timeout,
        if config.two_phase_commit { "on" } else { "off" }
    );
    let _ = writeln!(out, "shards ({}):", config.shards.len());
    for shard in &config.shards {
        let _ = writeln!(
            out,
            "  {:<12} {}@{}:{}/{}",
            shard.name, shard.user, shard.host, shard.port, shard.database
        );
    }
    let _ = writeln!(out, "functions ({}):", config.functions.len());
    for function in &config.functions {
        let _ = writeln!(
            out,
            "  {:<12} {}",
            function.name,
            describe_function(config, &function.kind)
        );
    }
    let _ = writeln!(out, "tables ({}):", config.tables.len());
    for table in &config.tables {
        let placement = match &table.placement {
            TablePlacement::Replicated => "replicated on every shard".to_string(),
            TablePlacement::Sharded { key, function } => {
                format!("sharded by {key} using {function}")
            }
        };
        let _ = writeln!(out, "  {:<12} {}", table.name, placement);
    }
    let default = match config.default_table {
        crate::config::DefaultTable::Replicated => "replicated",
        crate::config::DefaultTable::Error => "refused with an error",
    };
    let _ = writeln!(out, "tables not named above: {default}");
    let _ = match &config.other_databases {
        None => writeln!(
            out,
            "other database names: refused (3D000); clients connect to {}",
            config.database
        ),
        Some(other) => {
            let server = config
                .shards
                .get(other.shard)
                .map(|s| format!("{} ({}@{}:{})", s.name, s.user, s.host, s.port))
                .unwrap_or_else(|| "?".to_string());
            let linger = if other.idle_timeout.is_zero() {
                "closed when its last client leaves".to_string()
            } else {
                format!("kept {:?} after its last client", other.idle_timeout)
            };
            writeln!(
                out,
                "other database names: plain pooler on the server of shard {server}, \
                 up to {} at once, each pool {linger}",
                other.max_databases
            )
        }
    };
    out
}

fn describe_function(config: &Config, kind: &FunctionKind) -> String {
    let shard = |i: &usize| {
        config
            .shards
            .get(*i)
            .map(|s| s.name.as_str())
            .unwrap_or("?")
    };
    match kind {
        FunctionKind::Hash => format!(
            "hash (PARTITION BY HASH compatible, modulus {})",
            config.shards.len()
        ),
        FunctionKind::Modulo => format!("modulo {}", config.shards.len()),
        FunctionKind::ConsistentHash { vnodes } => {
            format!("consistent_hash, {vnodes} vnodes per shard")
        }
        FunctionKind::Range { key_type, ranges } => {
            let parts: Vec<String> = ranges
                .iter()
                .map(|r| {
                    let from = r
                        .from
                        .as_ref()
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-inf".into());
                    let to =
                        r.to.as_ref()
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "+inf".into());
                    format!("[{from}, {to})→{}", shard(&r.shard))
                })
                .collect();
            format!("range over {}: {}", key_type.name(), parts.join(" "))
        }
        FunctionKind::List {
            key_type,
            values,
            default,
        } => {
            let parts: Vec<String> = values
                .iter()
                .map(|(v, s)| format!("{v}→{}", shard(s)))
                .collect();
            let default = default
                .as_ref()
                .map(|d| format!(", default {}", shard(d)))
                .unwrap_or_default();
            format!(
                "list over {}: {}{default}",
                key_type.name(),
                parts.join(" ")
            )
        }
        FunctionKind::Tenant {
            mode,
            tenants,
            default,
            schema_template,
        } => {
            let mode = match mode {
                TenantMode::Database => "database per tenant".to_string(),
                TenantMode::Schema => format!("schema per tenant ({schema_template})"),
            };
            let default = default
                .as_ref()
                .map(|d| format!(", default {}", shard(d)))
                .unwrap_or_default();
            format!("tenant, {mode}, {} tenants{default}", tenants.len())
        }
    }
}
