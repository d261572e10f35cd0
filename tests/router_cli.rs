//! `shardgate route` prints the decision and why.

use std::process::Command;

use shardgate::sharding::{KeyValue, ShardingFunction};

fn route(args: &[&str]) -> (String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("route")
        .arg("--config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/shard-config/demo.yaml"
        ))
        .args(args)
        .output()
        .expect("run shardgate");
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.success(),
    )
}

#[test]
fn route_command_explains() {
    let s42 = ShardingFunction::hash(3)
        .unwrap()
        .shard_for(&KeyValue::Int(42))
        .unwrap();
    let (text, ok) =
        route(&["SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 42"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("route: single shard s{s42}")),
        "{text}"
    );
    assert!(text.contains("u.id = 42"), "{text}");
    assert!(text.contains("function by_user (hash)"), "{text}");

    let (text, ok) = route(&["SELECT * FROM users WHERE name = 'x'"]);
    assert!(ok, "{text}");
    assert!(text.contains("no key: fan-out to all 3 shards"), "{text}");

    let (text, ok) = route(&["SELECT * FROM users WHERE id = $1", "--param", "42::bigint"]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("single shard s{s42}")), "{text}");

    let (text, ok) = route(&["SELECT * FROM users WHERE id = $1", "--param", "42"]);
    assert!(!ok);
    assert!(
        text.contains("42P18") && text.contains("users.id"),
        "{text}"
    );

    let (text, ok) = route(&["SELECT * FROM nowhere"]);
    assert!(!ok);
    assert!(text.contains("42P01") && text.contains("users"), "{text}");

    let (text, ok) = route(&["INSERT INTO countries (code) VALUES ('FR')"]);
    assert!(ok, "{text}");
    assert!(text.contains("broadcast"), "{text}");
}
