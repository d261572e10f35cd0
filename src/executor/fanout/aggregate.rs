//! Aggregation across shards. Shards compute partial aggregates per group
//! (count, sum, min, max, …; avg as sum + count; DISTINCT arguments pushed
//! down as a group column); the merged groups then go through a final
//! statement evaluated by Postgres itself on one target connection, so the
//! select list, HAVING, ORDER BY, DISTINCT and LIMIT over aggregates get
//! Postgres' exact semantics and result types (avg's numeric scale, integer
//! division, round(), …), in the client's result formats.
//!
//! The merged partial rows travel as text arrays (`unnest($n::text[])`, one
//! array per column, cast back to the shard column's type), so the final
//! statement is one round trip whatever the number of groups.

use bytes::{BufMut, Bytes, BytesMut};

use super::engine::{gather, ClientSink, Memory, Output};
use super::merge::{Collect, SelectMerge, Window};
use super::plan::{final_sql, refuse, AggPlan, Combine, DistinctKind, SelectPlan};
use super::value::oid;
use super::wire::{Field, OutParam};
use super::{FanoutExecutor, FanoutOutcome, Request, ShardConn};
use crate::protocol::synth::{self, ProxyError};

/// `text[]`.
const TEXT_ARRAY: u32 = 1009;

/// The SQL name of a type for a cast from text, for the types partial
/// aggregates and group keys commonly have.
fn cast_name(type_oid: u32) -> Option<&'static str> {
    Some(match type_oid {
        oid::BOOL => "pg_catalog.bool",
        oid::BYTEA => "pg_catalog.bytea",
        oid::CHAR => "pg_catalog.\"char\"",
        oid::NAME => "pg_catalog.name",
        oid::INT8 => "pg_catalog.int8",
        oid::INT2 => "pg_catalog.int2",
        oid::INT4 => "pg_catalog.int4",
        oid::TEXT => "pg_catalog.text",
        oid::OID => "pg_catalog.oid",
        114 => "pg_catalog.json",
        oid::FLOAT4 => "pg_catalog.float4",
        oid::FLOAT8 => "pg_catalog.float8",
        790 => "pg_catalog.money",
        869 => "pg_catalog.inet",
        650 => "pg_catalog.cidr",
        829 => "pg_catalog.macaddr",
        oid::BPCHAR => "pg_catalog.bpchar",
        oid::VARCHAR => "pg_catalog.varchar",
        oid::DATE => "pg_catalog.date",
        oid::TIME => "pg_catalog.time",
        oid::TIMESTAMP => "pg_catalog.timestamp",
        oid::TIMESTAMPTZ => "pg_catalog.timestamptz",
        1186 => "pg_catalog.interval",
        1266 => "pg_catalog.timetz",
        oid::NUMERIC => "pg_catalog.numeric",
        oid::UUID => "pg_catalog.uuid",
        3802 => "pg_catalog.jsonb",
        1000 => "pg_catalog.bool[]",
        1005 => "pg_catalog.int2[]",
        1007 => "pg_catalog.int4[]",
        1016 => "pg_catalog.int8[]",
        1009 => "pg_catalog.text[]",
        1015 => "pg_catalog.varchar[]",
        1021 => "pg_catalog.float4[]",
        1022 => "pg_catalog.float8[]",
        1231 => "pg_catalog.numeric[]",
        2951 => "pg_catalog.uuid[]",
        _ => return None,
    })
}

/// The combine expression of one aggregate, given the partial column types.
fn combine_sql(c: &Combine, partials: &[&Field]) -> Result<String, ProxyError> {
    let ty = |i: usize| partials.get(i).map(|f| f.type_oid).unwrap_or(0);
    Ok(match c {
        Combine::Count(i) => format!("coalesce(sum(m.a{i}), 0)::pg_catalog.int8"),
        Combine::Sum(i) => {
            let name = cast_name(ty(*i)).ok_or_else(|| unsupported_type(partials, *i))?;
            format!("sum(m.a{i})::{name}")
        }
        Combine::Same(f, i) => format!("{f}(m.a{i})"),
        Combine::Avg { sum, count } => match ty(*sum) {
            oid::INT8 | oid::NUMERIC => {
                format!("sum(m.a{sum}) / nullif(sum(m.a{count}), 0)::pg_catalog.numeric")
            }
            oid::FLOAT8 | 1186 => {
                format!("sum(m.a{sum}) / nullif(sum(m.a{count}), 0)::pg_catalog.float8")
            }
            oid::FLOAT4 => {
                return Err(refuse(
                    "avg() of a real column cannot be merged exactly across shards (Postgres accumulates real in double precision)",
                    "write avg(x::double precision)",
                ))
            }
            _ => return Err(unsupported_type(partials, *sum)),
        },
        Combine::StringAgg { col, sep } => format!("string_agg(m.a{col}, {sep})"),
        Combine::OverDistinct(e) => e.to_string(),
    })
}

fn unsupported_type(fields: &[&Field], i: usize) -> ProxyError {
    let t = fields.get(i).map_or(0, |f| f.type_oid);
    refuse(
        format!("aggregating values of type oid {t} across shards is not supported"),
        "cast the value to a number, text or date/time type",
    )
}

/// A one-dimensional `text[]` in binary format.
fn text_array(values: &[Option<&[u8]>]) -> Bytes {
    let mut b = BytesMut::new();
    if values.is_empty() {
        b.put_i32(0);
        b.put_i32(0);
        b.put_u32(oid::TEXT);
        return b.freeze();
    }
    b.put_i32(1);
    b.put_i32(i32::from(values.iter().any(|v| v.is_none())));
    b.put_u32(oid::TEXT);
    b.put_i32(values.len() as i32);
    b.put_i32(1);
    for v in values {
        match v {
            None => b.put_i32(-1),
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
        }
    }
    b.freeze()
}

pub(crate) async fn run<W: ClientSink>(
    ex: &FanoutExecutor,
    req: &Request<'_>,
    plan: &AggPlan,
    targets: &mut [ShardConn<'_>],
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<FanoutOutcome, ProxyError> {
    if targets.is_empty() {
        return Err(ProxyError::error("XX000", "fan-out without targets"));
    }
    // 1. Partial aggregates, in text format.
    let mut batch = BytesMut::new();
    super::wire::extended_batch(
        &mut batch,
        &plan.shard_sql,
        &req.masked_params(&plan.shard_params),
        &[],
    );
    let batches: Vec<_> = targets.iter().map(|_| Some(batch.clone())).collect();
    let mut collect = Collect::new(targets.len(), ex.max_merge_memory());
    gather(ex, targets, &batches, &mut collect, output, memory).await?;
    let fields = collect.fields.clone().unwrap_or_default();
    let keys = plan.groups + usize::from(plan.distinct_col);
    if fields.len() != keys + plan.partials {
        return Err(ProxyError::error(
            "XX000",
            "shards returned an unexpected number of partial aggregate columns",
        ));
    }
    // 2. The final statement over the merged partial rows.
    let partial_fields: Vec<&Field> = fields[keys..].iter().collect();
    let combines = plan
        .combines
        .iter()
        .map(|c| combine_sql(c, &partial_fields))
        .collect::<Result<Vec<_>, _>>()?;
    let nparams = req.params.values.len();
    let mut columns = Vec::new();
    let mut unnest = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        let ty = cast_name(f.type_oid).ok_or_else(|| {
            refuse(
                format!(
                    "grouping or aggregating values of type oid {} across shards is not supported",
                    f.type_oid
                ),
                "cast the expression to a number, text or date/time type",
            )
        })?;
        let name = if i < plan.groups {
            format!("g{i}")
        } else if i < keys {
            "d0".to_string()
        } else {
            format!("a{}", i - keys)
        };
        columns.push(format!("u.c{i}::{ty} AS {name}"));
        unnest.push(format!("${}::pg_catalog.text[]", nparams + 1 + i));
    }
    let names: Vec<String> = (0..fields.len()).map(|i| format!("c{i}")).collect();
    let from_sql = format!(
        "SELECT {} FROM unnest({}) AS u({})",
        columns.join(", "),
        unnest.join(", "),
        names.join(", ")
    );
    let sql = final_sql(plan, &combines, &from_sql)?;
    let mut params = req.masked_params(&plan.final_params);
    let all_rows: Vec<&super::wire::Row> = collect.rows.iter().flatten().collect();
    for i in 0..fields.len() {
        let cells: Vec<Option<&[u8]>> = all_rows.iter().map(|r| r.cell(i)).collect();
        params.push(OutParam {
            type_oid: TEXT_ARRAY,
            format: 1,
            value: Some(text_array(&cells)),
        });
    }
    if params.len() > u16::MAX as usize {
        return Err(refuse(
            "too many parameters and columns",
            "simplify the query",
        ));
    }
    let mut final_batch = BytesMut::new();
    super::wire::extended_batch(&mut final_batch, &sql, &params, &req.params.result_formats);
    drop(all_rows);
    drop(collect);
    let pass = SelectPlan {
        shard_sql: sql,
        hidden: 0,
        sort: Vec::new(),
        distinct: DistinctKind::None,
        limit: None,
        offset: None,
    };
    let origins = plan
        .output_groups()
        .into_iter()
        .map(|g| {
            g.and_then(|g| fields.get(g))
                .map(|f| (f.table_oid, f.attnum))
        })
        .collect();
    let mut merge = SelectMerge::new(
        &pass,
        req.emit_header(),
        true,
        Window::default(),
        ex.max_merge_memory(),
    )
    .with_origins(origins);
    let first = &mut targets[..1];
    gather(ex, first, &[Some(final_batch)], &mut merge, output, memory).await?;
    let rows = merge.rows();
    let tag = format!("SELECT {rows}");
    synth::command_complete(output.out, &tag);
    Ok(FanoutOutcome {
        statuses: targets
            .iter()
            .map(|t| t.conn.transaction_status())
            .collect(),
        wrote: vec![false; targets.len()],
        rows,
        tag,
    })
}
