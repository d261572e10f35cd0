//! shardgate's `hash` function against real Postgres hash partitions: every key
//! must land on the remainder Postgres itself chose (ARCHITECTURE.md §2.5), and
//! keys decoded from Postgres' own binary and text output must agree.
//!
//! Also here, because they need a counting global allocator (which must not be
//! installed in the library's unit tests): `shard_for` does not allocate for
//! integer and uuid keys, and the measurement behind not using the
//! `consistent_hash` crate's lookup on the hot path.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::error::Error;

use shardgate::sharding::{
    ConsistentHashRing, HashFunction, KeyValue, RangeSpec, RingBytes, ShardName, ShardingFunction,
    StableRingHash,
};
use tokio_postgres::types::{FromSql, Type};

// ---------------------------------------------------------------------------
// Allocation counting (per thread, so parallel tests do not disturb each other).

struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

// ---------------------------------------------------------------------------
// Postgres hash partitions.

/// Any column as its raw binary wire bytes plus type OID, so the test exercises
/// `KeyValue::from_binary` on exactly what Postgres sends.
struct Raw {
    oid: u32,
    bytes: Vec<u8>,
}

impl<'a> FromSql<'a> for Raw {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw {
            oid: ty.oid(),
            bytes: raw.to_vec(),
        })
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// (SQL type, SQL expression of the i-th key over `generate_series(1, 10000) i`).
const KEY_TYPES: &[(&str, &str)] = &[
    ("int4", "(i * 104729 - 523645000)::int4"),
    (
        "int8",
        "(i::int8 * 1000000007 * (CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END) + i * 4294967296)",
    ),
    (
        "text",
        "CASE i % 5 WHEN 0 THEN 'user_' || i WHEN 1 THEN repeat('é', i % 17) || i \
              WHEN 2 THEN md5(i::text) WHEN 3 THEN '日本' || i || repeat('x', i % 40) \
              ELSE substr(md5(i::text), 1, i % 13) || i END",
    ),
    ("uuid", "md5('u' || i)::uuid"),
    ("int2", "(i * 6 - 30000)::int2"),
    ("date", "date '1990-01-01' + (i * 3 - 15000)"),
    (
        "timestamp",
        "timestamp '2026-01-01' + (i * 7919 - 40000000) * interval '1.5 second'",
    ),
];

const KEYS_PER_TABLE: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_function_picks_the_partition_postgres_picks() {
    let fleet = support::fleet();
    let cluster = &fleet.clusters[0];
    let db = support::fresh_db("sharding_pg_hash");
    let client = support::connect(cluster, &db).await;

    let mut report = Vec::new();
    for &(ty, expr) in KEY_TYPES {
        for modulus in [3usize, 4] {
            let table = format!("h_{ty}_{modulus}");
            let mut ddl =
                format!("CREATE TABLE {table} (k {ty} PRIMARY KEY) PARTITION BY HASH (k);");
            for r in 0..modulus {
                ddl.push_str(&format!(
                    "CREATE TABLE {table}_p{r} PARTITION OF {table} \
                     FOR VALUES WITH (MODULUS {modulus}, REMAINDER {r});"
                ));
            }
            ddl.push_str(&format!(
                "INSERT INTO {table} SELECT DISTINCT {expr} FROM generate_series(1, {KEYS_PER_TABLE}) i;"
            ));
            client
                .batch_execute(&ddl)
                .await
                .unwrap_or_else(|e| panic!("setting up {table}: {e}"));

            let rows = client
                .query(
                    &format!("SELECT k, k::text, tableoid::regclass::text FROM {table}"),
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("reading {table}: {e}"));
            assert!(
                rows.len() >= KEYS_PER_TABLE * 99 / 100,
                "{table}: only {} distinct keys",
                rows.len()
            );

            let f = HashFunction::new(modulus).unwrap();
            let mut per_shard: HashMap<usize, usize> = HashMap::new();
            let mut mismatches = Vec::new();
            for row in &rows {
                let raw: Raw = row.get(0);
                let text: String = row.get(1);
                let part: String = row.get(2);
                let want: usize = part
                    .rsplit("_p")
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("partition name {part}"));
                let key = KeyValue::from_binary(raw.oid, &raw.bytes)
                    .unwrap_or_else(|e| panic!("{table}: binary {text}: {e}"));
                let from_text = KeyValue::from_text(raw.oid, text.as_bytes())
                    .unwrap_or_else(|e| panic!("{table}: text {text}: {e}"));
                assert_eq!(key, from_text, "{table}: binary vs text decoding of {text}");
                let got = f.shard_for(&key);
                *per_shard.entry(want).or_default() += 1;
                if got != want {
                    mismatches.push(format!("{text}: postgres {want}, shardgate {got}"));
                }
            }
            assert!(
                mismatches.is_empty(),
                "{table}: {} of {} keys differ, e.g. {:?}",
                mismatches.len(),
                rows.len(),
                &mismatches[..mismatches.len().min(5)]
            );
            assert_eq!(per_shard.len(), modulus, "{table}: some partition is empty");
            report.push(format!("{table}: {} keys agree", rows.len()));
        }
    }
    eprintln!("{}", report.join("\n"));
}

// ---------------------------------------------------------------------------
// Allocation on the hot path.

#[test]
fn shard_for_does_not_allocate_for_int_and_uuid_keys() {
    let names: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let fns = [
        ShardingFunction::hash(4).unwrap(),
        ShardingFunction::modulo(4).unwrap(),
        ShardingFunction::consistent_hash(&names, 256).unwrap(),
        ShardingFunction::range(
            vec![
                RangeSpec {
                    from: None,
                    to: Some(KeyValue::Int(0)),
                    shard: 0,
                },
                RangeSpec {
                    from: Some(KeyValue::Int(0)),
                    to: None,
                    shard: 1,
                },
            ],
            4,
        )
        .unwrap(),
        ShardingFunction::list(
            (0..100)
                .map(|i| (KeyValue::Int(i), (i % 4) as usize))
                .collect(),
            Some(0),
            4,
        )
        .unwrap(),
    ];
    let ints: Vec<KeyValue> = (-500..500).map(|i| KeyValue::Int(i * 7919)).collect();
    let uuids: Vec<KeyValue> = (0u8..=255).map(|b| KeyValue::Uuid([b; 16])).collect();
    for f in &fns {
        let mut sink = 0usize;
        let n = allocations_during(|| {
            for k in &ints {
                sink += f.shard_for(k).unwrap();
            }
        });
        assert_eq!(
            n,
            0,
            "{} allocated {n} times for 1000 integer keys",
            f.kind()
        );
        if f.kind() == "hash" || f.kind() == "consistent_hash" {
            let n = allocations_during(|| {
                for k in &uuids {
                    sink += f.shard_for(k).unwrap();
                }
            });
            assert_eq!(n, 0, "{} allocated {n} times for uuid keys", f.kind());
        }
        assert!(sink < usize::MAX);
    }
}

/// The measurement behind `ConsistentHashRing` doing its own lookup: the
/// `consistent_hash` crate's `calc_candidates(..).next()` allocates every time.
#[test]
fn crate_ring_lookup_allocates() {
    use consistent_hash::{Node, StaticHashRing};
    let ring = StaticHashRing::new(
        StableRingHash,
        (0..4).map(|i| Node::new(ShardName(format!("s{i}"))).quantity(256)),
    );
    let lookups = 1000u64;
    let mut sink = 0usize;
    let n = allocations_during(|| {
        for k in 0..lookups as i64 {
            let bytes = k.to_be_bytes();
            sink += ring
                .calc_candidates(&RingBytes(&bytes))
                .next()
                .map_or(0, |node| node.key.0.len());
        }
    });
    eprintln!("consistent_hash crate: {n} allocations for {lookups} lookups");
    assert!(n >= lookups, "crate lookups allocated only {n} times");
    let ours = ConsistentHashRing::new(&["s0", "s1", "s2", "s3"], 256).unwrap();
    let n = allocations_during(|| {
        for k in 0..lookups as i64 {
            sink += ours.shard_for(&KeyValue::Int(k));
        }
    });
    assert_eq!(n, 0);
    assert!(sink > 0);
}
