//! shardgate: a PostgreSQL sharding proxy.
//!
//! The modules follow the path of a query (see README and ARCHITECTURE):
//! `frontend` (client connections: TLS, startup, auth, the message loop)
//! → `router` (where a statement goes) → `backend` (pooled raw connections
//! to the shards). `protocol` holds the I/O-free wire codec, `server` the
//! running proxy, `other_databases` the plain poolers of database names
//! other than the map's, `config` the YAML shard map, `sharding` the sharding
//! functions, `devcluster` throwaway Postgres clusters for demo and tests.

pub mod admin;
pub mod backend;
pub mod check;
pub mod civil_time;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod devcluster;
pub mod executor;
pub mod frontend;
pub mod metrics;
pub mod migrate;
pub mod other_databases;
pub mod placement;
pub mod protocol;
pub mod router;
pub mod server;
pub mod sharding;
pub mod suggest;
pub mod throttle;
