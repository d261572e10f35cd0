//! Signals an operator sends to `shardgate serve`.

mod support;

use std::time::Duration;

use support::process::ChildProxy;
use support::wire::{self, Wire};

/// SIGHUP (`systemctl reload`) used to end the process — the default
/// action — and drop every client. Until live reload exists it is logged
/// and ignored: connected clients and new ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_serving_and_says_reload_is_not_built() {
    let db = support::fresh_db("signals_sighup");
    let proxy = ChildProxy::start(&support::shard_map(&db, "")).await;
    let mut before = Wire::connect(proxy.port, "app", &db).await;
    assert_eq!(before.exchange(&wire::query("SELECT 1"), 1).await.len(), 4);
    // SAFETY: kill(2) with a pid of a child this test started.
    let sent = unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0, "SIGHUP sent");
    let mut logged = false;
    for _ in 0..50 {
        logged = proxy.log_text().contains("SIGHUP: live reload");
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "no warning logged:\n{}", proxy.log_text());
    let answers = before.exchange(&wire::query("SELECT 2"), 1).await;
    assert_eq!(
        answers.iter().map(|m| m.tag as char).collect::<String>(),
        "TDCZ",
        "the connected client goes on"
    );
    let mut after = Wire::connect(proxy.port, "app", &db).await;
    assert_eq!(after.exchange(&wire::query("SELECT 3"), 1).await.len(), 4);
}
