//! Table-driven routing tests: ORM-style SQL against a demo-like map (users and
//! orders co-located by hash, countries replicated) and a range/list map. Every
//! expected shard is computed independently with the sharding functions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use shardgate::config::Config;
use shardgate::router::{Param, Route, Router, ShardMap};
use shardgate::sharding::{oid, KeyType, KeyValue, ShardingFunction};

const DEMO: &str = r#"
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
  by_sku: { kind: modulo }
tables:
  users:     { key: id, function: by_user }
  orders:    { key: user_id, function: by_user }
  countries: { replicated: true }
  items:     { key: sku, function: by_sku }
default_table: error
"#;

const RANGES: &str = r#"
listen: 127.0.0.1:6432
auth: trust
users:
  - { name: app }
shards:
  - { name: archive, url: "postgres://postgres@127.0.0.1:5433/events" }
  - { name: y2026,   url: "postgres://postgres@127.0.0.1:5434/events" }
  - { name: current, url: "postgres://postgres@127.0.0.1:5435/events" }
functions:
  by_day:
    kind: range
    type: date
    ranges:
      - { to: "2026-01-01", shard: archive }
      - { from: "2026-01-01", to: "2026-07-01", shard: y2026 }
      - { from: "2026-07-01", shard: current }
  by_id_block:
    kind: range
    ranges:
      - { from: 0, to: 1000000, shard: archive }
      - { from: 1000000, to: 2000000, shard: y2026 }
      - { from: 2000000, shard: current }
  by_region:
    kind: list
    values: { eu: archive, us: y2026, apac: current }
    default: current
tables:
  events:    { key: day, function: by_day }
  tickets:   { key: id, function: by_id_block }
  customers: { key: region, function: by_region }
  regions:   { replicated: true }
default_table: replicated
"#;

fn router(yaml: &str, types: &[(&str, KeyType)]) -> Router {
    let config = Config::parse(Path::new("test.yaml"), yaml, &|_| None).expect("valid map");
    let types: HashMap<String, KeyType> = types.iter().map(|(t, k)| (t.to_string(), *k)).collect();
    Router::new(
        ShardMap::from_config(&config)
            .expect("map")
            .with_key_types(types),
    )
}

fn h(k: i64) -> usize {
    ShardingFunction::hash(3)
        .and_then(|f| f.shard_for(&KeyValue::Int(k)))
        .expect("hash")
}

fn single(k: i64) -> Route {
    Route::Single(h(k))
}

fn set(keys: &[i64]) -> Route {
    Route::from_set(keys.iter().map(|k| h(*k)).collect::<BTreeSet<_>>())
}

fn split(keys: &[i64]) -> Route {
    let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        m.entry(h(*k)).or_default().push(i);
    }
    if m.len() == 1 {
        Route::Single(h(keys[0]))
    } else {
        Route::Split { rows_by_shard: m }
    }
}

type Case = (&'static str, Result<Route, &'static str>);

fn check(router: &Router, cases: &[Case], params: &[Param]) -> usize {
    let mut failures = Vec::new();
    for (sql, want) in cases {
        let got = router
            .route_with_params(sql, params)
            .map_err(|e| e.sqlstate());
        if got != *want {
            failures.push(format!("{sql}\n   want {want:?}\n   got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    cases.len()
}

#[test]
fn demo_map_statements() {
    let r = router(DEMO, &[("users", KeyType::Int), ("orders", KeyType::Int)]);
    let ms = |k: i64| Route::Single(k.rem_euclid(3) as usize);
    let cases: Vec<Case> = vec![
        // Point lookups, as ORMs write them.
        ("SELECT * FROM users WHERE id = 42", Ok(single(42))),
        ("select * from users where 42 = id", Ok(single(42))),
        ("SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = 7", Ok(single(7))),
        ("SELECT users.id, users.name FROM public.users WHERE public.users.id = 9", Ok(single(9))),
        ("SELECT u.id FROM users AS u WHERE u.id = 11 LIMIT 1", Ok(single(11))),
        ("SELECT \"users\".\"id\" FROM \"users\" WHERE \"users\".\"id\" = 5", Ok(single(5))),
        ("SELECT * FROM users WHERE id = -3", Ok(single(-3))),
        ("SELECT * FROM users WHERE id = '42'", Ok(single(42))),
        ("SELECT * FROM users WHERE id = CAST('42' AS BIGINT)", Ok(single(42))),
        ("SELECT * FROM users WHERE (id = 8)", Ok(single(8))),
        ("SELECT * FROM users WHERE id = 8 AND name = 'bob'", Ok(single(8))),
        ("SELECT * FROM users WHERE name = 'bob' AND id = 8 ORDER BY name", Ok(single(8))),
        ("SELECT count(*) FROM users WHERE id = 8 GROUP BY name HAVING count(*) > 1", Ok(single(8))),
        // IN lists, ANY, OR.
        ("SELECT * FROM users WHERE id IN (1, 2, 3)", Ok(set(&[1, 2, 3]))),
        ("SELECT * FROM users WHERE id IN (4)", Ok(single(4))),
        ("SELECT * FROM users WHERE id = ANY(ARRAY[10, 20])", Ok(set(&[10, 20]))),
        ("SELECT * FROM users WHERE id = 1 OR id = 2", Ok(set(&[1, 2]))),
        ("SELECT * FROM users WHERE (id = 1 OR id = 2) AND name = 'x'", Ok(set(&[1, 2]))),
        ("SELECT * FROM users WHERE id IN (1, 2) AND id IN (2, 3)", Ok(single(2))),
        ("SELECT * FROM users WHERE id = 1 OR name = 'x'", Ok(Route::All)),
        ("SELECT * FROM users WHERE id NOT IN (1, 2)", Ok(Route::All)),
        ("SELECT * FROM users WHERE id <> 1", Ok(Route::All)),
        ("SELECT * FROM users WHERE id > 10", Ok(Route::All)),
        ("SELECT * FROM users WHERE id = NULL", Ok(Route::AnyOne)),
        ("SELECT * FROM users", Ok(Route::All)),
        ("SELECT count(*) FROM users", Ok(Route::All)),
        // Joins.
        ("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 42", Ok(single(42))),
        ("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE o.user_id = 43", Ok(single(43))),
        ("SELECT * FROM users u, orders o WHERE u.id = o.user_id AND u.id = 44", Ok(single(44))),
        ("SELECT * FROM users u JOIN orders o ON u.id = o.user_id", Ok(Route::All)),
        ("SELECT * FROM users u LEFT JOIN orders o ON o.user_id = u.id AND o.user_id = 5", Ok(Route::All)),
        ("SELECT * FROM users u LEFT OUTER JOIN orders o ON o.user_id = u.id WHERE u.id = 6", Ok(single(6))),
        ("SELECT * FROM users JOIN orders USING (id)", Err("0A000")),
        ("SELECT * FROM users u JOIN countries c ON c.code = u.country WHERE u.id = 12", Ok(single(12))),
        ("SELECT * FROM users a JOIN users b ON a.name = b.name", Err("0A000")),
        ("SELECT * FROM users u JOIN items i ON i.sku = u.id", Err("0A000")),
        ("SELECT * FROM orders o JOIN users u ON u.id = o.user_id JOIN countries c ON c.code = u.country WHERE u.id IN (1, 2)", Ok(set(&[1, 2]))),
        // Subqueries and CTEs.
        ("SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 10)", Ok(Route::All)),
        ("SELECT * FROM users u WHERE u.id = 3 AND EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)", Ok(single(3))),
        ("SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.total > 5)", Err("0A000")),
        ("SELECT * FROM (SELECT * FROM users WHERE id = 13) AS sub", Ok(single(13))),
        ("WITH mine AS (SELECT * FROM orders WHERE user_id = 14) SELECT * FROM mine", Ok(single(14))),
        ("WITH c AS (SELECT code FROM countries) SELECT * FROM c", Ok(Route::AnyOne)),
        ("SELECT * FROM users WHERE id = 1 UNION ALL SELECT * FROM users WHERE id = 2", Ok(set(&[1, 2]))),
        ("SELECT name FROM countries UNION SELECT name FROM users WHERE id = 15", Ok(single(15))),
        // Replicated and table-less reads.
        ("SELECT * FROM countries WHERE code = 'FR'", Ok(Route::AnyOne)),
        ("SELECT 1", Ok(Route::AnyOne)),
        ("SELECT now(), version()", Ok(Route::AnyOne)),
        ("SELECT * FROM pg_catalog.pg_class WHERE relname = 'users'", Ok(Route::AnyOne)),
        ("SELECT * FROM countries FOR UPDATE", Ok(Route::Single(0))),
        ("SELECT * FROM users WHERE id = 16 FOR NO KEY UPDATE", Ok(single(16))),
        ("TABLE countries", Ok(Route::AnyOne)),
        ("SELECT * FROM missing_table", Err("42P01")),
        // INSERT, upserts, RETURNING.
        ("INSERT INTO users (id, name) VALUES (42, 'ann')", Ok(single(42))),
        ("INSERT INTO users (name, id) VALUES ('ann', 17) RETURNING id", Ok(single(17))),
        ("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')", Ok(split(&[1, 2, 3]))),
        ("INSERT INTO users (id, name) VALUES (18, 'a') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name", Ok(single(18))),
        ("INSERT INTO users (id, name) VALUES (19, 'a') ON CONFLICT DO NOTHING", Ok(single(19))),
        ("INSERT INTO users (id, name) VALUES (20, 'a') ON CONFLICT (id) DO UPDATE SET id = 21", Err("0A000")),
        ("INSERT INTO users VALUES (1, 'x')", Err("0A000")),
        ("INSERT INTO users (name) VALUES ('x')", Err("0A000")),
        ("INSERT INTO users (id, name) VALUES (NULL, 'x')", Err("22023")),
        ("INSERT INTO \"users\" (\"id\", \"name\") VALUES (22, 'q')", Ok(single(22))),
        ("INSERT INTO orders (user_id, total) SELECT id, 0 FROM users WHERE id = 23", Ok(single(23))),
        ("INSERT INTO orders (user_id, total) SELECT 24, 0", Ok(single(24))),
        ("INSERT INTO orders (user_id, total) SELECT total, 0 FROM orders", Err("0A000")),
        ("INSERT INTO countries (code, name) VALUES ('FR', 'France')", Ok(Route::Broadcast)),
        ("INSERT INTO countries (code, name) SELECT country, name FROM users", Err("0A000")),
        ("INSERT INTO items (sku, n) VALUES (7, 1)", Ok(ms(7))),
        ("INSERT INTO items (sku, n) VALUES ('8', 1)", Ok(ms(8))),
        // UPDATE / DELETE.
        ("UPDATE users SET name = 'x' WHERE id = 25", Ok(single(25))),
        ("UPDATE users SET name = 'x' WHERE id = 25 RETURNING *", Ok(single(25))),
        ("UPDATE users SET name = 'x'", Ok(Route::All)),
        ("UPDATE users SET id = 25, name = 'x' WHERE id = 25", Ok(single(25))),
        ("UPDATE users SET id = 26 WHERE id = 25", if h(25) == h(26) { Ok(single(25)) } else { Err("0A000") }),
        ("UPDATE users SET id = id + 1 WHERE id = 25", Err("0A000")),
        ("UPDATE orders o SET total = 0 FROM users u WHERE u.id = o.user_id AND u.id = 27", Ok(single(27))),
        ("UPDATE countries SET name = 'X' WHERE code = 'FR'", Ok(Route::Broadcast)),
        ("UPDATE countries c SET name = u.name FROM users u WHERE u.country = c.code", Err("0A000")),
        ("DELETE FROM users WHERE id = 28", Ok(single(28))),
        ("DELETE FROM orders o USING users u WHERE o.user_id = u.id AND u.id IN (29, 30)", Ok(set(&[29, 30]))),
        ("DELETE FROM countries", Ok(Route::Broadcast)),
        // Values every shard would compute differently: replicated copies
        // must not diverge, sequences are one per shard.
        ("INSERT INTO countries (code, name) VALUES ('XX', random()::text)", Err("0A000")),
        ("INSERT INTO countries (code, name) VALUES (gen_random_uuid()::text, 'x')", Err("0A000")),
        ("UPDATE countries SET name = nextval('s')::text", Err("0A000")),
        ("DELETE FROM countries WHERE random() < 0.5", Err("0A000")),
        ("UPDATE countries SET name = now()::text WHERE code = 'FR'", Ok(Route::Broadcast)),
        ("INSERT INTO countries (code, name) VALUES ('FR', CURRENT_TIMESTAMP::text)", Ok(Route::Broadcast)),
        ("SELECT nextval('order_numbers')", Ok(Route::Single(0))),
        ("SELECT setval('order_numbers', 100)", Ok(Route::Single(0))),
        ("SELECT pg_catalog.nextval('order_numbers'), code FROM countries", Ok(Route::Single(0))),
        ("SELECT random()", Ok(Route::AnyOne)),
        ("INSERT INTO orders (id, user_id, total) VALUES (nextval('order_ids'), 31, 0)", Err("0A000")),
        ("SELECT nextval('s') FROM users WHERE id = 31", Err("0A000")),
        ("INSERT INTO orders (id, user_id, total) VALUES (gen_random_uuid(), 31, 0)", Ok(single(31))),
        // Session, transaction, DDL, utility.
        ("BEGIN", Ok(Route::NoShard)),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", Ok(Route::NoShard)),
        ("COMMIT", Ok(Route::NoShard)),
        ("ROLLBACK TO SAVEPOINT sp1", Ok(Route::NoShard)),
        ("SET search_path TO public", Ok(Route::NoShard)),
        ("SET shardgate.shard = 's1'", Ok(Route::NoShard)),
        ("PREPARE TRANSACTION 'tx1'", Ok(Route::NoShard)),
        ("COMMIT PREPARED 'tx1'", Ok(Route::NoShard)),
        ("CREATE TABLE t (id bigint primary key)", Ok(Route::Broadcast)),
        ("CREATE INDEX ON users (name)", Ok(Route::Broadcast)),
        ("ALTER TABLE users ADD COLUMN age int", Ok(Route::Broadcast)),
        // Uniqueness a shard can only check against its own rows: refused
        // on sharded tables unless the sharding key is part of it.
        ("CREATE TABLE users (id bigint PRIMARY KEY, email text UNIQUE)", Err("0A000")),
        ("CREATE TABLE users (id bigint, email text, PRIMARY KEY (email))", Err("0A000")),
        ("CREATE TABLE users (id bigint PRIMARY KEY, email text, UNIQUE (id, email))", Ok(Route::Broadcast)),
        ("CREATE TABLE orders (id bigint, user_id bigint, PRIMARY KEY (user_id, id))", Ok(Route::Broadcast)),
        ("CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint)", Err("0A000")),
        ("CREATE UNIQUE INDEX users_email ON users (email)", Err("0A000")),
        ("CREATE UNIQUE INDEX users_email ON users (lower(email))", Err("0A000")),
        ("CREATE UNIQUE INDEX users_email ON users (id, lower(email))", Ok(Route::Broadcast)),
        ("CREATE UNIQUE INDEX countries_name ON countries (name)", Ok(Route::Broadcast)),
        ("ALTER TABLE users ADD CONSTRAINT users_email UNIQUE (email)", Err("0A000")),
        ("ALTER TABLE users ADD COLUMN email text UNIQUE", Err("0A000")),
        ("ALTER TABLE public.users ADD PRIMARY KEY (id)", Ok(Route::Broadcast)),
        ("CREATE TABLE countries (code text PRIMARY KEY, name text UNIQUE)", Ok(Route::Broadcast)),
        ("DROP TABLE IF EXISTS t", Ok(Route::Broadcast)),
        ("TRUNCATE orders", Ok(Route::Broadcast)),
        ("VACUUM (VERBOSE, ANALYZE) users", Ok(Route::Broadcast)),
        ("ANALYZE users", Ok(Route::Broadcast)),
        ("DO $$ BEGIN PERFORM 1; END $$", Ok(Route::Broadcast)),
        ("REINDEX TABLE users", Ok(Route::Broadcast)),
        ("COMMENT ON TABLE users IS 'people'", Ok(Route::Broadcast)),
        ("SHOW search_path", Ok(Route::AnyOne)),
        ("EXPLAIN SELECT * FROM users WHERE id = 31", Ok(single(31))),
        ("COPY users TO STDOUT", Ok(Route::All)),
        ("COPY countries FROM STDIN", Ok(Route::Broadcast)),
        ("COPY users FROM STDIN", Ok(Route::All)),
        ("COPY users FROM '/tmp/users.csv'", Err("0A000")),
        ("BEGIN; UPDATE users SET name = 'x' WHERE id = 32; COMMIT", Ok(single(32))),
        ("FROBNICATE everything", Err("42601")),
        // Hints.
        ("/* shardgate: shard=s1 */ SELECT * FROM users", Ok(Route::Single(1))),
        ("/* shardgate: shard=s1 */ SELECT * FROM users a JOIN users b ON a.name = b.name", Ok(Route::Single(1))),
        ("/* shardgate: shard=nope */ SELECT 1", Err("22023")),
        ("/* shardgate: key=42 */ SELECT * FROM orders", Ok(single(42))),
    ];
    let n = check(&r, &cases, &[]);
    assert!(n >= 60, "{n} statements");
}

#[test]
fn parameters_text_and_binary() {
    let typed = router(DEMO, &[("users", KeyType::Int), ("orders", KeyType::Int)]);
    let untyped = router(DEMO, &[]);
    let sql = "SELECT * FROM users WHERE id = $1";
    assert_eq!(
        typed.route_with_params(sql, &[Param::text("42")]),
        Ok(single(42))
    );
    assert_eq!(
        typed.route_with_params(sql, &[Param::binary(&42i32.to_be_bytes(), None)]),
        Ok(single(42))
    );
    assert_eq!(
        untyped.route_with_params(sql, &[Param::binary(&42i64.to_be_bytes(), Some(oid::INT8))]),
        Ok(single(42))
    );
    assert_eq!(
        untyped.route_with_params(sql, &[Param::typed_text("42", oid::INT4)]),
        Ok(single(42))
    );
    // A parameter is read in the type its Parse declared, whatever the SQL
    // casts it to (SQLAlchemy 2.1 + psycopg 3.3: binary int2 for `$1::BIGINT`).
    for (bytes, declared) in [
        (42i16.to_be_bytes().to_vec(), oid::INT2),
        (42i32.to_be_bytes().to_vec(), oid::INT4),
        (42i64.to_be_bytes().to_vec(), oid::INT8),
    ] {
        for router in [&typed, &untyped] {
            assert_eq!(
                router.route_with_params(
                    "SELECT * FROM users WHERE id = $1::BIGINT",
                    &[Param::binary(&bytes, Some(declared))]
                ),
                Ok(single(42)),
                "declared {declared}"
            );
        }
    }
    assert_eq!(
        typed.route_with_params(
            "INSERT INTO users (id, name) VALUES ($1::BIGINT, $2::VARCHAR), ($3::BIGINT, $4::VARCHAR)",
            &[
                Param::binary(&1i16.to_be_bytes(), Some(oid::INT2)),
                Param::text("a"),
                Param::binary(&2i32.to_be_bytes(), Some(oid::INT4)),
                Param::text("b")
            ]
        ),
        Ok(split(&[1, 2]))
    );
    // Out of the declared type's range: refused as Postgres would.
    assert!(typed
        .route_with_params(
            "SELECT * FROM users WHERE id = $1::bigint",
            &[Param::typed_text("70000", oid::INT2)]
        )
        .is_err());
    // Untyped text for a hash key: refused, never guessed.
    let err = untyped
        .route_with_params(sql, &[Param::text("42")])
        .unwrap_err();
    assert_eq!(err.sqlstate(), "42P18");
    assert!(err.to_string().contains("users.id"), "{err}");
    assert_eq!(
        untyped
            .route_with_params("SELECT * FROM users WHERE id = '42'", &[])
            .map_err(|e| e.sqlstate()),
        Err("42P18")
    );
    // A cast in the SQL types the parameter.
    assert_eq!(
        untyped.route_with_params(
            "SELECT * FROM users WHERE id = $1::bigint",
            &[Param::text("42")]
        ),
        Ok(single(42))
    );
    assert_eq!(
        untyped
            .route_with_params(sql, &[])
            .map_err(|e| e.sqlstate()),
        Err("42P02")
    );
    assert_eq!(
        untyped.route_with_params(sql, &[Param::null()]),
        Ok(Route::AnyOne)
    );
    assert_eq!(
        typed.route_with_params(
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4)",
            &[
                Param::text("1"),
                Param::text("a"),
                Param::text("2"),
                Param::text("b")
            ]
        ),
        Ok(split(&[1, 2]))
    );
    assert_eq!(
        typed.route_with_params(
            "SELECT * FROM users WHERE id = ANY($1)",
            &[Param::text("{1,2}")]
        ),
        Ok(Route::All)
    );
    assert_eq!(
        typed.route_with_params(
            "SELECT * FROM users WHERE id IN ($1, $2)",
            &[Param::text("1"), Param::text("1")]
        ),
        Ok(single(1))
    );
    // The cache holds the analysis, not the parameters.
    assert_eq!(
        typed.route_with_params(sql, &[Param::text("43")]),
        Ok(single(43))
    );
}

#[test]
fn range_and_list_map_statements() {
    let r = router(RANGES, &[]);
    let cases: Vec<Case> = vec![
        (
            "SELECT * FROM events WHERE day = '2025-06-01'",
            Ok(Route::Single(0)),
        ),
        (
            "SELECT * FROM events WHERE day = DATE '2026-02-01'",
            Ok(Route::Single(1)),
        ),
        (
            "SELECT * FROM events WHERE day = '2026-08-01'::date",
            Ok(Route::Single(2)),
        ),
        (
            "SELECT * FROM events WHERE day >= '2026-02-01' AND day < '2026-03-01'",
            Ok(Route::Single(1)),
        ),
        (
            "SELECT * FROM events WHERE day >= '2026-02-01'",
            Ok(Route::Shards(BTreeSet::from([1, 2]))),
        ),
        (
            "SELECT * FROM events WHERE day < '2026-01-01'",
            Ok(Route::Single(0)),
        ),
        (
            "SELECT * FROM events WHERE '2026-01-01' > day",
            Ok(Route::Single(0)),
        ),
        (
            "SELECT * FROM events WHERE day BETWEEN '2025-12-01' AND '2026-01-15'",
            Ok(Route::Shards(BTreeSet::from([0, 1]))),
        ),
        ("SELECT * FROM events", Ok(Route::All)),
        (
            "SELECT * FROM tickets WHERE id = 1500000",
            Ok(Route::Single(1)),
        ),
        (
            "SELECT * FROM tickets WHERE id < 1000000",
            Ok(Route::Single(0)),
        ),
        (
            "SELECT * FROM tickets WHERE id BETWEEN 999999 AND 1000001",
            Ok(Route::Shards(BTreeSet::from([0, 1]))),
        ),
        ("SELECT * FROM tickets WHERE id = -5", Err("22023")),
        ("SELECT * FROM tickets WHERE id = $1", Err("42P02")),
        (
            "SELECT * FROM customers WHERE region = 'us'",
            Ok(Route::Single(1)),
        ),
        (
            "SELECT * FROM customers WHERE region IN ('eu', 'apac')",
            Ok(Route::Shards(BTreeSet::from([0, 2]))),
        ),
        (
            "SELECT * FROM customers WHERE region = 'mars'",
            Ok(Route::Single(2)),
        ),
        ("SELECT * FROM unlisted_table", Ok(Route::AnyOne)),
        (
            "INSERT INTO unlisted_table (a) VALUES (1)",
            Ok(Route::Broadcast),
        ),
        (
            "SELECT * FROM events e JOIN tickets t ON t.id = e.id",
            Err("0A000"),
        ),
        (
            "INSERT INTO events (day, what) VALUES ('2025-01-01', 'a'), ('2026-09-09', 'b')",
            Ok(Route::Split {
                rows_by_shard: BTreeMap::from([(0, vec![0]), (2, vec![1])]),
            }),
        ),
    ];
    check(&r, &cases, &[]);
    assert_eq!(
        r.route_with_params(
            "SELECT * FROM tickets WHERE id = $1",
            &[Param::text("2500000")]
        ),
        Ok(Route::Single(2))
    );
}

#[test]
fn cache_hits_skip_parsing_and_stay_bounded() {
    let config = Config::parse(Path::new("t.yaml"), DEMO, &|_| None).expect("map");
    let r = Router::with_capacity(ShardMap::from_config(&config).expect("map"), 3);
    for i in 0..10 {
        let _ = r.route(&format!("SELECT * FROM users WHERE id = {i}"));
        assert!(r.cached() <= 3);
    }
    let a = r.analyze("SELECT 1").expect("ok");
    let b = r.analyze("SELECT 1").expect("ok");
    assert!(std::sync::Arc::ptr_eq(&a, &b), "second call is a cache hit");
}

const TENANTS: &str = r#"
listen: 127.0.0.1:6432
auth: trust
users:
  - { name: app }
shards:
  - { name: small, url: "postgres://postgres@127.0.0.1:5433/saas" }
  - { name: big1,  url: "postgres://postgres@127.0.0.1:5434/saas" }
  - { name: big2,  url: "postgres://postgres@127.0.0.1:5435/saas" }
functions:
  by_tenant:
    kind: tenant
    mode: database
    tenants: { acme: big1, globex: big2, initech: small }
    default: small
tables:
  invoices: { key: tenant_id, function: by_tenant }
  projects: { key: tenant_id, function: by_tenant }
  plans:    { replicated: true }
default_table: error
"#;

/// Database-per-tenant maps: the tenant id names the shard; unknown tenants
/// go to the default; tenants' tables are co-located.
#[test]
fn tenant_map_statements() {
    let r = router(TENANTS, &[]);
    let cases: Vec<Case> = vec![
        ("SELECT * FROM invoices WHERE tenant_id = 'acme'", Ok(Route::Single(1))),
        ("SELECT * FROM invoices WHERE tenant_id = 'globex' AND total > 10", Ok(Route::Single(2))),
        ("SELECT * FROM invoices WHERE tenant_id = 'newco'", Ok(Route::Single(0))),
        ("SELECT * FROM invoices WHERE tenant_id IN ('acme', 'globex')", Ok(Route::from_set([1, 2].into_iter().collect()))),
        ("INSERT INTO projects (tenant_id, name) VALUES ('globex', 'x')", Ok(Route::Single(2))),
        ("SELECT * FROM invoices i JOIN projects p ON p.tenant_id = i.tenant_id WHERE i.tenant_id = 'initech'", Ok(Route::Single(0))),
        ("SELECT * FROM invoices i JOIN plans pl ON pl.id = i.plan_id WHERE i.tenant_id = 'acme'", Ok(Route::Single(1))),
        ("SELECT count(*) FROM invoices", Ok(Route::All)),
    ];
    check(&r, &cases, &[]);
    let bound = [Param::text("globex")];
    check(
        &r,
        &[(
            "SELECT * FROM invoices WHERE tenant_id = $1",
            Ok(Route::Single(2)),
        )],
        &bound,
    );
}

/// Replicated writes that leave a column to a per-shard default (the proxy
/// reads the defaults from the catalog; given here as the catalog would).
#[test]
fn replicated_writes_leaving_per_shard_defaults() {
    let config = Config::parse(Path::new("test.yaml"), DEMO, &|_| None).expect("valid map");
    let map = ShardMap::from_config(&config)
        .expect("map")
        .with_columns(HashMap::from([(
            "countries".to_string(),
            vec!["ID".to_string(), "code".to_string(), "name".to_string()],
        )]))
        .with_per_shard_defaults(HashMap::from([(
            "countries".to_string(),
            vec![(
                "ID".to_string(),
                "nextval('countries_id_seq'::regclass)".to_string(),
            )],
        )]));
    let r = Router::new(map);
    let cases: Vec<Case> = vec![
        (
            "INSERT INTO countries (code, name) VALUES ('FR', 'France')",
            Err("0A000"),
        ),
        (
            "INSERT INTO countries (\"ID\", code, name) VALUES (1, 'FR', 'France')",
            Ok(Route::Broadcast),
        ),
        (
            "INSERT INTO countries VALUES (1, 'FR', 'France')",
            Ok(Route::Broadcast),
        ),
        (
            "INSERT INTO countries VALUES (DEFAULT, 'FR', 'France')",
            Err("0A000"),
        ),
        (
            "INSERT INTO countries (\"ID\", code) VALUES (1, 'FR'), (DEFAULT, 'DE')",
            Err("0A000"),
        ),
        (
            "INSERT INTO countries (\"ID\", code) SELECT 1, 'FR'",
            Ok(Route::Broadcast),
        ),
        (
            "COPY countries (\"ID\", code, name) FROM STDIN",
            Ok(Route::Broadcast),
        ),
        ("COPY countries (code, name) FROM STDIN", Err("0A000")),
        ("UPDATE countries SET name = 'x'", Ok(Route::Broadcast)),
    ];
    check(&r, &cases, &[]);
}

/// Literals in type modifiers (`varchar(10)`) make the literal-free form of
/// a statement unparseable; its tokenizer guess must not stand in for the
/// full analysis, which refuses a unique key without the sharding key and a
/// temporary table over several shards (both went through as plain DDL).
#[test]
fn checks_hold_for_statements_with_literals_in_type_modifiers() {
    let r = router(DEMO, &[("users", KeyType::Int)]);
    for sql in [
        "CREATE TABLE users (id bigint, email varchar(100) UNIQUE)",
        "CREATE TEMP TABLE scratch (a varchar(1), b numeric(10, 2))",
    ] {
        let mut memo = shardgate::router::Memo::default();
        let memo_route = r.route_statement_memo(&mut memo, sql, &[]);
        assert_eq!(
            memo_route.map_err(|e| e.sqlstate()),
            Err("0A000"),
            "{sql} (session path)"
        );
        assert_eq!(
            r.route_statement(sql, &[]).map_err(|e| e.sqlstate()),
            Err("0A000"),
            "{sql}"
        );
    }
    // The same statements without refusable parts still run everywhere.
    let mut memo = shardgate::router::Memo::default();
    assert_eq!(
        r.route_statement_memo(
            &mut memo,
            "CREATE TABLE notes (id bigint, body varchar(100))",
            &[]
        )
        .map(|(route, _)| route),
        Ok(Route::Broadcast)
    );
}
