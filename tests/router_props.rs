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

/// Fixed SQL-like text between literals, including the characters that
/// change what counts as a literal.
fn sql_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(" = ".to_string()),
        8 => Just(", ".to_string()),
        4 => Just(" AND k < ".to_string()),
        1 => Just(" ".to_string()),
        1 => Just("SELECT ".to_string()),
        1 => Just("t1".to_string()),
        1 => Just("-".to_string()),
        1 => Just("--".to_string()),
        1 => Just("\n".to_string()),
        1 => Just("/*".to_string()),
        1 => Just("*/".to_string()),
        1 => Just("'".to_string()),
        1 => Just("E".to_string()),
        1 => Just("$".to_string()),
        1 => Just("$1".to_string()),
        1 => Just(".".to_string()),
        1 => Just("\"".to_string()),
    ]
}

/// What fills a literal's place: literals of every kind the extractor
/// knows, and things that only look like one.
fn literal_like() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "-?[0-9]{1,20}",
        6 => "'[a-z$' ]{0,4}'",
        1 => "0[0-9]{0,3}",
        1 => Just("5.5".to_string()),
        1 => Just("x".to_string()),
        1 => Just("--5".to_string()),
        1 => Just("''".to_string()),
    ]
}

/// The literals in one place of a template and of a text: mostly of the
/// same kind (what the router meets), sometimes anything.
fn literal_pair() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        4 => ("-?[0-9]{1,20}", "-?[0-9]{1,20}"),
        4 => ("'[a-z$' ]{0,4}'", "'[a-z$' ]{0,4}'"),
        2 => (literal_like(), literal_like()),
    ]
}

proptest! {
    // About one case in fourteen has a text the template matches.
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Reading a text's literals against the last text's shape gives what a
    /// full extraction of it gives, or declines (then the router extracts).
    #[test]
    fn literals_matched_against_a_template_equal_extracted_ones(
        shape in proptest::collection::vec((sql_piece(), literal_pair()), 1..6),
        tail in sql_piece(),
    ) {
        use shardgate::router::normalize::{extract_literals, match_literals, max_param};
        // The same fixed text around different literals.
        let template: String = shape.iter().map(|(fixed, (a, _))| format!("{fixed}{a}")).collect::<String>() + &tail;
        let text: String = shape.iter().map(|(fixed, (_, b))| format!("{fixed}{b}")).collect::<String>() + &tail;
        let (mut out, mut spans) = (String::new(), Vec::new());
        let first = max_param(&template);
        if extract_literals(&template, first, &mut out, &mut spans).is_some() {
            if let Some(matched) = match_literals(&template, &spans, first, &text) {
                let (mut full_out, mut full_spans) = (String::new(), Vec::new());
                let full = extract_literals(&text, max_param(&text), &mut full_out, &mut full_spans);
                prop_assert_eq!(Some(matched), full, "template {:?} text {:?}", template, text);
                prop_assert_eq!(&full_out, &out);
            }
        }
    }
}
