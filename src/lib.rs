//! shardgate: a PostgreSQL sharding proxy.
//!
//! The modules follow the path of a query (see README and ARCHITECTURE):
//! `config` (the YAML shard map), `check` (its summary), `devcluster`
//! (throwaway Postgres clusters for the demo and the tests), `demo`, and
//! `sharding` (the sharding functions).

pub mod backend;
pub mod check;
pub mod config;
pub mod demo;
pub mod devcluster;
pub mod sharding;
