//! The router: SQL text against a shard map (users/orders co-located by
//! hash, items by modulo, events by date range, customers by list,
//! countries replicated), as the session routes a statement: leading hints,
//! literal extraction (`normalize`), the sqlparser analysis with its
//! tokenizer fallback, COPY's own grammar (`copy_grammar`), the route with
//! and without bound parameters, and the session memo.
//!
//! Properties: nothing panics; analysing the same text twice gives the same
//! analysis; the session memo routes a text as the uncached path does, and
//! again the same on a memo hit; a COPY statement rewritten for sqlparser is
//! still a COPY statement to `copy_grammar`.
#![no_main]

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shardgate::config::Config;
use shardgate::router::hints::{leading_hint, shardgate_setting};
use shardgate::router::{analyze, copy_grammar, normalize, Memo, Param, Router, ShardMap};
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
  by_sku: { kind: modulo }
  by_day:
    kind: range
    type: date
    ranges:
      - { to: "2026-01-01", shard: s0 }
      - { from: "2026-01-01", to: "2026-07-01", shard: s1 }
      - { from: "2026-07-01", shard: s2 }
  by_region:
    kind: list
    values: { eu: s0, us: s1, apac: s2 }
    default: s2
tables:
  users:     { key: id, function: by_user }
  orders:    { key: user_id, function: by_user }
  items:     { key: sku, function: by_sku }
  events:    { key: day, function: by_day }
  customers: { key: region, function: by_region }
  countries: { replicated: true }
default_table: error
"#;

fn map() -> &'static ShardMap {
    static MAP_CELL: OnceLock<ShardMap> = OnceLock::new();
    MAP_CELL.get_or_init(|| {
        let config = Config::parse(Path::new("fuzz.yaml"), MAP, &|_| None).expect("valid map");
        let types: HashMap<String, KeyType> = [
            ("users", KeyType::Int),
            ("orders", KeyType::Int),
            ("items", KeyType::Int),
            ("events", KeyType::Date),
            ("customers", KeyType::Text),
        ]
        .into_iter()
        .map(|(t, k)| (t.to_string(), k))
        .collect();
        ShardMap::from_config(&config)
            .expect("map")
            .with_key_types(types)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let map = map();

    let _ = leading_hint(sql);
    let _ = shardgate_setting(sql);
    let _ = normalize::max_param(sql);
    let (mut out, mut spans) = (String::new(), Vec::new());
    let _ = normalize::extract_literals(sql, 2, &mut out, &mut spans);
    if let Some(params) = normalize::extract_literals(sql, 0, &mut out, &mut spans) {
        // The text matched against its own shape reads the same literals.
        let again = normalize::match_literals(sql, &spans, 0, sql);
        if !sql.contains('$') {
            assert_eq!(again.as_ref(), Some(&params), "a text does not match its own shape");
        }
        // And against the first half of itself, it must not panic.
        let half = &sql[..sql.floor_char_boundary(sql.len() / 2)];
        let _ = normalize::match_literals(sql, &spans, 0, half);
    }

    let first = analyze(map, sql);
    let second = analyze(map, sql);
    assert_eq!(first, second, "two analyses of one text differ");
    if let Ok(analysis) = &first {
        let _ = analysis.route(map, &[]);
        let _ = analysis.route(
            map,
            &[Param::text("42"), Param::null(), Param::text("2026-03-01")],
        );
        let _ = analysis.route(
            map,
            &[Param::binary(&[0, 0, 0, 7], None), Param::text("eu")],
        );
    }

    let router = Router::new(map.clone());
    let plain = router.route_statement(sql, &[]);
    let mut memo = Memo::default();
    let memo_first = router.route_statement_memo(&mut memo, sql, &[]);
    let memo_hit = router.route_statement_memo(&mut memo, sql, &[]);
    assert_eq!(plain, memo_first, "the memo path routes differently");
    assert_eq!(memo_first, memo_hit, "a memo hit routes differently");
    let _ = router.route_with_params(sql, &[Param::text("1"), Param::text("x")]);
    let _ = router.statement_kind(sql);

    if let Some(rewritten) = copy_grammar::for_parser(sql) {
        let _ = analyze(map, &rewritten);
        assert!(
            copy_grammar::for_parser(&rewritten).is_some(),
            "copy_grammar rewrote {sql:?} into {rewritten:?}, which it does not read"
        );
    }
});
