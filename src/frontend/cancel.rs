//! CancelRequest routing: shardgate hands clients its own (pid, secret) and
//! remembers which backend each client's query is running on right now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::stop::{SessionStop, StopWhen};
use crate::config::Config;
use crate::server::Shared;

/// The backend a client is currently attached to: shard index, backend pid, secret.
pub type CancelTarget = Option<(usize, i32, i32)>;

/// The backends to cancel, and the map whose shard indexes they carry
/// (`None`: the proxy's own).
pub type CancelTargets = (Option<Arc<Config>>, Vec<(usize, i32, i32)>);

/// Shared between a session (which updates it on attach/detach) and the
/// registry; also carries requests to end the session (see `stop`).
#[derive(Debug, Default, Clone)]
pub struct CancelSlot(
    Arc<Mutex<CancelTarget>>,
    Arc<Mutex<Vec<(usize, i32, i32)>>>,
    Arc<SessionStop>,
);

impl CancelSlot {
    /// Where the session hears a shutdown or a KILL.
    pub fn stop(&self) -> &SessionStop {
        &self.2
    }

    pub fn set(&self, target: CancelTarget) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = target;
        }
    }

    pub fn get(&self) -> CancelTarget {
        self.0.lock().map(|slot| *slot).unwrap_or(None)
    }

    /// The backends of a statement running on several shards (empty when
    /// none is): a cancel goes to each.
    pub fn set_fanout(&self, targets: Vec<(usize, i32, i32)>) {
        if let Ok(mut slot) = self.1.lock() {
            *slot = targets;
        }
    }

    /// Every backend a cancel request must reach now.
    pub fn all(&self) -> Vec<(usize, i32, i32)> {
        let mut targets = self.1.lock().map(|t| t.clone()).unwrap_or_default();
        if let Some(single) = self.get() {
            if !targets.contains(&single) {
                targets.push(single);
            }
        }
        targets
    }
}

/// Forward a client's CancelRequest to every backend its session is using
/// now, and return once each shard has closed the cancel connection (it
/// does so after signalling the backend) or the bounded wait ran out.
pub async fn forward(shared: &Shared, pid: i32, secret: i32) {
    let (shards, targets) = shared.cancels.targets_in(pid, secret);
    let shards = shards.as_deref().unwrap_or(&shared.config);
    for (shard, backend_pid, backend_secret) in targets {
        let Some(shard) = shards.shards.get(shard) else {
            continue;
        };
        let sent = crate::backend::send_cancel(shard, backend_pid, backend_secret);
        if let Err(error) = Box::pin(sent).await {
            tracing::warn!(%error, shard = %shard.name, "forwarding a cancel request failed");
        }
    }
}

/// A registered session: its secret, its slot, the map whose shard indexes
/// its slot holds when that is not the proxy's own (a session of another
/// database has a one-shard map of its own), and who it is (the admin
/// console's `SHOW CLIENTS`).
#[derive(Debug)]
struct Registered {
    secret: i32,
    slot: CancelSlot,
    shards: Option<Arc<Config>>,
    client: ClientInfo,
}

/// Who a client is, for the admin console.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    /// The peer address (`None` when the socket could not say).
    pub addr: Option<std::net::SocketAddr>,
    pub connected_at: Option<std::time::SystemTime>,
    pub application_name: String,
}

/// One row of [`CancelRegistry::clients`].
#[derive(Debug, Clone)]
pub struct ClientRow {
    /// The client's BackendKeyData pid: its id in the console.
    pub id: i32,
    pub client: ClientInfo,
    /// The shard index of the backend it holds now, if any.
    pub shard: Option<usize>,
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Registered>>,
}

impl CancelRegistry {
    pub fn register(&self, pid: i32, secret: i32, slot: CancelSlot) {
        self.register_client(pid, secret, slot, None, ClientInfo::default());
    }

    /// Registers a session with who it is; `shards`: the map its slot's
    /// shard indexes refer to when not the proxy's own (the plain pooler of
    /// another database).
    pub fn register_client(
        &self,
        pid: i32,
        secret: i32,
        slot: CancelSlot,
        shards: Option<Arc<Config>>,
        client: ClientInfo,
    ) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                pid,
                Registered {
                    secret,
                    slot,
                    shards,
                    client,
                },
            );
        }
    }

    /// Asks every registered session to end (graceful shutdown: `when` is
    /// between transactions, then now); returns how many there were.
    pub fn stop_all(&self, when: StopWhen) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        for registered in sessions.values() {
            registered.slot.stop().request(when);
        }
        sessions.len()
    }

    /// Asks the session with `id` (its BackendKeyData pid) to end now (the
    /// console's KILL); false when there is none.
    pub fn stop_one(&self, id: i32) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        match sessions.get(&id) {
            Some(registered) => {
                registered.slot.stop().request(StopWhen::Now);
                true
            }
            None => false,
        }
    }

    /// Every registered client, by id.
    pub fn clients(&self) -> Vec<ClientRow> {
        let Ok(sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        let mut rows: Vec<ClientRow> = sessions
            .iter()
            .map(|(id, registered)| ClientRow {
                id: *id,
                client: registered.client.clone(),
                shard: registered.slot.get().map(|(shard, _, _)| shard),
            })
            .collect();
        rows.sort_by_key(|row| row.id);
        rows
    }

    pub fn unregister(&self, pid: i32) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&pid);
        }
    }

    /// Every backend to cancel for a CancelRequest, if pid and secret match.
    pub fn targets(&self, pid: i32, secret: i32) -> Vec<(usize, i32, i32)> {
        self.targets_in(pid, secret).1
    }

    /// [`targets`](Self::targets) and the map their shard indexes refer to
    /// (`None`: the proxy's own).
    pub fn targets_in(&self, pid: i32, secret: i32) -> CancelTargets {
        let Ok(sessions) = self.sessions.lock() else {
            return (None, Vec::new());
        };
        match sessions.get(&pid) {
            Some(registered) if registered.secret == secret => {
                (registered.shards.clone(), registered.slot.all())
            }
            _ => (None, Vec::new()),
        }
    }

    /// The backend to cancel for a CancelRequest, if pid and secret match.
    pub fn target(&self, pid: i32, secret: i32) -> CancelTarget {
        let sessions = self.sessions.lock().ok()?;
        match sessions.get(&pid) {
            Some(registered) if registered.secret == secret => registered.slot.get(),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_secret_cancels_nothing() {
        let registry = CancelRegistry::default();
        let slot = CancelSlot::default();
        registry.register(7, 42, slot.clone());
        slot.set(Some((1, 1234, 99)));
        assert_eq!(registry.target(7, 42), Some((1, 1234, 99)));
        assert_eq!(registry.target(7, 41), None);
        registry.unregister(7);
        assert_eq!(registry.target(7, 42), None);
    }
}
