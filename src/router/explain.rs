//! The human explanation of a routing decision (`shardgate route`): the
//! statement kind, the tables and how they are placed, the key values found,
//! and the shards, so a user can see *why* a statement goes where it goes.

use std::fmt::Write;
use std::ops::Bound;
use std::path::Path;

use super::analyze::{Analysis, Cond, Placement, Plan, ValueExpr};
use super::cache::Router;
use super::hints::{leading_hint, Hint};
use super::route::{Param, Route};
use super::shardmap::ShardMap;
use crate::config::Config;

fn shard_name(map: &ShardMap, s: usize) -> String {
    map.shard_names
        .get(s)
        .cloned()
        .unwrap_or_else(|| format!("#{s}"))
}

fn value_text(v: &ValueExpr) -> String {
    match v {
        ValueExpr::Known(k) => k.shown(),
        ValueExpr::Untyped(s) => format!("'{s}'"),
        ValueExpr::Param { index, .. } => format!("${}", index + 1),
        ValueExpr::Null => "NULL".into(),
    }
}

fn cond_text(c: &Cond, out: &mut Vec<String>) {
    match c {
        Cond::In { leaf, values } if values.len() == 1 => {
            out.push(format!("{} = {}", leaf.column, value_text(&values[0])))
        }
        Cond::In { leaf, values } => out.push(format!(
            "{} IN ({})",
            leaf.column,
            values.iter().map(value_text).collect::<Vec<_>>().join(", ")
        )),
        Cond::ParamArray { leaf, index } => out.push(format!(
            "{} = ANY(${}) (array parameter: all shards)",
            leaf.column,
            index + 1
        )),
        Cond::Range { leaf, lower, upper } => {
            let lo = match lower {
                Bound::Included(v) => format!("{} <= ", value_text(v)),
                Bound::Excluded(v) => format!("{} < ", value_text(v)),
                Bound::Unbounded => String::new(),
            };
            let hi = match upper {
                Bound::Included(v) => format!(" <= {}", value_text(v)),
                Bound::Excluded(v) => format!(" < {}", value_text(v)),
                Bound::Unbounded => String::new(),
            };
            out.push(format!("{lo}{}{hi}", leaf.column));
        }
        Cond::And(parts) | Cond::Or(parts) => {
            for p in parts {
                cond_text(p, out);
            }
        }
        Cond::Free | Cond::All => {}
    }
}

fn plan_keys(p: &Plan, out: &mut Vec<String>) {
    match p {
        Plan::Sharded {
            cond, key_update, ..
        } => {
            cond_text(cond, out);
            if let Some((leaf, v)) = key_update {
                out.push(format!("SET {} = {}", leaf.column, value_text(v)));
            }
        }
        Plan::Insert { leaf, rows, .. } => {
            for (i, v) in rows.iter().enumerate() {
                out.push(format!(
                    "row {}: {} = {}",
                    i + 1,
                    leaf.column,
                    value_text(v)
                ));
            }
        }
        Plan::Multi(v) => v.iter().for_each(|p| plan_keys(p, out)),
        Plan::Fixed(_) => {}
    }
}

/// Explains where `sql` goes with `params` bound.
pub fn explain(router: &Router, sql: &str, params: &[Param]) -> String {
    let map = &*router.map();
    let mut s = String::new();
    let n = map.shard_count();
    if let Some(hint) = leading_hint(sql) {
        let _ = writeln!(s, "hint: {hint:?} (overrides analysis)");
    }
    let analysis: Option<std::sync::Arc<Analysis>> = match router.analyze(sql) {
        Ok(a) => Some(a),
        Err(e) if leading_hint(sql).is_none() => {
            let _ = writeln!(s, "error {}: {e}", e.sqlstate());
            return s;
        }
        Err(_) => None,
    };
    if let Some(a) = &analysis {
        let _ = writeln!(
            s,
            "statement: {}{}",
            a.kind.name(),
            if a.by_tokenizer {
                " (classified by leading keywords; the SQL parser does not support it)"
            } else {
                ""
            }
        );
        for t in &a.tables {
            let alias = t
                .alias
                .as_ref()
                .map(|a| format!(" AS {a}"))
                .unwrap_or_default();
            let placement = match &t.placement {
                Placement::Sharded { key, function } => {
                    let f = map.functions.get(*function);
                    format!(
                        "sharded by {key}, function {} ({})",
                        f.map_or("?", |f| f.name.as_str()),
                        f.map_or("?", |f| f.kind)
                    )
                }
                Placement::Replicated => "replicated".into(),
                Placement::DefaultReplicated => "not in the map: replicated (default_table)".into(),
            };
            let _ = writeln!(s, "table: {}{alias}: {placement}", t.name);
        }
        let mut keys = Vec::new();
        plan_keys(&a.plan, &mut keys);
        if !keys.is_empty() {
            let _ = writeln!(s, "key values: {}", keys.join("; "));
        }
    }
    match router.route_with_params(sql, params) {
        Ok(route) => {
            let text = match &route {
                Route::Single(x) => format!("single shard {}", shard_name(map, *x)),
                Route::Shards(set) => format!(
                    "fan-out to {} of {n} shards: {}",
                    set.len(),
                    set.iter()
                        .map(|x| shard_name(map, *x))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Route::All => format!("no key: fan-out to all {n} shards"),
                Route::Broadcast => format!("broadcast: runs on all {n} shards"),
                Route::AnyOne => {
                    "any one shard (replicated data or no tables; the proxy spreads these)".into()
                }
                Route::Split { rows_by_shard } => format!(
                    "split: rows go to different shards ({})",
                    rows_by_shard
                        .iter()
                        .map(|(sh, rows)| format!(
                            "{}: rows {}",
                            shard_name(map, *sh),
                            rows.iter()
                                .map(|r| (r + 1).to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                Route::NoShard => {
                    "no shard: session/transaction control handled by the proxy".into()
                }
            };
            let _ = writeln!(s, "route: {text}");
        }
        Err(e) => {
            let _ = writeln!(s, "error {}: {e}", e.sqlstate());
        }
    }
    if let Some(Hint::Shard(_) | Hint::Key(_)) = leading_hint(sql) {
        // Already noted above.
    }
    s
}

/// A `--param` value: text, optionally typed with a `::type` suffix
/// (`42::bigint`, `…::uuid`), like a parameter whose type the driver declared.
fn cli_param(p: &str) -> Param<'_> {
    if let Some((value, ty)) = p.rsplit_once("::") {
        if let Some(o) = super::analyze::cast_oid(&ty.to_ascii_lowercase()) {
            return Param::typed_text(value, o);
        }
    }
    Param::text(p)
}

/// `shardgate route --config FILE SQL [--param V]…`: returns the explanation,
/// or an error message; `Ok((text, routed))` where `routed` is false when the
/// statement cannot be routed (the command then exits 1).
pub fn route_command(
    config: &Path,
    sql: &str,
    params: &[String],
) -> Result<(String, bool), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let map = ShardMap::from_config(&config).map_err(|e| e.to_string())?;
    let router = Router::new(map);
    let params: Vec<Param> = params.iter().map(|p| cli_param(p)).collect();
    let ok = router.route_with_params(sql, &params).is_ok();
    Ok((explain(&router, sql, &params), ok))
}

/// The `shardgate route` subcommand: prints the explanation; exit 1 when the
/// map cannot be loaded or the statement cannot be routed.
pub fn run_route_command(config: &Path, sql: &str, params: &[String]) -> std::process::ExitCode {
    match route_command(config, sql, params) {
        Ok((text, routed)) => {
            print!("{text}");
            if routed {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
