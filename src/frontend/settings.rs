//! Session settings (`SET name = value`) in transaction pooling.
//!
//! A client's backend changes between transactions, so shardgate remembers
//! the session-level settings the client made and makes any backend that
//! serves it match: each backend carries the signature of the settings it
//! has; when it differs from the session's, a hidden `RESET ALL; SET …` is
//! pipelined in front of the client's statement (no extra round trip).
//! A client that never SETs anything on a pristine backend pays nothing.
//!
//! Settings made inside a transaction block count only if it commits, as in
//! Postgres; `SET LOCAL` never outlives its transaction and is ignored.

use std::hash::{Hash, Hasher};

/// One SET/RESET found in a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set { name: String, value: String },
    Reset { name: String },
    ResetAll,
}

#[derive(Debug, Default, Clone)]
pub struct SessionSettings {
    /// Committed settings, sorted by name, value as SQL text.
    settings: Vec<(String, String)>,
    /// Changes of the current transaction block, applied at COMMIT.
    pending: Vec<Change>,
    /// Changes of the statement batch in flight (autocommit), applied when it succeeds.
    in_flight: Vec<Change>,
    signature: u64,
}

impl SessionSettings {
    /// Settings from the startup packet (application_name, options=-c …).
    pub fn from_startup(settings: &[(String, String)]) -> SessionSettings {
        let mut session = SessionSettings::default();
        for (name, value) in settings {
            session.apply(&Change::Set {
                name: name.to_ascii_lowercase(),
                value: quote_literal(value),
            });
        }
        session.recompute();
        session
    }

    /// The signature of the committed settings; 0 means none (a pristine backend).
    pub fn signature(&self) -> u64 {
        self.signature
    }

    /// SQL that turns a backend with other settings into this session's.
    pub fn replay_sql(&self) -> String {
        // RESET ALL leaves `role` alone (GUC_NO_RESET_ALL), so reset it too.
        let mut sql = String::from("RESET ALL; RESET ROLE;");
        for (name, value) in &self.settings {
            sql.push_str(&format!(" SET SESSION {name} = {value};"));
        }
        sql
    }

    /// Sets (or with `None`, resets) a setting for the session at once, for
    /// settings shardgate makes itself (a tenant's `search_path`).
    /// `value` is SQL text (a quoted literal or identifier).
    pub fn set_now(&mut self, name: &str, value: Option<String>) {
        let change = match value {
            Some(value) => Change::Set {
                name: name.to_string(),
                value,
            },
            None => Change::Reset {
                name: name.to_string(),
            },
        };
        self.apply(&change);
        self.recompute();
    }

    /// The value `name` has for statements sent now (in-flight and
    /// uncommitted changes included), as SQL text.
    pub fn latest(&self, name: &str) -> Option<&str> {
        for change in self.in_flight.iter().rev().chain(self.pending.iter().rev()) {
            match change {
                Change::Set { name: n, value } if n == name => return Some(value),
                Change::Reset { name: n } if n == name => return None,
                Change::ResetAll => return None,
                _ => {}
            }
        }
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Notes the SETs a statement about to run contains.
    pub fn statement_sent(&mut self, sql: &str) {
        if !mentions_set(sql) {
            return;
        }
        self.in_flight.extend(changes_in(sql));
    }

    /// The statements in flight finished; `status` is the ReadyForQuery
    /// status, `failed` whether any of them failed, `ended` the transaction
    /// end (`COMMIT`/`ROLLBACK` tag) seen among them.
    pub fn batch_done(&mut self, previous: u8, status: u8, failed: bool, ended: Option<bool>) {
        let changes = std::mem::take(&mut self.in_flight);
        if changes.is_empty() && ended.is_none() {
            return;
        }
        match (previous, status) {
            // Autocommit statement(s), no transaction around them.
            (b'I', b'I') if ended.is_none() && !failed => {
                for change in &changes {
                    self.apply(change);
                }
            }
            (b'I', b'I') if ended.is_none() => {}
            // Inside a transaction: remember until it ends.
            (_, b'T') => self.pending.extend(changes),
            (_, b'E') => self.pending.clear(),
            // The transaction ended in this batch.
            (_, b'I') => {
                let committed = ended.unwrap_or(false) && !failed;
                let pending = std::mem::take(&mut self.pending);
                if committed {
                    for change in pending.iter().chain(&changes) {
                        self.apply(change);
                    }
                }
            }
            _ => {}
        }
        self.recompute();
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Set { name, value } => match self
                .settings
                .binary_search_by(|(n, _)| n.as_str().cmp(name))
            {
                Ok(i) => self.settings[i].1 = value.clone(),
                Err(i) => self.settings.insert(i, (name.clone(), value.clone())),
            },
            Change::Reset { name } => self.settings.retain(|(n, _)| n != name),
            Change::ResetAll => self.settings.clear(),
        }
    }

    fn recompute(&mut self) {
        self.signature = if self.settings.is_empty() {
            0
        } else {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            self.settings.hash(&mut hasher);
            hasher.finish() | 1
        };
    }
}

/// Cheap pre-check so statements without SET/RESET cost one scan.
fn mentions_set(sql: &str) -> bool {
    sql.as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"set"))
}

/// The session-level SET/RESET statements in a (possibly multi-statement) text.
pub fn changes_in(sql: &str) -> Vec<Change> {
    split_statements(sql)
        .into_iter()
        .filter_map(parse_change)
        .collect()
}

fn parse_change(statement: &str) -> Option<Change> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let first = words.first()?.to_ascii_lowercase();
    if first == "reset" {
        let name = words.get(1)?.to_ascii_lowercase();
        if name == "all" {
            return Some(Change::ResetAll);
        }
        if name.starts_with("shardgate.") || name == "session" {
            return None;
        }
        return Some(Change::Reset { name });
    }
    if first == "discard" && words.get(1).is_some_and(|w| w.eq_ignore_ascii_case("all")) {
        return Some(Change::ResetAll);
    }
    if first != "set" {
        return None;
    }
    let mut rest = statement.trim_start()[3..].trim_start();
    let lower = rest.to_ascii_lowercase();
    if lower.starts_with("local ")
        || lower.starts_with("transaction")
        || lower.starts_with("constraints")
    {
        return None;
    }
    if lower.starts_with("session ") {
        rest = rest[8..].trim_start();
        let lower = rest.to_ascii_lowercase();
        if lower.starts_with("characteristics") || lower.starts_with("authorization") {
            return None;
        }
    }
    let lower = rest.to_ascii_lowercase();
    if let Some(value) = lower.strip_prefix("time zone ") {
        let value = rest[rest.len() - value.len()..].trim();
        return Some(Change::Set {
            name: "timezone".to_string(),
            value: value.to_string(),
        });
    }
    // `SET ROLE x` is the `role` setting: tracked and replayed like any
    // other, so a pooled backend never keeps another client's role.
    if let Some(value) = lower.strip_prefix("role ") {
        let value = rest[rest.len() - value.len()..].trim();
        return Some(Change::Set {
            name: "role".to_string(),
            value: value.to_string(),
        });
    }
    if let Some(value) = lower.strip_prefix("schema ") {
        let value = rest[rest.len() - value.len()..].trim();
        return Some(Change::Set {
            name: "search_path".to_string(),
            value: value.to_string(),
        });
    }
    if let Some(value) = lower.strip_prefix("names ") {
        let value = rest[rest.len() - value.len()..].trim();
        return Some(Change::Set {
            name: "client_encoding".to_string(),
            value: value.to_string(),
        });
    }
    let split = rest.find(|c: char| c == '=' || c.is_whitespace())?;
    let name = rest[..split].trim().to_ascii_lowercase();
    if name.starts_with("shardgate.") {
        return None;
    }
    let mut value = rest[split..].trim_start();
    if let Some(v) = value.strip_prefix('=') {
        value = v.trim_start();
    } else if value.len() > 3 && value[..3].eq_ignore_ascii_case("to ") {
        value = value[3..].trim_start();
    } else {
        return None;
    }
    if value.eq_ignore_ascii_case("default") {
        return Some(Change::Reset { name });
    }
    Some(Change::Set {
        name,
        value: value.trim().to_string(),
    })
}

/// Splits on `;` outside quotes, comments and dollar quotes.
fn split_statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' | b'"' => {
                let quote = bytes[i];
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += 1;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                if let Some(len) = sql[i + 1..].find('$') {
                    let tag = &sql[i..i + len + 2];
                    if tag[1..tag.len() - 1]
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '_')
                    {
                        if let Some(end) = sql[i + tag.len()..].find(tag) {
                            i += tag.len() + end + tag.len() - 1;
                        }
                    }
                }
            }
            b';' => {
                statements.push(sql[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    let last = sql.get(start..).unwrap_or("").trim();
    if !last.is_empty() {
        statements.push(last);
    }
    statements
}

/// A SQL string literal for a startup-packet value.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_forms() {
        assert_eq!(
            changes_in("SET search_path = a, b; set session statement_timeout to '5s'; SET LOCAL x = 1; RESET work_mem"),
            vec![
                Change::Set { name: "search_path".into(), value: "a, b".into() },
                Change::Set { name: "statement_timeout".into(), value: "'5s'".into() },
                Change::Reset { name: "work_mem".into() },
            ]
        );
        assert_eq!(
            changes_in("set time zone 'UTC'"),
            vec![Change::Set {
                name: "timezone".into(),
                value: "'UTC'".into()
            }]
        );
        assert_eq!(changes_in("select 'set x = 1; y'"), vec![]);
        assert_eq!(changes_in("RESET ALL"), vec![Change::ResetAll]);
        assert_eq!(
            changes_in("SET ROLE reporting"),
            vec![Change::Set {
                name: "role".into(),
                value: "reporting".into()
            }]
        );
        assert_eq!(
            changes_in("RESET ROLE"),
            vec![Change::Reset {
                name: "role".into()
            }]
        );
        assert_eq!(
            changes_in("SET SCHEMA 'x'"),
            vec![Change::Set {
                name: "search_path".into(),
                value: "'x'".into()
            }]
        );
        assert_eq!(
            changes_in("SET x TO DEFAULT"),
            vec![Change::Reset { name: "x".into() }]
        );
    }

    #[test]
    fn transaction_semantics() {
        let mut s = SessionSettings::default();
        assert_eq!(s.signature(), 0);
        s.statement_sent("SET a = 1");
        s.batch_done(b'I', b'I', false, None);
        let one = s.signature();
        assert_ne!(one, 0);
        // In a block that rolls back: not kept.
        s.statement_sent("BEGIN; SET a = 2");
        s.batch_done(b'I', b'T', false, None);
        s.statement_sent("ROLLBACK");
        s.batch_done(b'T', b'I', false, Some(false));
        assert_eq!(s.signature(), one);
        // In a block that commits: kept.
        s.statement_sent("BEGIN; SET a = 3");
        s.batch_done(b'I', b'T', false, None);
        s.statement_sent("COMMIT");
        s.batch_done(b'T', b'I', false, Some(true));
        assert_ne!(s.signature(), one);
        assert!(s.replay_sql().contains("SET SESSION a = 3;"));
        // A failed autocommit SET changes nothing.
        let before = s.signature();
        s.statement_sent("SET a = 4");
        s.batch_done(b'I', b'I', true, None);
        assert_eq!(s.signature(), before);
    }
}
