//! The routing decision ([`Route`]), its errors ([`RouteError`]) and bound
//! parameters ([`Param`]).
//!
//! A route is pure data: the proxy (src/frontend, src/server.rs) decides how
//! to execute it. Errors carry a SQLSTATE so the proxy can send them to the
//! client as an `ErrorResponse` unchanged.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Where a statement goes. Shard numbers are indexes into the map's shard list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Exactly one shard holds every row the statement touches.
    Single(usize),
    /// Fan-out to a subset of the shards (IN lists, OR, ranges); results are merged.
    Shards(BTreeSet<usize>),
    /// Fan-out to every shard: no usable key predicate.
    All,
    /// The same statement runs on every shard: writes to replicated tables, DDL,
    /// utility statements. Unlike [`Route::All`] there is nothing to merge; every
    /// shard must succeed.
    Broadcast,
    /// Any single shard gives the full answer (reads of replicated tables only,
    /// statements without tables). The proxy picks one, e.g. with
    /// [`super::Router::pick_any`], to spread load.
    AnyOne,
    /// A multi-row INSERT whose rows belong to different shards: row indexes
    /// (0-based, in VALUES order) per shard. Executing it needs one INSERT per
    /// shard (future work in the proxy); the decision is exact.
    Split {
        rows_by_shard: BTreeMap<usize, Vec<usize>>,
    },
    /// No shard needed: session and transaction control (SET, BEGIN, COMMIT, …)
    /// that the proxy applies to whatever backend the session uses.
    NoShard,
}

impl Route {
    /// Short name for metrics and explanations.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Single(_) => "single",
            Route::Shards(_) => "fanout-subset",
            Route::All => "fanout",
            Route::Broadcast => "broadcast",
            Route::AnyOne => "any-one",
            Route::Split { .. } => "split",
            Route::NoShard => "no-shard",
        }
    }

    /// The route for a set of shards: one shard is `Single`; an empty set (a key
    /// predicate no row can satisfy, e.g. `id = NULL`) can run anywhere.
    pub fn from_set(set: BTreeSet<usize>) -> Route {
        match set.len() {
            0 => Route::AnyOne,
            1 => set.first().map_or(Route::AnyOne, |s| Route::Single(*s)),
            _ => Route::Shards(set),
        }
    }
}

/// Why a statement cannot be routed. `sqlstate` is what the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The statement needs rows of several shards combined in a way the proxy
    /// cannot do exactly (joins of non-co-located tables, …).
    #[error("{0}")]
    CrossShard(String),
    /// A table the shard map does not name, with `default_table: error`.
    #[error("table \"{table}\" is not in the shard map (default_table: error); configured tables: {configured}")]
    UnknownTable { table: String, configured: String },
    /// A key value whose type cannot be known without the key column's type.
    #[error("{0}")]
    TypeNeeded(String),
    /// A key value that is not valid for its type or function.
    #[error("{0}")]
    InvalidKey(String),
    /// A key's text that is not a value of the key's type (Postgres says
    /// 22P02 for the same input).
    #[error("{0}")]
    BadKeyText(String),
    /// Something the router does not support (yet).
    #[error("{0}")]
    Unsupported(String),
    /// An INSERT without a column list into a table whose column order the
    /// proxy has not read from the catalog (yet).
    #[error("{0}")]
    ColumnOrderUnknown(String),
    /// A `$n` without a bound value.
    #[error("there is no parameter ${0}")]
    MissingParam(usize),
    /// A routing hint naming an unknown shard, or a malformed hint.
    #[error("{0}")]
    BadHint(String),
    /// The statement could not be parsed or classified.
    #[error("{0}")]
    Syntax(String),
    /// A table whose recorded placement differs from the map (see
    /// [`crate::placement`]): routing it could read or write the wrong shard.
    #[error("{message}")]
    Fenced {
        sqlstate: &'static str,
        message: String,
    },
}

impl RouteError {
    /// The SQLSTATE sent to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::CrossShard(_)
            | RouteError::Unsupported(_)
            | RouteError::ColumnOrderUnknown(_) => "0A000",
            RouteError::UnknownTable { .. } => "42P01",
            RouteError::TypeNeeded(_) => "42P18",
            RouteError::InvalidKey(_) => "22023",
            RouteError::BadKeyText(_) => "22P02",
            RouteError::MissingParam(_) => "42P02",
            RouteError::BadHint(_) => "22023",
            RouteError::Syntax(_) => "42601",
            RouteError::Fenced { sqlstate, .. } => sqlstate,
        }
    }
}

/// Format of a bound parameter (extended protocol `Bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamFormat {
    Text,
    Binary,
}

/// One bound parameter: its bytes (`None` is SQL NULL), its format, and the
/// type OID the client declared in `Parse` (0 or `None` when unspecified).
/// A Bind routes with values borrowed from its own frame (no copy per
/// parameter); the constructors below own theirs (tests, the CLI, literals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    pub value: Option<Cow<'a, [u8]>>,
    pub format: ParamFormat,
    pub type_oid: Option<u32>,
}

impl<'a> Param<'a> {
    /// A text-format parameter without a declared type (what most drivers send).
    pub fn text(value: &str) -> Param<'static> {
        Param {
            value: Some(Cow::Owned(value.as_bytes().to_vec())),
            format: ParamFormat::Text,
            type_oid: None,
        }
    }

    /// A text-format parameter that borrows its text where it can.
    pub fn text_cow(value: Cow<'a, str>, type_oid: Option<u32>) -> Param<'a> {
        let value = match value {
            Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
            Cow::Owned(text) => Cow::Owned(text.into_bytes()),
        };
        Param {
            value: Some(value),
            format: ParamFormat::Text,
            type_oid,
        }
    }

    /// A text-format parameter with a declared type OID.
    pub fn typed_text(value: &str, type_oid: u32) -> Param<'static> {
        Param {
            value: Some(Cow::Owned(value.as_bytes().to_vec())),
            format: ParamFormat::Text,
            type_oid: Some(type_oid),
        }
    }

    /// A binary-format parameter (network byte order) with an optional type OID.
    pub fn binary(value: &[u8], type_oid: Option<u32>) -> Param<'static> {
        Param {
            value: Some(Cow::Owned(value.to_vec())),
            format: ParamFormat::Binary,
            type_oid,
        }
    }

    /// SQL NULL.
    pub fn null() -> Param<'a> {
        Param {
            value: None,
            format: ParamFormat::Text,
            type_oid: None,
        }
    }

    /// The same parameter owning its bytes.
    pub fn into_owned(self) -> Param<'static> {
        Param {
            value: self.value.map(|v| Cow::Owned(v.into_owned())),
            format: self.format,
            type_oid: self.type_oid,
        }
    }

    /// The declared type OID, with 0 ("unspecified" on the wire) as `None`.
    pub fn declared_oid(&self) -> Option<u32> {
        self.type_oid.filter(|o| *o != 0)
    }
}
