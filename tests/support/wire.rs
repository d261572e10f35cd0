//! A raw Postgres protocol client for tests: builds frontend messages by
//! hand and reads backend messages as (tag, body), so tests can compare the
//! exact message streams of Postgres and shardgate.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// A comparable rendering: error/notice fields that differ between
    /// servers by build (file, line, routine) are dropped; pids are masked.
    pub fn normalized(&self) -> String {
        match self.tag {
            b'E' | b'N' => {
                let fields: Vec<String> = fields(&self.body)
                    .into_iter()
                    .filter(|(k, _)| !matches!(k, b'F' | b'L' | b'R'))
                    .map(|(k, v)| format!("{}={}", k as char, v))
                    .collect();
                format!("{}[{}]", self.tag as char, fields.join("|"))
            }
            // NotificationResponse: pid of the notifying backend differs.
            b'A' => format!(
                "A[{:?}]",
                String::from_utf8_lossy(&self.body[4.min(self.body.len())..])
            ),
            b'K' => "K[..]".to_string(),
            // RowDescription: table OIDs differ between databases.
            b'T' => format!("T{:?}", row_description_without_table_oids(&self.body)),
            _ => format!(
                "{}{:?}",
                self.tag as char,
                String::from_utf8_lossy(&self.body)
            ),
        }
    }

    pub fn error_code(&self) -> Option<String> {
        if self.tag != b'E' {
            return None;
        }
        fields(&self.body)
            .into_iter()
            .find(|(k, _)| *k == b'C')
            .map(|(_, v)| v)
    }

    pub fn error_message(&self) -> Option<String> {
        fields(&self.body)
            .into_iter()
            .find(|(k, _)| *k == b'M')
            .map(|(_, v)| v)
    }
}

fn row_description_without_table_oids(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let count = i16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    for _ in 0..count {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        let fixed = &rest[end + 1..end + 19];
        // table oid (4) | column (2) | type oid (4) | size (2) | modifier (4) | format (2)
        out.push(format!("{name}:{:?}", &fixed[4..]));
        rest = &rest[end + 19..];
    }
    out
}

pub fn fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((kind, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out
}

pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub key: (i32, i32),
    pub parameters: Vec<(String, String)>,
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    frame(b'Q', &body)
}

pub fn parse(name: &str, sql: &str, types: &[i32]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    frame(b'P', &body)
}

/// Bind with text-format parameters (None = NULL) and text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'B', &body)
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frame(b'D', &body)
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frame(b'C', &body)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    frame(b'E', &body)
}

pub fn sync() -> Vec<u8> {
    frame(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    frame(b'H', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    frame(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    frame(b'c', &[])
}

pub fn copy_fail(reason: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, reason);
    frame(b'f', &body)
}

pub fn terminate() -> Vec<u8> {
    frame(b'X', &[])
}

pub fn startup_packet(user: &str, database: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    cstr(&mut body, "user");
    cstr(&mut body, user);
    cstr(&mut body, "database");
    cstr(&mut body, database);
    for (k, v) in extra {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn cancel_packet(pid: i32, secret: i32) -> Vec<u8> {
    let mut out = 16i32.to_be_bytes().to_vec();
    out.extend_from_slice(&80877102i32.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    out
}

const TIMEOUT: Duration = Duration::from_secs(20);

/// Reads until the server closes (or 5 s pass: a failure); everything it sent.
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server neither answered nor closed within 5 s"),
        }
    }
}

impl Wire {
    /// Connects and sends a startup packet; the answers are the caller's.
    pub async fn begin(port: u16, user: &str, database: &str) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut wire = Wire {
            stream,
            buf: Vec::new(),
            key: (0, 0),
            parameters: Vec::new(),
        };
        wire.send(&startup_packet(user, database, &[])).await;
        wire
    }

    /// Connects and completes a trust-auth startup.
    pub async fn connect(port: u16, user: &str, database: &str) -> Wire {
        let mut wire = Wire::begin(port, user, database).await;
        loop {
            let msg = wire.recv().await.expect("startup answer");
            match msg.tag {
                b'R' => {
                    assert_eq!(&msg.body[..4], &[0, 0, 0, 0], "trust auth expected");
                }
                b'S' => {
                    let parts: Vec<&[u8]> = msg.body.split(|b| *b == 0).collect();
                    wire.parameters.push((
                        String::from_utf8_lossy(parts[0]).into_owned(),
                        String::from_utf8_lossy(parts[1]).into_owned(),
                    ));
                }
                b'K' => {
                    let pid =
                        i32::from_be_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
                    let secret =
                        i32::from_be_bytes([msg.body[4], msg.body[5], msg.body[6], msg.body[7]]);
                    wire.key = (pid, secret);
                }
                b'Z' => return wire,
                b'E' => panic!("startup failed: {}", msg.normalized()),
                _ => {}
            }
        }
    }

    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next backend message, or None at EOF.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let body = self.buf[5..len + 1].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..len + 1);
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for the server")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads messages until `count` ReadyForQuery messages have arrived.
    pub async fn until_ready(&mut self, count: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < count {
            let msg = self
                .recv()
                .await
                .expect("connection closed before ReadyForQuery");
            if msg.tag == b'Z' {
                seen += 1;
            }
            out.push(msg);
        }
        out
    }

    /// Sends `bytes` and returns the answers through `ready` ReadyForQuery messages.
    pub async fn exchange(&mut self, bytes: &[u8], ready: usize) -> Vec<Msg> {
        self.send(bytes).await;
        self.until_ready(ready).await
    }
}

/// The text values of a DataRow body (None: NULL).
#[allow(dead_code)]
pub fn fields_of_row(body: &[u8]) -> Vec<Option<String>> {
    row_cells(body)
        .into_iter()
        .map(|c| c.map(|v| String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// The values of a DataRow body, decoded by the proxy's own DataRow codec.
#[allow(dead_code)]
pub fn row_cells(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let row = shardgate::executor::fanout::wire::Row::decode(bytes::Bytes::copy_from_slice(body))
        .expect("a well-formed DataRow");
    (0..row.len())
        .map(|i| row.cell(i).map(<[u8]>::to_vec))
        .collect()
}
