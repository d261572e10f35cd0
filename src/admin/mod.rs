//! The admin console: a client that logs in to the admin database (`admin:`
//! in the map; `shardgate` by default) as one of the admin users talks to
//! shardgate itself, with PgBouncer's console conventions so existing habits
//! and exporters work: `SHOW POOLS`, `SHOW DATABASES`, `SHOW STATS`, `SHOW
//! CONFIG`, `SHOW VERSION`, `SHOW LISTS`, shardgate's own `SHOW SHARDS` and
//! `SHOW ROUTE <sql>`, and `RELOAD`. Simple protocol only, as PgBouncer's.
//! It needs no shard: it answers with every shard down.

mod commands;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::Cluster;
use crate::frontend::startup::ClientStartup;
use crate::protocol::messages;
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::{frame_length, tag};

/// Console statements are short; a longer message ends the connection.
const MAX_CONSOLE_MESSAGE: usize = 1 << 20;

/// Serves one console client until it leaves.
pub async fn serve(cluster: Arc<Cluster>, client: Box<ClientStartup>) {
    let ClientStartup {
        io: mut socket,
        read_buf: mut input,
        user,
        ..
    } = *client;
    let mut out = BytesMut::new();
    loop {
        // Every complete message in the buffer first.
        loop {
            let total = match frame_length(&input, MAX_CONSOLE_MESSAGE) {
                Ok(Some(total)) if input.len() >= total => total,
                Ok(_) => break,
                Err(error) => {
                    ProxyError::fatal("08P01", error.to_string()).encode(&mut out);
                    let _ = socket.write_all(&out).await;
                    return;
                }
            };
            let frame = input.split_to(total);
            match frame[0] {
                tag::TERMINATE => return,
                tag::QUERY => match messages::query_text(&frame[5..]) {
                    Ok(sql) => {
                        commands::run(&cluster, &user, sql, &mut out).await;
                        synth::ready_for_query(&mut out, b'I');
                    }
                    Err(error) => {
                        ProxyError::fatal("08P01", error.to_string()).encode(&mut out);
                        let _ = socket.write_all(&out).await;
                        return;
                    }
                },
                tag::SYNC => synth::ready_for_query(&mut out, b'I'),
                tag::FLUSH => {}
                _ => ProxyError::error(
                    "0A000",
                    "the shardgate admin console speaks the simple query protocol only",
                )
                .with_hint(
                    "psql and PgBouncer exporters do; in a driver, use its simple-query call",
                )
                .encode(&mut out),
            }
        }
        if !out.is_empty() {
            if socket.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        input.reserve(4096);
        match socket.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
