//! A multi-row INSERT whose VALUES rows belong to different shards (the
//! router's `Split` route): each shard gets an INSERT with only its rows,
//! rewritten in the AST (parameters renumbered, only the referenced ones
//! sent); RETURNING rows come back in the original VALUES order and the tag
//! is `INSERT 0 <sum>`.

use std::collections::{BTreeMap, HashMap};

use sqlparser::ast::{self, SetExpr, Statement};

use super::engine::{gather, ClientSink, Memory, Output};
use super::merge::Collect;
use super::plan::{referenced_params, renumber_params};
use super::wire::{encode_row_description, OutParam};
use super::{sum_tags, tag_count, FanoutExecutor, FanoutOutcome, Request, ShardConn};
use crate::protocol::synth::{self, ProxyError};

pub(crate) async fn run<W: ClientSink>(
    ex: &FanoutExecutor,
    req: &Request<'_>,
    insert: &ast::Insert,
    rows_by_shard: &BTreeMap<usize, Vec<usize>>,
    targets: &mut [ShardConn<'_>],
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<FanoutOutcome, ProxyError> {
    let values = match insert.source.as_ref().map(|q| q.body.as_ref()) {
        Some(SetExpr::Values(v)) => v,
        _ => {
            return Err(ProxyError::error(
                "XX000",
                "a Split route needs an INSERT … VALUES statement",
            ))
        }
    };
    let all_params = req.out_params();
    let mut batches = Vec::with_capacity(targets.len());
    for t in targets.iter() {
        let Some(rows) = rows_by_shard.get(&t.shard) else {
            batches.push(None);
            continue;
        };
        let mut part = insert.clone();
        if let Some(q) = part.source.as_mut() {
            if let SetExpr::Values(v) = q.body.as_mut() {
                v.rows = rows
                    .iter()
                    .map(|r| {
                        values.rows.get(*r).cloned().ok_or_else(|| {
                            ProxyError::error(
                                "XX000",
                                format!("Split route names VALUES row {r}, which does not exist"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
        }
        let mut statement = Statement::Insert(part);
        let mut used = referenced_params(&statement);
        used.sort_unstable();
        let map: HashMap<usize, usize> = used
            .iter()
            .enumerate()
            .map(|(i, old)| (*old, i + 1))
            .collect();
        renumber_params(&mut statement, &map);
        let sql = statement.to_string();
        let mut b = bytes::BytesMut::new();
        if req.extended {
            let params: Vec<OutParam> = used
                .iter()
                .map(|old| {
                    all_params.get(old - 1).cloned().ok_or_else(|| {
                        ProxyError::error(
                            "08P01",
                            format!("bind message supplies no value for parameter ${old}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            super::wire::extended_batch(&mut b, &sql, &params, &req.params.result_formats);
        } else {
            synth::query(&mut b, &sql);
        }
        batches.push(Some(b));
    }
    if rows_by_shard
        .keys()
        .any(|s| !targets.iter().any(|t| t.shard == *s))
    {
        return Err(ProxyError::error(
            "XX000",
            "Split route names a shard that is not among the targets",
        ));
    }
    let mut collect = Collect::new(targets.len(), ex.max_merge_memory());
    let g = gather(ex, targets, &batches, &mut collect, output, memory).await?;
    if collect.fields.is_none() && req.extended && req.describe {
        // Described portal of a statement without rows, as from Postgres.
        output
            .out
            .extend_from_slice(&[crate::protocol::tag::NO_DATA, 0, 0, 0, 4]);
    }
    // RETURNING rows in VALUES order: row r is the next row of its shard.
    if let Some(fields) = &collect.fields {
        if req.emit_header() {
            encode_row_description(output.out, fields);
        }
        let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
        for (shard, rows) in rows_by_shard {
            for r in rows {
                owner.insert(*r, *shard);
            }
        }
        let exact = targets.iter().enumerate().all(|(pos, t)| {
            collect.rows[pos].len() == rows_by_shard.get(&t.shard).map_or(0, |v| v.len())
        });
        let mut next = vec![0usize; targets.len()];
        if exact {
            for shard in owner.values() {
                if let Some(pos) = targets.iter().position(|t| t.shard == *shard) {
                    if let Some(row) = collect.rows[pos].get(next[pos]) {
                        row.encode(output.out, usize::MAX);
                    }
                    next[pos] += 1;
                }
            }
        } else {
            // ON CONFLICT DO NOTHING skipped rows: the original order is not recoverable.
            for row in collect.rows.iter().flatten() {
                row.encode(output.out, usize::MAX);
            }
        }
        output.flush_if_full().await;
    }
    let tag = sum_tags(&g.tags);
    let rows = tag_count(&tag).1.unwrap_or(0);
    synth::command_complete(output.out, &tag);
    let wrote = g
        .tags
        .iter()
        .map(|t| t.iter().any(|t| tag_count(t).1.unwrap_or(1) > 0))
        .collect();
    Ok(FanoutOutcome {
        statuses: g.statuses,
        wrote,
        rows,
        tag,
    })
}
