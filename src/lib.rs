//! shardgate: a PostgreSQL sharding proxy.
//!
//! The modules follow the path of a query (see README and ARCHITECTURE):
//! `config` (the YAML shard map), `devcluster` (throwaway Postgres clusters for
//! the demo and the tests), `sharding` (the sharding functions).

pub mod config;
pub mod devcluster;
pub mod sharding;
