//! Backend side of the proxy: raw PostgreSQL protocol connections to the
//! shards, pooled per shard with bb8, plus cancel requests.
//!
//! The proxy forwards client bytes to a backend and backend bytes back
//! without re-encoding (ARCHITECTURE §2.2), so [`BackendConnection`] is
//! byte-level: it only decodes messages itself during startup/authentication
//! and while resetting a connection that was returned mid-transaction.
//!
//! Every error names its shard and maps to a SQLSTATE the front end can send
//! to the client ([`BackendError::sqlstate`]).

mod cancel;
mod connection;
mod control_client;
mod error;
mod hot;
mod pool;
mod prepared;
mod suspect;

pub use cancel::{send_cancel, send_cancel_in_background};
pub use connection::{BackendConnection, DEFAULT_APPLICATION_NAME};
pub use control_client::{
    connect_control, CATALOG_APPLICATION, MIGRATE_APPLICATION, TWO_PHASE_APPLICATION,
};
pub use error::{intern_sqlstate, BackendError, ServerError};
pub use pool::{
    release, release_within, BackendManager, PooledBackend, Pools, ShardPool,
    HEALTH_CHECK_AFTER_IDLE, PROBE_EVERY, RESET_TIMEOUT, WAIT_MAX_WINDOW,
};
pub use prepared::{PreparedCache, ResultShape};
pub use suspect::{SuspectShards, SUSPECT_FOR};
