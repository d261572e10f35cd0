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
//! Usage: `tokio-floor LISTEN_ADDR BACKEND_ADDR`.

use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(backend)) = (args.get(1).cloned(), args.get(2).cloned()) else {
        eprintln!("usage: tokio-floor LISTEN_ADDR BACKEND_ADDR");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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
