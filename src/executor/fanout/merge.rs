//! Merge primitives, each small and composable: [`Sorter`] (k-way order by
//! typed keys), [`Dedup`] (DISTINCT / DISTINCT ON), [`Window`] (OFFSET /
//! LIMIT), [`Project`] (strip hidden columns); [`SelectMerge`] chains them.
//! [`Collect`] keeps rows for a later stage (re-aggregation, Split INSERT
//! RETURNING order) and [`Pass`] concatenates writes' RETURNING rows.

use std::cmp::Ordering;
use std::collections::HashSet;

use bytes::BytesMut;

use super::engine::{Entry, Merge};
use super::plan::{Col, DistinctKind, SelectPlan, SortKey};
use super::value::{self, Key};
use super::wire::{encode_row_description, Field, Row};
use crate::protocol::synth::ProxyError;

/// Resolved sort key: column index, type, format, direction.
#[derive(Debug, Clone)]
struct ResolvedKey {
    idx: usize,
    type_oid: u32,
    binary: bool,
    desc: bool,
    nulls_first: bool,
}

/// k-way merge order over every ORDER BY key.
#[derive(Debug, Default)]
pub struct Sorter {
    keys: Vec<ResolvedKey>,
}

fn col_index(col: Col, visible: usize) -> usize {
    match col {
        Col::Output(i) => i,
        Col::Hidden(j) => visible + j,
    }
}

impl Sorter {
    /// Checks every key's type can be merged exactly (text only under a
    /// bytewise collation or `COLLATE "C"`).
    fn resolve(
        keys: &[SortKey],
        fields: &[Field],
        visible: usize,
        bytewise: bool,
    ) -> Result<Sorter, ProxyError> {
        let mut out = Vec::new();
        for k in keys {
            let idx = col_index(k.col, visible);
            let Some(f) = fields.get(idx) else {
                return Err(ProxyError::error(
                    "42P10",
                    format!("ORDER BY position {} is not in select list", idx + 1),
                ));
            };
            match value::sortable(f.type_oid) {
                None => {
                    return Err(super::plan::refuse(
                        format!(
                            "ORDER BY on column \"{}\" (type oid {}) cannot be merged across shards",
                            f.name, f.type_oid
                        ),
                        "order by a column of a number, text, bool, date/time, uuid or bytea type, or cast the key (e.g. ::text COLLATE \"C\")",
                    ))
                }
                Some(true) if !bytewise && !k.collate_c => {
                    return Err(super::plan::refuse(
                        format!(
                            "ORDER BY on text column \"{}\" cannot be merged across shards: the database collation is not C/POSIX, so shards sort text linguistically",
                            f.name
                        ),
                        "write ORDER BY … COLLATE \"C\" (bytewise order), or create the database with LC_COLLATE C",
                    ))
                }
                _ => {}
            }
            out.push(ResolvedKey {
                idx,
                type_oid: f.type_oid,
                binary: f.format == 1,
                desc: k.desc,
                nulls_first: k.nulls_first,
            });
        }
        Ok(Sorter { keys: out })
    }

    fn keys_of(&self, row: &Row) -> Result<Vec<Option<Key>>, ProxyError> {
        self.keys
            .iter()
            .map(|k| match row.cell(k.idx) {
                None => Ok(None),
                Some(v) => value::decode(k.type_oid, k.binary, v)
                    .map(Some)
                    .ok_or_else(|| {
                        ProxyError::error(
                            "22P02",
                            format!(
                                "cannot read a sort key of type oid {} from a shard",
                                k.type_oid
                            ),
                        )
                    }),
            })
            .collect()
    }

    fn cmp(&self, a: &[Option<Key>], b: &[Option<Key>]) -> Ordering {
        for (k, (x, y)) in self.keys.iter().zip(a.iter().zip(b.iter())) {
            let o = match (x, y) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => {
                    if k.nulls_first {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    }
                }
                (Some(_), None) => {
                    if k.nulls_first {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    }
                }
                (Some(x), Some(y)) => {
                    let o = value::compare(x, y);
                    if k.desc {
                        o.reverse()
                    } else {
                        o
                    }
                }
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }
}

/// DISTINCT over the visible columns, or DISTINCT ON over some columns.
/// ON with a sorted input keeps only the previous key (O(1) memory);
/// otherwise a set of canonical keys (O(distinct rows), counted).
#[derive(Debug)]
pub struct Dedup {
    cols: Vec<(usize, u32, bool)>,
    adjacent: bool,
    last: Option<Vec<u8>>,
    seen: HashSet<Vec<u8>>,
    pub held: usize,
}

impl Dedup {
    fn key(&self, row: &Row) -> Vec<u8> {
        let mut k = Vec::new();
        for (idx, oid, binary) in &self.cols {
            match row.cell(*idx) {
                None => k.push(0),
                Some(v) => {
                    k.push(1);
                    let c = value::canonical(*oid, *binary, v);
                    k.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    k.extend_from_slice(&c);
                }
            }
        }
        k
    }

    /// True when the row is new.
    fn admit(&mut self, row: &Row) -> bool {
        let k = self.key(row);
        if self.adjacent {
            if self.last.as_ref() == Some(&k) {
                return false;
            }
            self.last = Some(k);
            true
        } else {
            let n = k.len() + 48;
            if self.seen.insert(k) {
                self.held += n;
                true
            } else {
                false
            }
        }
    }
}

/// OFFSET then LIMIT.
#[derive(Debug, Default)]
pub struct Window {
    pub offset: u64,
    pub limit: Option<u64>,
    pub skipped: u64,
    pub emitted: u64,
}

impl Window {
    /// (emit this row, want more rows)
    fn admit(&mut self) -> (bool, bool) {
        if self.limit == Some(0) {
            return (false, false);
        }
        if self.skipped < self.offset {
            self.skipped += 1;
            return (false, true);
        }
        self.emitted += 1;
        (true, self.limit.is_none_or(|l| self.emitted < l))
    }
}

/// Keeps the first `visible` columns.
#[derive(Debug, Default)]
pub struct Project {
    pub visible: usize,
}

/// A merged SELECT: Sorter → Dedup → Window → Project.
pub struct SelectMerge<'p> {
    plan: &'p SelectPlan,
    emit_header: bool,
    bytewise: bool,
    sorter: Sorter,
    dedup: Option<Dedup>,
    pub window: Window,
    project: Project,
    mem_limit: u64,
    /// Table OID and column number to report for output columns the
    /// statement run on the shard cannot know (a merged aggregate's
    /// grouping columns, selected from `unnest`).
    origins: Vec<Option<(u32, i16)>>,
}

impl<'p> SelectMerge<'p> {
    /// Reports these (table OID, column number) pairs in the RowDescription.
    pub fn with_origins(mut self, origins: Vec<Option<(u32, i16)>>) -> Self {
        self.origins = origins;
        self
    }

    pub fn new(
        plan: &'p SelectPlan,
        emit_header: bool,
        bytewise: bool,
        window: Window,
        mem_limit: u64,
    ) -> Self {
        SelectMerge {
            plan,
            emit_header,
            bytewise,
            sorter: Sorter::default(),
            dedup: None,
            window,
            project: Project::default(),
            origins: Vec::new(),
            mem_limit,
        }
    }

    pub fn rows(&self) -> u64 {
        self.window.emitted
    }
}

impl Merge for SelectMerge<'_> {
    fn ordered(&self) -> bool {
        !self.plan.sort.is_empty()
    }

    fn client_columns<'f>(&self, fields: &'f [Field]) -> &'f [Field] {
        &fields[..fields.len().saturating_sub(self.plan.hidden)]
    }

    fn header(&mut self, fields: Option<&[Field]>, out: &mut BytesMut) -> Result<(), ProxyError> {
        let Some(fields) = fields else {
            return Ok(());
        };
        let visible = fields.len().saturating_sub(self.plan.hidden);
        self.project.visible = visible;
        self.sorter = Sorter::resolve(&self.plan.sort, fields, visible, self.bytewise)?;
        let typed = |i: usize| -> (usize, u32, bool) {
            fields
                .get(i)
                .map_or((i, 0, false), |f| (i, f.type_oid, f.format == 1))
        };
        self.dedup = match &self.plan.distinct {
            DistinctKind::None => None,
            DistinctKind::All => Some(Dedup {
                cols: (0..visible).map(typed).collect(),
                adjacent: false,
                last: None,
                seen: HashSet::new(),
                held: 0,
            }),
            DistinctKind::On(cols) => {
                let idx: Vec<usize> = cols.iter().map(|c| col_index(*c, visible)).collect();
                if idx.iter().any(|i| *i >= fields.len()) {
                    return Err(ProxyError::error(
                        "42P10",
                        "DISTINCT ON column out of range",
                    ));
                }
                // Sorted by the ON keys first (Postgres requires it when
                // ORDER BY is present): equal keys are adjacent.
                let adjacent = !self.plan.sort.is_empty();
                Some(Dedup {
                    cols: idx.into_iter().map(typed).collect(),
                    adjacent,
                    last: None,
                    seen: HashSet::new(),
                    held: 0,
                })
            }
        };
        if self.emit_header {
            if self.origins.iter().any(Option::is_some) {
                let mut described = fields[..visible].to_vec();
                for (f, origin) in described.iter_mut().zip(&self.origins) {
                    if let Some((table_oid, attnum)) = origin {
                        f.table_oid = *table_oid;
                        f.attnum = *attnum;
                    }
                }
                encode_row_description(out, &described);
            } else {
                encode_row_description(out, &fields[..visible]);
            }
        }
        Ok(())
    }

    fn prepare(&self, row: Row) -> Result<Entry, ProxyError> {
        let keys = if self.plan.sort.is_empty() {
            Vec::new()
        } else {
            self.sorter.keys_of(&row)?
        };
        Ok(Entry { row, keys })
    }

    fn less(&self, a: &Entry, b: &Entry) -> bool {
        self.sorter.cmp(&a.keys, &b.keys) == Ordering::Less
    }

    fn row(&mut self, _pos: usize, entry: Entry, out: &mut BytesMut) -> Result<bool, ProxyError> {
        if let Some(d) = self.dedup.as_mut() {
            if !d.admit(&entry.row) {
                return Ok(true);
            }
            if d.held as u64 > self.mem_limit {
                return Err(ProxyError::error(
                    "53200",
                    format!(
                        "DISTINCT across shards needs more than max_merge_memory ({} bytes)",
                        self.mem_limit
                    ),
                ));
            }
        }
        let (emit, more) = self.window.admit();
        if emit {
            entry.row.encode(out, self.project.visible);
        }
        Ok(more)
    }
}

/// Keeps every row per target for a later stage.
pub struct Collect {
    pub fields: Option<Vec<Field>>,
    pub rows: Vec<Vec<Row>>,
    held: u64,
    limit: u64,
}

impl Collect {
    pub fn new(targets: usize, limit: u64) -> Collect {
        Collect {
            fields: None,
            rows: (0..targets).map(|_| Vec::new()).collect(),
            held: 0,
            limit,
        }
    }
}

impl Merge for Collect {
    fn ordered(&self) -> bool {
        false
    }
    fn faces_client(&self) -> bool {
        false
    }
    fn header(&mut self, fields: Option<&[Field]>, _out: &mut BytesMut) -> Result<(), ProxyError> {
        self.fields = fields.map(|f| f.to_vec());
        Ok(())
    }
    fn row(&mut self, pos: usize, entry: Entry, _out: &mut BytesMut) -> Result<bool, ProxyError> {
        self.held += entry.row.footprint() as u64;
        if self.held > self.limit {
            return Err(ProxyError::error(
                "53200",
                format!(
                    "the cross-shard merge needs more than max_merge_memory ({} bytes)",
                    self.limit
                ),
            )
            .with_hint("add a LIMIT, aggregate fewer groups, restrict the query by the sharding key, or raise max_merge_memory"));
        }
        if let Some(v) = self.rows.get_mut(pos) {
            // A copy, so kept rows do not pin the shard's read buffers.
            v.push(Row {
                body: bytes::Bytes::copy_from_slice(&entry.row.body),
                cells: entry.row.cells,
            });
        }
        Ok(true)
    }
}

/// Concatenation of RETURNING rows (writes); `only`: rows of one target
/// (Broadcast: every shard has the same rows).
pub struct Pass {
    pub emit_header: bool,
    /// A Describe(portal) of the extended protocol is answered: a statement
    /// without rows gets NoData, as from Postgres.
    pub no_data: bool,
    pub only: Option<usize>,
    pub rows: u64,
}

impl Merge for Pass {
    fn ordered(&self) -> bool {
        false
    }
    fn header(&mut self, fields: Option<&[Field]>, out: &mut BytesMut) -> Result<(), ProxyError> {
        match (fields, self.emit_header) {
            (Some(f), true) => encode_row_description(out, f),
            (None, _) if self.no_data => {
                out.extend_from_slice(&[crate::protocol::tag::NO_DATA, 0, 0, 0, 4])
            }
            _ => {}
        }
        Ok(())
    }
    fn row(&mut self, pos: usize, entry: Entry, out: &mut BytesMut) -> Result<bool, ProxyError> {
        if self.only.is_none_or(|o| o == pos) {
            self.rows += 1;
            entry.row.encode(out, usize::MAX);
        }
        Ok(true)
    }
}

/// COPY … TO STDOUT from several shards: one CopyOutResponse, every shard's
/// CopyData concatenated (text/CSV rows are independent lines).
pub struct CopyOut {
    pub started: bool,
    pub rows: u64,
}

impl Merge for CopyOut {
    fn ordered(&self) -> bool {
        false
    }
    fn header(&mut self, _fields: Option<&[Field]>, _out: &mut BytesMut) -> Result<(), ProxyError> {
        Ok(())
    }
    fn copy_header(&mut self, response: &[u8], out: &mut BytesMut) -> Result<(), ProxyError> {
        use bytes::BufMut;
        self.started = true;
        out.put_u8(b'H');
        out.put_i32(4 + response.len() as i32);
        out.put_slice(response);
        Ok(())
    }
    fn row(&mut self, _pos: usize, entry: Entry, out: &mut BytesMut) -> Result<bool, ProxyError> {
        use bytes::BufMut;
        self.rows += 1;
        out.put_u8(b'd');
        out.put_i32(4 + entry.row.body.len() as i32);
        out.put_slice(&entry.row.body);
        Ok(true)
    }
}
