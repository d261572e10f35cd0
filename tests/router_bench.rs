//! Cost of routing on a cache hit (run by bench/router.sh in release mode):
//! `cargo test --release --test router_bench -- --ignored --nocapture`.
//! The target is under 5 µs per statement (issue 4).

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use shardgate::config::Config;
use shardgate::router::{Param, Router, ShardMap};
use shardgate::sharding::KeyType;

const MAP: &str = r#"
listen: 127.0.0.1:6432
auth: trust
users:
  - { name: app }
shards:
  - { name: s0, url: "postgres://postgres@127.0.0.1:5433/app" }
  - { name: s1, url: "postgres://postgres@127.0.0.1:5434/app" }
  - { name: s2, url: "postgres://postgres@127.0.0.1:5435/app" }
functions:
  by_user: { kind: hash }
tables:
  users:  { key: id, function: by_user }
  orders: { key: user_id, function: by_user }
  countries: { replicated: true }
default_table: error
"#;

#[test]
#[ignore]
fn cache_hit_cost() {
    let config = Config::parse(Path::new("t.yaml"), MAP, &|_| None).expect("map");
    let map = ShardMap::from_config(&config).expect("map").with_key_types(
        [
            ("users".to_string(), KeyType::Int),
            ("orders".to_string(), KeyType::Int),
        ]
        .into(),
    );
    let router = Router::new(map);
    let statements: [(&str, Vec<Param>); 5] = [
        ("SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = $1", vec![Param::text("42")]),
        ("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 ORDER BY o.id LIMIT 10", vec![Param::binary(&7i64.to_be_bytes(), Some(20))]),
        ("INSERT INTO orders (user_id, total, note) VALUES ($1, $2, $3) RETURNING id", vec![Param::text("9"), Param::text("10"), Param::text("x")]),
        ("UPDATE users SET name = $2 WHERE id = $1", vec![Param::text("5"), Param::text("bob")]),
        ("SELECT * FROM countries WHERE code = $1", vec![Param::text("FR")]),
    ];
    for (sql, params) in &statements {
        router.route_statement(sql, params).expect("routes");
    }
    let rounds = 200_000;
    for (sql, params) in &statements {
        let start = Instant::now();
        for _ in 0..rounds {
            black_box(
                router
                    .route_statement(black_box(sql), black_box(params))
                    .ok(),
            );
        }
        let per = start.elapsed().as_nanos() as f64 / rounds as f64;
        println!("{per:8.0} ns  {sql}");
        if !cfg!(debug_assertions) {
            assert!(per < 5_000.0, "cache hit took {per} ns");
        }
    }
    // Simple-protocol statements with inlined values, a different text each
    // time: the literals are extracted, so they share one cached analysis.
    let texts: Vec<String> = (0..1000)
        .map(|i| format!("SELECT id, name FROM users WHERE id = {i} AND name <> 'x{i}'"))
        .collect();
    let start = Instant::now();
    for i in 0..rounds {
        let sql = &texts[i % texts.len()];
        black_box(router.route_statement(black_box(sql), &[]).ok());
    }
    let per = start.elapsed().as_nanos() as f64 / rounds as f64;
    println!("{per:8.0} ns  literals extracted, 1000 distinct texts (simple protocol)");
    if !cfg!(debug_assertions) {
        assert!(per < 5_000.0, "a literal statement took {per} ns");
    }
    // A miss, for comparison: parse + walk (no literal extraction).
    let start = Instant::now();
    let misses = 20_000;
    for i in 0..misses {
        black_box(
            router
                .route(&format!("SELECT * FROM users WHERE id = {i}"))
                .ok(),
        );
    }
    let per = start.elapsed().as_nanos() as f64 / misses as f64;
    println!("{per:8.0} ns  cache miss (parse + analyse), inlined literal");
}
