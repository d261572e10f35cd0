//! A deliberately tiny HTTP/1.1 server for `GET /metrics` and `GET /healthz`.
//!
//! Hand-written on tokio rather than pulling in hyper: the proxy needs two
//! fixed GET routes, and a few hundred lines we control are cheaper than a
//! web stack in the dependency tree. Because it listens on a network port
//! it is written defensively:
//!
//! * a request head is limited to [`Limits::max_request_bytes`] (431 past it),
//! * the whole head must arrive within [`Limits::read_timeout`] of starting
//!   to wait for it (slowloris clients get 408 or are dropped), writes are
//!   bounded by [`Limits::write_timeout`] (clients that never read),
//! * at most [`Limits::max_connections`] connections are served at once;
//!   further ones wait in the listen backlog,
//! * parsing works on bytes and never indexes blindly, so no input panics.
//!
//! Keep-alive is supported (HTTP/1.1 default, HTTP/1.0 on request), which is
//! what Prometheus uses between scrapes. Requests carrying a body are
//! answered and then the connection is closed instead of skipping the body.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

use super::Metrics;

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bounds that keep slow or malicious clients from tying the server up.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted request head (request line + headers).
    pub max_request_bytes: usize,
    /// Time allowed from starting to wait for a request (including keep-alive
    /// idle time) until its head is complete.
    pub read_timeout: Duration,
    /// Time allowed for writing one response.
    pub write_timeout: Duration,
    /// Connections served concurrently.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_request_bytes: 8 * 1024,
            // Prometheus' default scrape_timeout is 10s; a scraper sends its
            // whole request at once, so this only ever cuts off stragglers.
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Why reading or parsing a request failed; decides the reply.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("connection closed")]
    Closed,
    #[error("request head not complete within the read timeout")]
    Timeout,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    Bad(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves `/metrics` and `/healthz` on `listener` until the future is
/// dropped (which also aborts connections in progress). `refresh` runs
/// before each `/metrics` render so scrape-time gauges (pool states,
/// backend_up) are current; it runs on a runtime worker and must be quick.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    refresh: impl Fn() + Send + Sync + 'static,
) {
    serve_with_limits(metrics, listener, refresh, Limits::default()).await;
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with_limits(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    refresh: impl Fn() + Send + Sync + 'static,
    limits: Limits,
) {
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(refresh);
    let max_connections = limits.max_connections.max(1);
    // A JoinSet, so dropping `serve` also ends its connections.
    let mut connections = JoinSet::new();
    loop {
        if connections.len() >= max_connections {
            connections.join_next().await;
            continue;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    let refresh = refresh.clone();
                    connections.spawn(async move {
                        if let Err(error) = connection(stream, &metrics, &*refresh, limits).await {
                            tracing::debug!(%peer, %error, "metrics connection ended");
                        }
                    });
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A parsed request head; only what routing and connection handling need.
#[derive(Debug)]
struct Request<'a> {
    method: &'a [u8],
    path: &'a [u8],
    keep_alive: bool,
}

/// Serves requests on one connection until it closes or must be closed.
async fn connection(
    mut stream: TcpStream,
    metrics: &Metrics,
    refresh: &(dyn Fn() + Send + Sync),
    limits: Limits,
) -> Result<(), RequestError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let head_len = match read_head(&mut stream, &mut buf, limits).await {
            Ok(len) => len,
            Err(RequestError::Closed) => return Ok(()),
            Err(error) => {
                let status = match &error {
                    RequestError::Timeout => Status::RequestTimeout,
                    RequestError::TooLarge(_) => Status::HeaderTooLarge,
                    RequestError::Bad(_) => Status::BadRequest,
                    RequestError::Closed | RequestError::Io(_) => return Err(error),
                };
                let response = Reply::CLOSE.status(status);
                write_response(&mut stream, &response, limits).await?;
                linger_close(stream).await;
                return Err(error);
            }
        };
        let (response, keep_alive) = match parse_head(&buf[..head_len]) {
            Ok(request) => {
                let response = route(&request, metrics, refresh);
                (response, request.keep_alive)
            }
            Err(error) => {
                tracing::debug!(%error, "bad metrics request");
                (Reply::CLOSE.status(Status::BadRequest), false)
            }
        };
        write_response(&mut stream, &response, limits).await?;
        if !keep_alive {
            linger_close(stream).await;
            return Ok(());
        }
        // Keep pipelined bytes that followed this request.
        buf.drain(..head_len);
    }
}

/// Reads until `buf` holds a complete request head; returns its length
/// (including the blank line). Leading empty lines are skipped (RFC 9112 §2.2).
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> Result<usize, RequestError> {
    let deadline = Instant::now() + limits.read_timeout;
    let mut chunk = [0u8; 2048];
    loop {
        let leading = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.drain(..leading);
        if let Some(end) = head_end(buf) {
            if end > limits.max_request_bytes {
                return Err(RequestError::TooLarge(limits.max_request_bytes));
            }
            return Ok(end);
        }
        if buf.len() >= limits.max_request_bytes {
            return Err(RequestError::TooLarge(limits.max_request_bytes));
        }
        // Answer non-HTTP bytes (a TLS hello, a Postgres startup packet)
        // right away instead of waiting for a blank line that never comes.
        check_method_prefix(buf)?;
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return Err(RequestError::Closed),
            Err(_) => return Err(RequestError::Timeout),
            Ok(Ok(0)) if buf.is_empty() => return Err(RequestError::Closed),
            Ok(Ok(0)) => return Err(RequestError::Bad("connection closed mid-request")),
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Err(error)) => return Err(error.into()),
        }
    }
}

/// End of the head: index just past `\r\n\r\n` (or the lenient `\n\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut previous_newline = false;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\n' if previous_newline => return Some(i + 1),
            b'\n' => previous_newline = true,
            b'\r' => {}
            _ => previous_newline = false,
        }
    }
    None
}

/// RFC 9110 token characters (method and header names).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Fails if what arrived so far cannot be the start of a request line.
fn check_method_prefix(buf: &[u8]) -> Result<(), RequestError> {
    for &b in buf {
        if b == b' ' {
            return Ok(());
        }
        if !is_token(b) {
            return Err(RequestError::Bad("not an HTTP request"));
        }
    }
    Ok(())
}

/// Splits a head into lines without their `\r\n` / `\n`.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    value.get(start..end).unwrap_or_default()
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| trim(item).eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_head(head: &[u8]) -> Result<Request<'_>, RequestError> {
    let mut lines = lines(head);
    let request_line = lines.next().ok_or(RequestError::Bad("empty request"))?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Bad("malformed request line"));
    };
    if method.is_empty() || !method.iter().copied().all(is_token) {
        return Err(RequestError::Bad("malformed method"));
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(RequestError::Bad("malformed request target"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(RequestError::Bad("unsupported HTTP version")),
    };

    let mut close = false;
    let mut keep_alive_requested = false;
    let mut has_body = false;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(RequestError::Bad("obsolete header folding"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(RequestError::Bad("header without colon"))?;
        let (name, value) = line.split_at(colon);
        let value = trim(value.get(1..).unwrap_or_default());
        if name.is_empty() || !name.iter().copied().all(is_token) {
            return Err(RequestError::Bad("malformed header name"));
        }
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(RequestError::Bad("control character in header value"));
        }
        if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(value, "close");
            keep_alive_requested |= has_token(value, "keep-alive");
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(RequestError::Bad("malformed Content-Length"));
            }
            has_body |= value.iter().any(|&b| b != b'0');
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_body = true;
        }
    }

    // Origin form "/metrics?x" or absolute form "http://host/metrics".
    let target = match target.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => target.get(..end).unwrap_or_default(),
        None => target,
    };
    let path = match target.windows(3).position(|w| w == b"://") {
        Some(scheme_end) => {
            let authority = target.get(scheme_end + 3..).unwrap_or_default();
            match authority.iter().position(|&b| b == b'/') {
                Some(slash) => authority.get(slash..).unwrap_or_default(),
                None => b"/",
            }
        }
        None => target,
    };

    Ok(Request {
        method,
        path,
        // A body we do not read would be taken for the next request.
        keep_alive: !has_body && !close && (http11 || keep_alive_requested),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeaderTooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad request\n",
            Status::NotFound => "not found\n",
            Status::MethodNotAllowed => "method not allowed\n",
            Status::RequestTimeout => "request timeout\n",
            Status::HeaderTooLarge => "request header fields too large\n",
        }
    }
}

fn route(request: &Request<'_>, metrics: &Metrics, refresh: &(dyn Fn() + Send + Sync)) -> Vec<u8> {
    let head_only = request.method == b"HEAD";
    let get = request.method == b"GET" || head_only;
    let reply = Reply {
        keep_alive: request.keep_alive,
        head_only,
    };
    match request.path {
        b"/metrics" if get => {
            refresh();
            reply.build(Status::Ok, METRICS_CONTENT_TYPE, "", &metrics.render())
        }
        b"/healthz" if get => reply.build(Status::Ok, TEXT, "", "ok"),
        b"/metrics" | b"/healthz" => reply.build(
            Status::MethodNotAllowed,
            TEXT,
            "Allow: GET, HEAD\r\n",
            Status::MethodNotAllowed.body(),
        ),
        _ => reply.status(Status::NotFound),
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// How a response is framed for the request it answers.
#[derive(Clone, Copy, Debug)]
struct Reply {
    keep_alive: bool,
    /// HEAD: headers as for GET, no body.
    head_only: bool,
}

impl Reply {
    /// For errors detected before a request could be parsed.
    const CLOSE: Reply = Reply {
        keep_alive: false,
        head_only: false,
    };

    fn build(self, status: Status, content_type: &str, extra_headers: &str, body: &str) -> Vec<u8> {
        let mut response = format!(
            "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: {}\r\n{extra_headers}\r\n",
            status.line(),
            body.len(),
            if self.keep_alive {
                "keep-alive"
            } else {
                "close"
            },
        )
        .into_bytes();
        if !self.head_only {
            response.extend_from_slice(body.as_bytes());
        }
        response
    }

    /// A plain-text response whose body is the status line.
    fn status(self, status: Status) -> Vec<u8> {
        self.build(status, TEXT, "", status.body())
    }
}

async fn write_response(
    stream: &mut TcpStream,
    response: &[u8],
    limits: Limits,
) -> Result<(), RequestError> {
    match timeout(limits.write_timeout, stream.write_all(response)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RequestError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not read the response in time",
        ))),
    }
}

/// Closes politely: send FIN, then discard what the client still sends for
/// a moment. Closing a socket with unread input makes the kernel send RST,
/// which can destroy the response before the client reads it (e.g. after a
/// 431 for an oversized request).
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut budget: usize = 64 * 1024;
    let deadline = Instant::now() + Duration::from_secs(1);
    while budget > 0 {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<(String, String, bool), String> {
        parse_head(head.as_bytes())
            .map(|r| {
                (
                    String::from_utf8_lossy(r.method).into_owned(),
                    String::from_utf8_lossy(r.path).into_owned(),
                    r.keep_alive,
                )
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(("GET".into(), "/metrics".into(), true))
        );
        assert_eq!(
            parse("GET /metrics?name[]=x HTTP/1.0\r\n\r\n"),
            Ok(("GET".into(), "/metrics".into(), false))
        );
        assert_eq!(
            parse("GET http://h:9/healthz HTTP/1.0\nConnection: Keep-Alive\n\n"),
            Ok(("GET".into(), "/healthz".into(), true))
        );
        assert_eq!(
            parse("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").map(|r| r.2),
            Ok(false)
        );
        assert_eq!(
            parse("POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n").map(|r| r.2),
            Ok(false)
        );
    }

    #[test]
    fn rejects_garbage() {
        for head in [
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 x\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n folded\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nX: a\u{1}b\r\n\r\n",
        ] {
            assert!(parse(head).is_err(), "accepted {head:?}");
        }
        assert!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n").is_ok());
        assert!(check_method_prefix(b"\x16\x03\x01").is_err());
        assert!(check_method_prefix(b"\0\0\0\x08").is_err());
        assert!(check_method_prefix(b"GE").is_ok());
    }

    #[test]
    fn finds_head_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser, whatever they look like.
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = head_end(&bytes);
            let _ = check_method_prefix(&bytes);
            let _ = parse_head(&bytes);
        }

        /// HTTP-shaped input with arbitrary header bytes never panics either.
        #[test]
        fn parsing_http_shaped_input_never_panics(line in "[ -~\t\r\n\u{80}-\u{ff}]{0,200}") {
            let head = format!("GET /metrics HTTP/1.1\r\n{line}\r\n\r\n");
            let _ = parse_head(head.as_bytes());
        }
    }
}
