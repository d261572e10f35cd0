//! [`Router`]: the entry point the proxy uses. Analyses are cached by SQL
//! text because parsing costs 5–14 µs a statement (ARCHITECTURE §2.4), as much
//! as the proxy's whole per-query CPU; a hit only hashes the text and
//! evaluates the key predicates with the bound parameters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::analyze::{analyze, Analysis, StatementKind};
use super::effects::{scan_statement, StatementEffects};
use super::hints::{leading_hint, Hint};
use super::normalize::{extract_literals, match_literals, max_param, LiteralSpan};
use super::route::{Param, Route, RouteError};
use super::shardmap::ShardMap;
use crate::sharding::{oid, KeyValue};

/// Default number of cached statements.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

type Cached = Result<Arc<Analysis>, RouteError>;

/// A shard map with a bounded cache of statement analyses.
///
/// The cache is cleared when full rather than kept in LRU order: applications
/// use a small, stable set of statements, so a full cache means ad-hoc SQL
/// with inlined values, where LRU bookkeeping would be pure overhead.
pub struct Router {
    /// Replaced as a whole when the catalog teaches new key types or column
    /// orders; readers take a snapshot.
    map: RwLock<Arc<ShardMap>>,
    cache: Mutex<HashMap<String, Cached>>,
    capacity: usize,
    next: AtomicUsize,
    /// Bumped whenever the map changes: memos of older maps are stale.
    generation: AtomicU64,
    /// A statement was refused for a fenced table since the last
    /// [`Router::take_fence_hit`]: the proxy re-reads the recorded
    /// placements (another proxy's `placement accept` may have lifted it).
    fence_hit: AtomicBool,
}

/// One session's memo of its last statement: drivers execute the same
/// statement text again and again, and comparing it with the last one is
/// cheaper than the shared cache's lock and hash (the proxy's hot path).
#[derive(Debug, Default)]
pub struct Memo {
    /// The last statement text with bound parameters (extended protocol).
    plain: MemoEntry,
    /// The last literal-free form of a text with inlined values (simple
    /// protocol: `… WHERE aid = 42` memoised as `… WHERE aid = $1`).
    literal_free: MemoEntry,
    /// The text `literal_free` was last made from and where its literals
    /// are: the next text of the same shape is matched against it.
    template: LiteralTemplate,
    /// Which entry the last routed statement used, for [`Memo::effects`].
    last: LastRoute,
    /// Reused for each statement's literal-free form (no allocation per query).
    scratch: String,
}

/// A text with inlined values as written, and where its literals are.
#[derive(Debug, Default)]
struct LiteralTemplate {
    raw: String,
    spans: Vec<LiteralSpan>,
    first_param: usize,
    /// `raw` and `spans` describe the memo's `literal_free` entry.
    valid: bool,
}

impl LiteralTemplate {
    fn remember(&mut self, sql: &str, spans: Vec<LiteralSpan>) {
        self.raw.clear();
        self.raw.push_str(sql);
        self.spans = spans;
        self.first_param = max_param(sql);
        self.valid = true;
    }

    /// Keeps the buffer, not the text.
    fn forget(&mut self, spans: Vec<LiteralSpan>) {
        self.spans = spans;
        self.valid = false;
    }
}

/// Which memo entry an extraction's parameters let [`Memo::effects`] use.
fn last_route(all: &[Param<'_>]) -> LastRoute {
    if integers_only(all) {
        LastRoute::IntegerLiterals
    } else {
        LastRoute::Neither
    }
}

/// Which memo entry holds the last routed statement.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LastRoute {
    #[default]
    Neither,
    /// `plain`: the exact text.
    Plain,
    /// `literal_free`, and every literal taken out was an integer: texts
    /// that differ only in integers have the same words, so the same effects.
    IntegerLiterals,
}

impl Memo {
    /// The next statement is routed without this memo (a session's
    /// `shardgate.shard`): [`Memo::effects`] must not use its entries.
    pub fn forget_last(&mut self) {
        self.last = LastRoute::Neither;
    }

    /// The session effects of `sql`, the statement just routed through this
    /// memo: remembered with the memo entry when its words cannot differ
    /// from the entry's, else read from the text.
    pub fn effects(&mut self, sql: &str) -> StatementEffects {
        let entry = match self.last {
            LastRoute::Neither => return scan_statement(sql),
            LastRoute::Plain => &mut self.plain,
            LastRoute::IntegerLiterals => &mut self.literal_free,
        };
        *entry.effects.get_or_insert_with(|| scan_statement(sql))
    }
}

/// One memoised text, its analysis and the map it was made with.
#[derive(Debug, Default)]
struct MemoEntry {
    sql: String,
    generation: u64,
    analysis: Option<Arc<Analysis>>,
    map: Option<Arc<ShardMap>>,
    /// The statement's session effects, once asked for (see [`Memo::effects`]).
    effects: Option<StatementEffects>,
}

impl MemoEntry {
    /// The analysis and map when this entry holds `sql` for `generation`.
    fn hit(&self, generation: u64, sql: &str) -> Option<(&Analysis, &ShardMap)> {
        if self.generation != generation || self.sql != sql {
            return None;
        }
        Some((self.analysis.as_deref()?, self.map.as_deref()?))
    }

    /// The analysis and map when this entry was made for `generation`.
    fn hit_generation(&self, generation: u64) -> Option<(&Analysis, &ShardMap)> {
        if self.generation != generation {
            return None;
        }
        Some((self.analysis.as_deref()?, self.map.as_deref()?))
    }

    fn store(&mut self, generation: u64, sql: &str, analysis: Arc<Analysis>, map: Arc<ShardMap>) {
        self.sql.clear();
        self.sql.push_str(sql);
        self.generation = generation;
        self.analysis = Some(analysis);
        self.map = Some(map);
        self.effects = None;
    }
}

/// The literal-free form of `sql`, written to `out`, and its parameters
/// (see [`extract_literals`]). Statements with `bound` parameters come from
/// drivers that bind their values: their text is already stable.
fn literal_free<'a>(
    sql: &'a str,
    bound: usize,
    out: &mut String,
    spans: &mut Vec<LiteralSpan>,
) -> Option<Vec<Param<'a>>> {
    if bound > 0 {
        return None;
    }
    extract_literals(sql, max_param(sql), out, spans)
}

/// Whether every literal taken out of a text was an integer (the
/// statement's own `$n` come first, unbound).
fn integers_only(params: &[Param<'_>]) -> bool {
    params
        .iter()
        .all(|p| p.value.is_none() || p.type_oid == Some(oid::INT8))
}

impl Router {
    pub fn new(map: ShardMap) -> Router {
        Router::with_capacity(map, DEFAULT_CACHE_CAPACITY)
    }

    pub fn with_capacity(map: ShardMap, capacity: usize) -> Router {
        Router {
            map: RwLock::new(Arc::new(map)),
            cache: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            next: AtomicUsize::new(0),
            generation: AtomicU64::new(1),
            fence_hit: AtomicBool::new(false),
        }
    }

    /// The current map (a snapshot: catalog updates replace it).
    pub fn map(&self) -> Arc<ShardMap> {
        match self.map.read() {
            Ok(map) => Arc::clone(&map),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the map with one that knows more of the catalog (key column
    /// types, column orders) and forgets every cached analysis, since
    /// analyses (INSERT without a column list) and errors depend on it.
    pub fn learn(&self, update: impl FnOnce(&ShardMap) -> ShardMap) {
        let current = self.map();
        let next = Arc::new(update(&current));
        match self.map.write() {
            Ok(mut map) => *map = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// [`Router::route_statement`] through a session's [`Memo`]: the last
    /// statement's analysis and the map are reused while the text and the
    /// map stay the same.
    pub fn route_statement_memo(
        &self,
        memo: &mut Memo,
        sql: &str,
        params: &[Param],
    ) -> Result<(Route, StatementKind), RouteError> {
        let generation = self.generation.load(Ordering::Acquire);
        memo.last = LastRoute::Neither;
        if let Some((analysis, map)) = memo.plain.hit(generation, sql) {
            memo.last = LastRoute::Plain;
            return Ok((analysis.route(map, params)?, analysis.kind));
        }
        if leading_hint(sql).is_some() {
            return self.route_statement(sql, params);
        }
        let mut normalized = std::mem::take(&mut memo.scratch);
        let routed = self.route_literal_free(memo, generation, sql, params, &mut normalized);
        memo.scratch = normalized;
        if let Some(routed) = routed {
            return routed;
        }
        let analysis = self.analyze(sql).map_err(|e| self.note(e))?;
        let map = self.map();
        let route = analysis.route(&map, params)?;
        let kind = analysis.kind;
        memo.plain.store(generation, sql, analysis, map);
        memo.last = LastRoute::Plain;
        Ok((route, kind))
    }

    /// The memo's literal-free path: `None` when `sql` has no literals to
    /// take out or its literal-free form does not analyse.
    fn route_literal_free(
        &self,
        memo: &mut Memo,
        generation: u64,
        sql: &str,
        params: &[Param],
        normalized: &mut String,
    ) -> Option<Result<(Route, StatementKind), RouteError>> {
        if params.is_empty()
            && memo.template.valid
            && memo.literal_free.hit_generation(generation).is_some()
        {
            // The last statement's shape with other literals: read in place.
            let template = &memo.template;
            if let Some(all) =
                match_literals(&template.raw, &template.spans, template.first_param, sql)
            {
                memo.last = last_route(&all);
                let (analysis, map) = memo.literal_free.hit_generation(generation)?;
                return Some(self.route_literals(sql, params, analysis, map, all));
            }
        }
        // Texts with inlined values rarely repeat, their literal-free form
        // does: that is what the memo keeps for them.
        let mut spans = std::mem::take(&mut memo.template.spans);
        let all = literal_free(sql, params.len(), normalized, &mut spans);
        let Some(all) = all else {
            memo.template.spans = spans;
            return None;
        };
        let last = last_route(&all);
        if let Some((analysis, map)) = memo.literal_free.hit(generation, normalized) {
            let routed = self.route_literals(sql, params, analysis, map, all);
            memo.template.remember(sql, spans);
            memo.last = last;
            return Some(routed);
        }
        // Only a real parse of the literal-free form counts: literals in
        // type modifiers (`varchar(10)`) become placeholders sqlparser
        // rejects, and the tokenizer's guess would skip the checks the full
        // analysis makes (unique keys, temporary tables).
        let Some(analysis) = self
            .analyze(normalized)
            .ok()
            .filter(|analysis| !analysis.by_tokenizer)
        else {
            memo.template.forget(spans);
            return None;
        };
        let map = self.map();
        let routed = self.route_literals(sql, params, &analysis, &map, all);
        memo.literal_free
            .store(generation, normalized, analysis, map);
        memo.template.remember(sql, spans);
        memo.last = last;
        Some(routed)
    }

    /// Notes a refusal for a fenced table (error paths only).
    fn note(&self, error: RouteError) -> RouteError {
        if matches!(error, RouteError::Fenced { .. }) {
            self.fence_hit.store(true, Ordering::Relaxed);
        }
        error
    }

    /// Whether a statement was refused for a fenced table since the last call.
    pub fn take_fence_hit(&self) -> bool {
        self.fence_hit.swap(false, Ordering::Relaxed)
    }

    /// Cached statements (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// The analysis of `sql`, from the cache when possible. Errors are cached
    /// too: the same text fails the same way.
    pub fn analyze(&self, sql: &str) -> Result<Arc<Analysis>, RouteError> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(hit) = cache.get(sql) {
                return hit.clone();
            }
        }
        let fresh: Cached = analyze(&self.map(), sql).map(Arc::new);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.capacity {
                cache.clear();
            }
            cache.insert(sql.to_string(), fresh.clone());
        }
        fresh
    }

    /// The analysis of `sql` by its literal-free form when that analyses
    /// (see [`super::normalize`]), else of the text as written. Returns the
    /// analysis and, when literals were extracted, the parameters of the
    /// literal-free form: NULL for each `$n` the text itself has (nothing is
    /// bound to them), then the literals; empty when none were extracted.
    fn analysis_of<'s>(
        &self,
        sql: &'s str,
        params: usize,
    ) -> Result<(Arc<Analysis>, Vec<Param<'s>>), RouteError> {
        let mut normalized = String::new();
        if let Some(all) = literal_free(sql, params, &mut normalized, &mut Vec::new()) {
            // As in `route_statement_memo`: a tokenizer guess does not count.
            if let Some(analysis) = self
                .analyze(&normalized)
                .ok()
                .filter(|analysis| !analysis.by_tokenizer)
            {
                return Ok((analysis, all));
            }
        }
        Ok((self.analyze(sql)?, Vec::new()))
    }

    /// The route of a statement and what kind of statement it is, from one
    /// cached analysis. A leading hint overrides the route.
    pub fn route_statement(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<(Route, StatementKind), RouteError> {
        let hinted = match leading_hint(sql) {
            Some(Hint::Shard(name)) => Some(self.hinted_shard(name)?),
            Some(Hint::Key(value)) => Some(self.hinted_key(sql, value)?),
            None => None,
        };
        let analysed = self.analysis_of(sql, params.len());
        if let Some(shard) = hinted {
            // A hinted statement need not be analysable; unknown counts as a write.
            let kind = analysed.map_or(StatementKind::Write, |(a, _)| a.kind);
            return Ok((Route::Single(shard), kind));
        }
        let (analysis, literals) = analysed.map_err(|e| self.note(e))?;
        let map = self.map();
        if literals.is_empty() {
            return Ok((analysis.route(&map, params)?, analysis.kind));
        }
        self.route_literals(sql, params, &analysis, &map, literals)
    }

    /// The route of `sql` from the analysis of its literal-free form and
    /// that form's parameters (see [`Router::analysis_of`]; literals are
    /// only extracted from texts without bound parameters).
    fn route_literals(
        &self,
        sql: &str,
        params: &[Param<'_>],
        analysis: &Analysis,
        map: &ShardMap,
        all: Vec<Param<'_>>,
    ) -> Result<(Route, StatementKind), RouteError> {
        match analysis.route(map, &all) {
            Ok(route) => Ok((route, analysis.kind)),
            // Errors are worded for the text as written.
            Err(_) => {
                let analysis = self.analyze(sql)?;
                Ok((analysis.route(map, params)?, analysis.kind))
            }
        }
    }

    /// The kind of a statement (read, write, DDL, …), from the cached analysis.
    pub fn statement_kind(&self, sql: &str) -> Result<StatementKind, RouteError> {
        self.analysis_of(sql, 0).map(|(a, _)| a.kind)
    }

    /// The route of a statement without parameters.
    pub fn route(&self, sql: &str) -> Result<Route, RouteError> {
        self.route_with_params(sql, &[])
    }

    /// The route of a statement with bound parameters. A leading
    /// `/* shardgate: … */` hint overrides the analysis.
    pub fn route_with_params(&self, sql: &str, params: &[Param]) -> Result<Route, RouteError> {
        match leading_hint(sql) {
            Some(Hint::Shard(name)) => self.hinted_shard(name).map(Route::Single),
            Some(Hint::Key(value)) => self.hinted_key(sql, value).map(Route::Single),
            None => self.analyze(sql)?.route(&self.map(), params),
        }
    }

    /// The shard a `shard=` hint names.
    pub fn hinted_shard(&self, name: &str) -> Result<usize, RouteError> {
        let map = self.map();
        map.shard_index(name).ok_or_else(|| {
            RouteError::BadHint(format!(
                "the routing hint names shard \"{name}\", which is not in the shard map (shards: {})",
                map.shard_names.join(", ")
            ))
        })
    }

    /// The shard a `key=` hint selects: the statement's sharding function (or
    /// the map's only one), reading the value as the key column's type when
    /// known, else as the function's type; a bare integer is an integer key.
    pub fn hinted_key(&self, sql: &str, value: &str) -> Result<usize, RouteError> {
        let map = self.map();
        let analysis = self.analysis_of(sql, 0).ok().map(|(a, _)| a);
        let function = analysis
            .as_ref()
            .and_then(|a| a.function())
            .or(if map.functions.len() == 1 {
                Some(0)
            } else {
                None
            })
            .ok_or_else(|| {
                RouteError::BadHint(
                    "a key= hint needs a statement on a sharded table (or a map with one \
                     sharding function) to know which function applies"
                        .into(),
                )
            })?;
        let f = map
            .functions
            .get(function)
            .ok_or_else(|| RouteError::BadHint("unknown sharding function".into()))?;
        let kind = analysis
            .as_ref()
            .and_then(|a| a.key_table())
            .and_then(|t| map.key_type(t))
            .or_else(|| f.implied_key_type());
        let key = match kind {
            Some(kind) => KeyValue::parse_as(kind, value)
                .map_err(|e| RouteError::BadHint(format!("key hint: {e}")))?,
            None => match value.parse::<i64>() {
                Ok(i) => KeyValue::Int(i),
                Err(_) => {
                    return Err(RouteError::TypeNeeded(format!(
                        "the key hint '{value}' is not an integer and the key column's type is \
                         unknown: {} placement depends on it",
                        f.kind
                    )))
                }
            },
        };
        let placed = match kind {
            Some(kind) => f.function.shard_for_as(&key, kind),
            None => f.function.shard_for(&key),
        };
        placed.map_err(|e| RouteError::BadHint(format!("key hint: {e}")))
    }

    /// A shard for an [`Route::AnyOne`] statement, round-robin so replicated
    /// reads spread over the shards.
    pub fn pick_any(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.map().shard_count().max(1)
    }
}
