//! The floor of a tokio-based Postgres proxy, for `bench/pgbench.sh --floor`.
//!
//! A bare TCP forwarder on the runtime shardgate uses (tokio, one
//! current-thread runtime, one task per client, 8 KiB buffers, TCP_NODELAY):
//! each client gets its own backend connection and bytes are copied both
//! ways without looking at them. No pooling, no protocol, no routing, no
//! metrics. Its CPU per transaction is what any proxy built this way pays
//! before doing any work of its own; shardgate's CPU minus this is the cost
//! of shardgate's own code.
//!
//! Usage: `tokio-floor LISTEN_ADDR BACKEND_ADDR`, or shardgate's own
//! `serve --config FILE` (listen address and first shard's host:port read
//! from the map), so `SHARDGATE_BIN=… bench/profile.sh` can profile it.

use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let addresses = if args.get(1).map(String::as_str) == Some("serve") {
        args.get(3).and_then(|path| addresses_from_map(path))
    } else {
        args.get(1).cloned().zip(args.get(2).cloned())
    };
    let Some((listen, backend)) = addresses else {
        eprintln!("usage: tokio-floor LISTEN_ADDR BACKEND_ADDR | tokio-floor serve --config MAP");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokio-floor: runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(&listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("tokio-floor: listen on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(forward(client, backend.clone()));
        }
    })
}

/// `listen:` and the first shard URL's `@host:port` of a generated bench map.
fn addresses_from_map(path: &str) -> Option<(String, String)> {
    let map = std::fs::read_to_string(path).ok()?;
    let listen = map
        .lines()
        .find_map(|line| line.strip_prefix("listen:"))?
        .trim()
        .to_string();
    let after_at = &map[map.find("postgres://")?..];
    let host_port = &after_at[after_at.find('@')? + 1..];
    let end = host_port.find('/')?;
    Some((listen, host_port[..end].to_string()))
}

/// Copies bytes both ways until either side closes.
async fn forward(mut client: TcpStream, backend: String) {
    let Ok(mut server) = TcpStream::connect(&backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut from_client = vec![0u8; 8192];
    let mut from_server = vec![0u8; 8192];
    loop {
        tokio::select! {
            biased;
            read = server.read(&mut from_server) => match read {
                Ok(n) if n > 0 => {
                    if client.write_all(&from_server[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            read = client.read(&mut from_client) => match read {
                Ok(n) if n > 0 => {
                    if server.write_all(&from_client[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
        }
    }
}
