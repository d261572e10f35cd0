//! A client's named prepared statements, independent of backends.
//!
//! In transaction pooling the backend changes between transactions, so the
//! client's `Parse("s1", sql)` is remembered here and created on each backend
//! on demand under a shardgate-owned name `sg_<hash>` (the same text and
//! parameter types give the same name, so clients share them). Each backend
//! remembers which of those it has (`backend::PreparedCache`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;

use crate::backend::PreparedCache;
use crate::protocol::messages::{Bind, Parse, Target};
use crate::protocol::synth::ProxyError;

#[derive(Debug, Clone)]
struct Statement {
    hash: u64,
    server_name: String,
    query: String,
    param_types: Vec<u8>,
    /// The Parse clock when the client parsed it.
    parsed_at: u64,
    /// Wall-clock time of the client's Parse (`pg_prepared_statements`).
    prepared_at: std::time::SystemTime,
    /// It went to a backend at least once (a rejection there removes the
    /// name). Until then a routing-mode Parse was only recorded, and the
    /// client may define the name again (its first text may have been one
    /// Postgres would have rejected at Parse).
    sent: bool,
    /// The result columns the client was told (a Describe of the
    /// statement): the rows it binds later must have them (see
    /// [`ClientStatements::expected_shape`]).
    described: Option<u64>,
    /// A backend would have planned it with other result columns: as in
    /// Postgres, every Bind of it fails from now on.
    result_changed: bool,
    /// The parameter types a server inferred for it (a Describe), shown by
    /// `pg_prepared_statements` where the client declared none.
    inferred_types: Option<Vec<u32>>,
}

/// Counts client Parses of named statements, process-wide. Postgres plans
/// a statement as of its Parse: a backend's copy prepared before a client's
/// Parse may hold a plan from before a schema change (`ALTER TABLE … TYPE`
/// after it gives `cached plan must not change result type`), so it is
/// re-prepared for that client instead of shared (issue #14).
static PARSE_CLOCK: AtomicU64 = AtomicU64::new(1);

fn parse_tick() -> u64 {
    PARSE_CLOCK.fetch_add(1, Ordering::Relaxed) + 1
}

fn parse_clock_now() -> u64 {
    PARSE_CLOCK.load(Ordering::Relaxed)
}

impl Statement {
    fn parse(&self) -> Parse<'_> {
        Parse {
            name: &self.server_name,
            query: &self.query,
            param_types: &self.param_types,
        }
    }
}

#[derive(Debug, Default)]
pub struct ClientStatements {
    named: HashMap<String, Statement>,
}

/// See [`ClientStatements::expected_shape`].
#[derive(Debug, Clone, Copy)]
pub struct ExpectedShape {
    pub hash: u64,
    pub parsed_at: u64,
    pub shape: u64,
    pub changed: bool,
}

/// What a Parse needs on the backend.
pub enum ParseAction {
    /// The backend already has it: answer ParseComplete locally.
    Known,
    /// Sent under the server name (forgotten again if it fails); `evicted`:
    /// a Close of the least recently used statement went first.
    Sent { hash: u64, evicted: bool },
}

fn statement_hash(query: &str, param_types: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut hasher);
    param_types.hash(&mut hasher);
    hasher.finish()
}

impl ClientStatements {
    /// A named Parse from the client.
    pub fn define(
        &mut self,
        parse: Parse<'_>,
        cache: &mut PreparedCache,
        out: &mut BytesMut,
    ) -> Result<ParseAction, ProxyError> {
        if self.named.contains_key(parse.name) {
            return Err(ProxyError::error(
                "42P05",
                format!("prepared statement \"{}\" already exists", parse.name),
            ));
        }
        let hash = statement_hash(parse.query, parse.param_types);
        let statement = Statement {
            hash,
            server_name: format!("sg_{hash:016x}"),
            query: parse.query.to_string(),
            param_types: parse.param_types.to_vec(),
            parsed_at: parse_tick(),
            prepared_at: std::time::SystemTime::now(),
            sent: true,
            described: None,
            result_changed: false,
            inferred_types: None,
        };
        let action = if cache
            .get_prepared_since(hash, statement.parsed_at)
            .is_some()
        {
            ParseAction::Known
        } else {
            let evicted = Self::create_on_backend(&statement, cache, out);
            ParseAction::Sent { hash, evicted }
        };
        self.named.insert(parse.name.to_string(), statement);
        Ok(action)
    }

    /// A named Parse recorded without a backend (routing waits for Bind,
    /// which knows the parameters); created on the backend on first use.
    pub fn define_local(&mut self, parse: Parse<'_>) -> Result<(), ProxyError> {
        if self.named.get(parse.name).is_some_and(|s| s.sent) {
            return Err(ProxyError::error(
                "42P05",
                format!("prepared statement \"{}\" already exists", parse.name),
            ));
        }
        let hash = statement_hash(parse.query, parse.param_types);
        self.named.insert(
            parse.name.to_string(),
            Statement {
                hash,
                server_name: format!("sg_{hash:016x}"),
                query: parse.query.to_string(),
                param_types: parse.param_types.to_vec(),
                parsed_at: parse_tick(),
                prepared_at: std::time::SystemTime::now(),
                sent: false,
                described: None,
                result_changed: false,
                inferred_types: None,
            },
        );
        Ok(())
    }

    /// The SQL text and raw parameter-type section (count, then OIDs, as
    /// in Parse) of the client's statement `name`.
    pub fn text_of(&self, name: &str) -> Option<(&str, &[u8])> {
        self.named
            .get(name)
            .map(|s| (s.query.as_str(), s.param_types.as_slice()))
    }

    /// Writes the Parse (after a Close if the cache evicted a statement);
    /// true if a Close was written.
    fn create_on_backend(
        statement: &Statement,
        cache: &mut PreparedCache,
        out: &mut BytesMut,
    ) -> bool {
        let evicted = cache.insert_prepared_at(
            statement.hash,
            statement.server_name.clone(),
            parse_clock_now(),
        );
        if let Some(evicted) = &evicted {
            // The cache was full (the least recently used statement goes),
            // or this one is re-prepared: close it on the server first.
            Target {
                kind: b'S',
                name: evicted,
            }
            .encode_as(b'C', evicted, out);
        }
        let parse = statement.parse();
        parse.encode_as(parse.name, out);
        evicted.is_some()
    }

    /// Makes sure the backend has the client's statement `name`: `None` if
    /// the client never defined it, `Some(Some((hash, evicted)))` if a hidden
    /// Parse (after a hidden Close when `evicted`) was written to `out`,
    /// `Some(None)` if it was already there.
    pub fn ensure(
        &mut self,
        name: &str,
        cache: &mut PreparedCache,
        out: &mut BytesMut,
    ) -> Option<Option<(u64, bool)>> {
        let statement = self.named.get_mut(name)?;
        statement.sent = true;
        let statement = &*statement;
        if cache
            .get_prepared_since(statement.hash, statement.parsed_at)
            .is_some()
        {
            return Some(None);
        }
        let evicted = Self::create_on_backend(statement, cache, out);
        Some(Some((statement.hash, evicted)))
    }

    /// Writes the client's Bind with the server-side statement name.
    pub fn bind_into(&self, bind: Bind<'_>, out: &mut BytesMut) -> bool {
        match self.named.get(bind.statement) {
            Some(statement) => {
                bind.encode_as(&statement.server_name, out);
                true
            }
            None => false,
        }
    }

    /// Writes a Describe of the client's statement with the server-side name.
    pub fn describe_into(&self, target: Target<'_>, out: &mut BytesMut) -> bool {
        match self.named.get(target.name) {
            Some(statement) => {
                target.encode_as(b'D', &statement.server_name, out);
                true
            }
            None => false,
        }
    }

    /// The client closed (or deallocated) its name; the server statement stays cached.
    pub fn close(&mut self, name: &str) {
        self.named.remove(name);
    }

    /// A shard rejected the statement with this hash (e.g. an unknown type
    /// in it): Postgres would not have created the client's name, so a
    /// corrected Parse under the same name must not get 42P05.
    pub fn forget_rejected(&mut self, hash: u64) {
        self.named.retain(|_, s| s.hash != hash);
    }

    /// A shard accepted the statement `name` (it described it): a second
    /// Parse of the name gets 42P05, as in Postgres.
    pub fn mark_valid(&mut self, name: &str) {
        if let Some(statement) = self.named.get_mut(name) {
            statement.sent = true;
        }
    }

    /// The client was told the result columns of the statement(s) with
    /// this hash (a Describe): kept, unless told before.
    pub fn record_described(&mut self, hash: u64, shape: u64) {
        for statement in self.named.values_mut() {
            if statement.hash == hash && statement.described.is_none() {
                statement.described = Some(shape);
            }
        }
    }

    /// The hash of the client's statement `name` (its text and types).
    pub fn hash_of(&self, name: &str) -> Option<u64> {
        self.named.get(name).map(|s| s.hash)
    }

    /// What a Bind of `name` must check: the statement's hash, Parse clock
    /// and the result shape the client was told. `None`: nothing to check
    /// (never described, or unknown).
    pub fn expected_shape(&self, name: &str) -> Option<ExpectedShape> {
        let statement = self.named.get(name)?;
        Some(ExpectedShape {
            hash: statement.hash,
            parsed_at: statement.parsed_at,
            shape: statement.described?,
            changed: statement.result_changed,
        })
    }

    /// A backend's copy of `name` returns other columns than the client
    /// was told: Postgres fails every later Bind of it (0A000).
    pub fn mark_result_changed(&mut self, name: &str) {
        if let Some(statement) = self.named.get_mut(name) {
            statement.result_changed = true;
        }
    }

    /// Statements whose parameter types `pg_prepared_statements` would
    /// show as inferred by the server, not learnt yet: (name, text, raw
    /// parameter-type section as in Parse).
    pub fn needing_inferred_types(&self) -> Vec<(String, String, Vec<u8>)> {
        self.named
            .iter()
            .filter(|(_, s)| s.inferred_types.is_none() && s.query.contains('$'))
            .map(|(name, s)| (name.clone(), s.query.clone(), s.param_types.clone()))
            .collect()
    }

    /// What a server's ParameterDescription said of `name`'s parameters.
    pub fn set_inferred_types(&mut self, name: &str, types: Vec<u32>) {
        if let Some(statement) = self.named.get_mut(name) {
            statement.inferred_types = Some(types);
        }
    }

    /// The shardgate-owned name the client's statement `name` has on backends.
    pub fn server_name(&self, name: &str) -> Option<&str> {
        self.named.get(name).map(|s| s.server_name.as_str())
    }

    /// `DEALLOCATE ALL`: every name goes.
    pub fn clear(&mut self) {
        self.named.clear();
    }

    pub fn len(&self) -> usize {
        self.named.len()
    }

    /// The client's statements as `pg_prepared_statements` lists them.
    pub fn listing(&self) -> Vec<super::prepared_view::Listed<'_>> {
        self.named
            .iter()
            .map(|(name, s)| super::prepared_view::Listed {
                name,
                server_name: &s.server_name,
                query: &s.query,
                param_types: s.inferred_types.clone().unwrap_or_else(|| {
                    s.param_types
                        .get(2..)
                        .unwrap_or_default()
                        .chunks_exact(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }),
                prepared_at: s.prepared_at,
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}
