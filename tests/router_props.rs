//! Property tests: the route of a key lookup equals the sharding function's
//! shard, and analysis never panics on arbitrary input.

use std::path::Path;

use proptest::prelude::*;
use shardgate::config::Config;
use shardgate::router::{Param, Route, Router, ShardMap};
use shardgate::sharding::{KeyValue, ShardingFunction};

const MAP: &str = r#"
listen: 127.0.0.1:6432
auth: trust
users:
  - { name: app }
shards:
  - { name: s0, url: "postgres://postgres@127.0.0.1:5433/app" }
  - { name: s1, url: "postgres://postgres@127.0.0.1:5434/app" }
  - { name: s2, url: "postgres://postgres@127.0.0.1:5435/app" }
  - { name: s3, url: "postgres://postgres@127.0.0.1:5436/app" }
functions:
  by_user: { kind: hash }
tables:
  users:  { key: id, function: by_user }
  orders: { key: user_id, function: by_user }
  countries: { replicated: true }
default_table: replicated
"#;

fn router() -> Router {
    let config = Config::parse(Path::new("t.yaml"), MAP, &|_| None).expect("map");
    Router::new(ShardMap::from_config(&config).expect("map"))
}

proptest! {
    #[test]
    fn key_lookup_routes_like_the_function(k in any::<i64>()) {
        let r = router();
        let want = ShardingFunction::hash(4).unwrap().shard_for(&KeyValue::Int(k)).unwrap();
        let sql = format!("SELECT * FROM users WHERE id = {k}");
        // i64::MIN is written as -9223372036854775808: a unary minus on a literal
        // that does not fit i64 by itself; the router must still read it.
        prop_assert_eq!(r.route(&sql), Ok(Route::Single(want)));
        let joined = format!("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE o.user_id = {k}");
        prop_assert_eq!(r.route(&joined), Ok(Route::Single(want)));
        let bound = r.route_with_params(
            "SELECT * FROM users WHERE id = $1",
            &[Param::binary(&k.to_be_bytes(), Some(20))],
        );
        prop_assert_eq!(bound, Ok(Route::Single(want)));
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        let r = router();
        let _ = r.route(&s);
        let _ = r.route_with_params(&s, &[Param::text(&s), Param::binary(s.as_bytes(), None)]);
    }

    #[test]
    fn sql_like_text_never_panics(
        parts in proptest::collection::vec(prop_oneof![
            Just("SELECT"), Just("*"), Just("FROM"), Just("users"), Just("orders o"), Just("WHERE"),
            Just("id"), Just("="), Just("$1"), Just("'x'"), Just("42"), Just("IN"), Just("("), Just(")"),
            Just(","), Just("AND"), Just("OR"), Just("JOIN"), Just("ON"), Just("o.user_id"), Just("u.id"),
            Just("INSERT INTO"), Just("VALUES"), Just("UPDATE"), Just("SET"), Just("DELETE"), Just("WITH"),
            Just("AS"), Just("::uuid"), Just("::bigint"), Just("BETWEEN"), Just("ANY"), Just("ARRAY["), Just("]"),
            Just("/* shardgate: key=1 */"), Just(";"), Just("UNION"), Just("EXISTS"), Just("NULL"),
        ], 0..30)
    ) {
        let sql = parts.join(" ");
        let r = router();
        let _ = r.route_with_params(&sql, &[Param::text("1"), Param::null()]);
    }
}

proptest! {
    #[test]
    fn hint_and_setting_parsers_never_panic(s in "\\PC{0,60}") {
        let _ = shardgate::router::hints::leading_hint(&s);
        let _ = shardgate::router::hints::shardgate_setting(&s);
        let _ = shardgate::router::hints::shardgate_setting(&format!("set {s}"));
        let _ = shardgate::router::hints::shardgate_setting(&format!("reset shardgate{s}"));
    }
}
