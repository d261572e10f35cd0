//! Ending a group of shard transactions that must not commit.

use futures::future::join_all;
use tokio_postgres::Client;

use super::control::literal;

/// Where one participant of a group stands when the group is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending<'a> {
    /// No transaction to end.
    Idle,
    /// An open transaction block.
    Open,
    /// Prepared under this gid.
    Prepared(&'a str),
}

impl Pending<'_> {
    /// `ROLLBACK`, `ROLLBACK PREPARED '<gid>'`, or nothing to send.
    pub fn rollback_sql(self) -> Option<String> {
        match self {
            Pending::Idle => None,
            Pending::Open => Some("ROLLBACK".to_owned()),
            Pending::Prepared(gid) => Some(format!("ROLLBACK PREPARED {}", literal(gid))),
        }
    }
}

/// One shared best-effort abort of a control-plane group: rolls every participant back concurrently and returns the failures as (index, statement, error).
pub async fn roll_back_clients<'a>(
    participants: impl IntoIterator<Item = (&'a Client, Pending<'a>)>,
) -> Vec<(usize, String, tokio_postgres::Error)> {
    let jobs = participants
        .into_iter()
        .enumerate()
        .filter_map(|(i, (client, pending))| Some((i, client, pending.rollback_sql()?)))
        .map(|(i, client, sql)| async move {
            let result = client.batch_execute(&sql).await;
            result.err().map(|e| (i, sql, e))
        });
    join_all(jobs).await.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_statements() {
        assert_eq!(Pending::Idle.rollback_sql(), None);
        assert_eq!(Pending::Open.rollback_sql().as_deref(), Some("ROLLBACK"));
        assert_eq!(
            Pending::Prepared("sg_1_0_s'0").rollback_sql().as_deref(),
            Some("ROLLBACK PREPARED 'sg_1_0_s''0'")
        );
    }
}
