//! Failed logins (issue #15-7): an unknown user goes through the same
//! SCRAM or md5 exchange as a known one with a wrong password and gets the
//! same 28P01, so user names cannot be enumerated; failures are counted in
//! `shardgate_client_auth_failures_total{reason}` and logged, rate-limited,
//! with the client's address and never a password.

mod support;

use support::process::ChildProxy;
use support::wire::Wire;

/// Sends one frontend message.
async fn send(login: &mut Wire, tag: u8, body: &[u8]) {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    login.send(&out).await;
}

/// What a client can observe of a failed SCRAM login: each message's tag
/// and authentication code, the salt and iteration count offered, and the
/// final error's code and message.
#[derive(Debug, PartialEq, Eq)]
struct ScramTrace {
    steps: Vec<String>,
    salt: String,
    iterations: String,
    error: (Option<String>, Option<String>),
}

async fn failed_scram(port: u16, user: &str, db: &str) -> ScramTrace {
    let mut login = Wire::begin(port, user, db).await;
    let mut steps = Vec::new();
    let offer = login.recv().await.expect("AuthenticationSASL");
    steps.push(format!("{} {:?}", char::from(offer.tag), &offer.body[..4]));
    let nonce = "rOprNGfwEbeRWgbNEkqO";
    let first = format!("n,,n=,r={nonce}");
    let mut initial = b"SCRAM-SHA-256\0".to_vec();
    initial.extend_from_slice(&(first.len() as u32).to_be_bytes());
    initial.extend_from_slice(first.as_bytes());
    send(&mut login, b'p', &initial).await;
    let server_first = login.recv().await.expect("AuthenticationSASLContinue");
    steps.push(format!(
        "{} {:?}",
        char::from(server_first.tag),
        &server_first.body[..4]
    ));
    let text = String::from_utf8_lossy(&server_first.body[4..]).into_owned();
    let field = |key: &str| {
        text.split(',')
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    let (combined, salt, iterations) = (field("r="), field("s="), field("i="));
    assert!(combined.starts_with(nonce), "{text}");
    // A proof for some other password: 32 bytes, base64.
    let proof = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let last = format!("c=biws,r={combined},p={proof}");
    send(&mut login, b'p', last.as_bytes()).await;
    let error = login.recv().await.expect("ErrorResponse");
    steps.push(char::from(error.tag).to_string());
    assert!(login.recv().await.is_none(), "the connection closes");
    ScramTrace {
        steps,
        salt,
        iterations,
        error: (error.error_code(), error.error_message()),
    }
}

#[tokio::test]
async fn an_unknown_user_fails_scram_exactly_like_a_wrong_password() {
    let db = support::fresh_db("auth_unknown_scram");
    let extra = "auth: scram-sha-256\nusers:\n  - { name: app, password: \"pw-app\" }\n";
    let server = support::start_proxy(&support::shard_map(&db, extra)).await;
    let port = server.address.port();

    let known = failed_scram(port, "app", &db).await;
    let unknown = failed_scram(port, "mallory", &db).await;
    assert_eq!(known.steps, vec!["R [0, 0, 0, 10]", "R [0, 0, 0, 11]", "E"]);
    assert_eq!(unknown.steps, known.steps, "the same message sequence");
    assert_eq!(unknown.iterations, known.iterations);
    assert_eq!(
        unknown.salt.len(),
        known.salt.len(),
        "a salt of the same size"
    );
    assert_eq!(
        known.error,
        (
            Some("28P01".to_string()),
            Some("password authentication failed for user \"app\"".to_string())
        )
    );
    assert_eq!(
        unknown.error,
        (
            Some("28P01".to_string()),
            Some("password authentication failed for user \"mallory\"".to_string())
        )
    );
    // Repeated attempts look the same, as a real user's do.
    assert_eq!(failed_scram(port, "mallory", &db).await, unknown);
    assert_eq!(failed_scram(port, "app", &db).await.salt, known.salt);
    assert_ne!(failed_scram(port, "eve", &db).await.salt, unknown.salt);

    let text = server.shared.metrics.render();
    for line in [
        "shardgate_client_auth_failures_total{reason=\"unknown_user\"} 3",
        "shardgate_client_auth_failures_total{reason=\"wrong_password\"} 2",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    server.stop().await;
}

/// A failed md5 login: the messages' tags and codes, and the error.
async fn failed_md5(port: u16, user: &str, db: &str) -> (Vec<String>, Option<String>) {
    let mut login = Wire::begin(port, user, db).await;
    let request = login.recv().await.expect("AuthenticationMD5Password");
    let mut steps = vec![format!(
        "{} {:?} salt {}",
        char::from(request.tag),
        &request.body[..4],
        request.body.len() - 4
    )];
    send(&mut login, b'p', b"md50123456789abcdef0123456789abcdef\0").await;
    let error = login.recv().await.expect("ErrorResponse");
    steps.push(format!(
        "{} {:?}",
        char::from(error.tag),
        error.error_code()
    ));
    (steps, error.error_message())
}

#[tokio::test]
async fn an_unknown_user_fails_md5_exactly_like_a_wrong_password() {
    let db = support::fresh_db("auth_unknown_md5");
    let extra = "auth: md5\nusers:\n  - { name: app, password: \"pw-md5\" }\n";
    let server = support::start_proxy(&support::shard_map(&db, extra)).await;
    let port = server.address.port();
    let (known, known_text) = failed_md5(port, "app", &db).await;
    let (unknown, unknown_text) = failed_md5(port, "mallory", &db).await;
    assert_eq!(known, vec!["R [0, 0, 0, 5] salt 4", "E Some(\"28P01\")"]);
    assert_eq!(unknown, known);
    assert_eq!(
        unknown_text.as_deref(),
        Some("password authentication failed for user \"mallory\"")
    );
    assert_eq!(
        known_text.as_deref(),
        Some("password authentication failed for user \"app\"")
    );
    server.stop().await;
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn failures_are_logged_once_a_second_with_the_client_and_counted() {
    let db = support::fresh_db("auth_failure_log");
    let extra = "auth: scram-sha-256\nusers:\n  - { name: app, password: \"pw-secret-app\" }\n";
    let proxy = ChildProxy::start(&support::shard_map(&db, extra)).await;
    for _ in 0..5 {
        failed_scram(proxy.port, "mallory", &db).await;
    }
    failed_scram(proxy.port, "app", &db).await;
    let lines = |log: String| -> Vec<String> {
        strip_ansi(&log)
            .lines()
            .filter(|l| l.contains("client login failed"))
            .map(str::to_string)
            .collect()
    };
    let logged = lines(proxy.log_text());
    assert_eq!(
        logged.len(),
        2,
        "one line per reason within a second: {logged:#?}"
    );
    let unknown = logged
        .iter()
        .find(|l| l.contains("unknown_user"))
        .expect("a line for the unknown user");
    assert!(
        unknown.contains("client=127.0.0.1:") && unknown.contains("mallory"),
        "{unknown}"
    );
    assert!(logged.iter().any(|l| l.contains("wrong_password")));
    assert!(
        !proxy.log_text().contains("pw-secret-app"),
        "no password in the log"
    );
    // A second later the next failure is logged with the count left out.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    failed_scram(proxy.port, "mallory", &db).await;
    let logged = lines(proxy.log_text());
    assert_eq!(logged.len(), 3, "{logged:#?}");
    assert!(logged[2].contains("suppressed=4"), "{}", logged[2]);
    assert_eq!(
        proxy
            .metric("shardgate_client_auth_failures_total{reason=\"unknown_user\"}")
            .await,
        6.0
    );
    assert_eq!(
        proxy
            .metric("shardgate_client_auth_failures_total{reason=\"wrong_password\"}")
            .await,
        1.0
    );
}
