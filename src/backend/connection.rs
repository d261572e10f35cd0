//! One raw protocol connection to a shard.
//!
//! After startup the connection is a byte pipe: the proxy writes client
//! frames and reads backend frames without re-encoding them (ARCHITECTURE
//! §2.2), so the API is `write_all` / `read_buf`. Messages are decoded here
//! only during startup/authentication and while resetting a connection that
//! was returned inside a transaction. Backend input is never trusted: a
//! malformed or oversized message is an error, never a panic.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorResponseBody, Header, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::error::{fmt_elapsed, intern_sqlstate, BackendError, ServerError};
use super::prepared::PreparedCache;
use crate::config::ShardConfig;
use crate::protocol::messages::ErrorFields;

/// `application_name` sent to shards unless the caller passes its own:
/// empty, as Postgres reports it to a client that set none (a client's own
/// name is replayed on its backend; issue #14). The control plane's
/// connections name themselves (`shardgate-catalog`, `shardgate-2pc`, …).
pub const DEFAULT_APPLICATION_NAME: &str = "";

/// Largest message accepted while starting up or resetting. Real startup
/// messages are tiny; the bound stops a bogus length from making us
/// allocate gigabytes.
const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// TCP or Unix-domain socket; a host starting with `/` is a socket directory,
/// as in libpq.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Socket address as shown in messages: `host:port` or the socket path.
pub(crate) fn display_addr(host: &str, port: u16) -> String {
    if host.starts_with('/') {
        format!("{}/.s.PGSQL.{port}", host.trim_end_matches('/'))
    } else if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connect to `host:port` (TCP with TCP_NODELAY, since the proxy writes
/// whole frames and latency matters more than packet count) or to the Unix
/// socket in directory `host`.
pub(crate) async fn open_stream(host: &str, port: u16) -> io::Result<Stream> {
    if host.starts_with('/') {
        let path = display_addr(host, port);
        Ok(Stream::Unix(UnixStream::connect(path).await?))
    } else {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        detect_dead_peers(&tcp)?;
        Ok(Stream::Tcp(tcp))
    }
}

/// Idle time before the first keepalive probe, and the bound on data a
/// shard's host leaves unacknowledged.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// A shard host that vanishes (powered off, partitioned) sends no FIN:
/// without these a statement waiting on it hangs for the kernel's ~15
/// minutes of retransmissions, and an idle pooled connection to it looks
/// alive forever. Keepalive probes (after 30 s idle, every 10 s, 3 tries)
/// find idle ones; TCP_USER_TIMEOUT fails a connection whose sent data
/// stays unacknowledged for 30 s. A live server that is merely slow is not
/// affected (its kernel acknowledges): that is `pool.query_timeout`'s job.
fn detect_dead_peers(tcp: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(KEEPALIVE_IDLE))?;
    Ok(())
}

impl Stream {
    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An authenticated connection to one shard, ready for queries.
#[derive(Debug)]
pub struct BackendConnection {
    stream: Stream,
    shard_name: String,
    addr: String,
    shard_index: usize,
    server_parameters: Vec<(String, String)>,
    backend_pid: i32,
    secret_key: i32,
    created_at: Instant,
    transaction_status: u8,
    /// Bytes were written since the last `set_transaction_status`: the
    /// backend may still be answering, so the connection is not reusable
    /// as-is.
    awaiting_ready: bool,
    broken: bool,
    /// Bytes read past the first ReadyForQuery during startup; handed out by
    /// the first `read_buf` so nothing the server sent is lost.
    pending: BytesMut,
    prepared: PreparedCache,
    reset_counter: u64,
    /// When the last ReadyForQuery 'I' was seen (health checks skip fresh connections).
    idle_since: Instant,
    /// Signature of the session settings a front-end session replayed on
    /// this connection (0: none, as connected).
    settings_signature: u64,
}

/// What the startup/reset readers do with a message they cannot use.
fn unexpected(what: &str, message: &Message) -> String {
    let name = match message {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::RowDescription(_) => "RowDescription",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        _ => "an unexpected message",
    };
    format!("{name} {what}")
}

/// Take one complete backend message off the front of `buf`, if there is
/// one. Rejects lengths below 4 and above [`MAX_CONTROL_MESSAGE`] before
/// `Message::parse` sees them (it would reserve whatever length is claimed).
pub(crate) fn take_message(buf: &mut BytesMut) -> Result<Option<Message>, String> {
    let header = match Header::parse(buf) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let len = usize::try_from(header.len()).map_err(|_| "negative message length".to_owned())?;
    if len > MAX_CONTROL_MESSAGE {
        return Err(format!(
            "message '{}' of {len} bytes exceeds the {MAX_CONTROL_MESSAGE} byte limit",
            char::from(header.tag()).escape_default()
        ));
    }
    Message::parse(buf).map_err(|e| {
        format!(
            "malformed message '{}': {e}",
            char::from(header.tag()).escape_default()
        )
    })
}

/// Fields of an ErrorResponse/NoticeResponse, tolerating non-UTF-8 text
/// (startup errors come in the server's locale) but not a malformed body.
pub(crate) fn error_fields(body: &ErrorResponseBody) -> Result<ErrorFields<String>, String> {
    let fields: Vec<(u8, String)> = body
        .fields()
        .map(|field| {
            let text = String::from_utf8_lossy(field.value_bytes()).into_owned();
            Ok((field.type_(), text))
        })
        .collect()
        .map_err(|e| format!("malformed ErrorResponse: {e}"))?;
    Ok(ErrorFields::from_fields(fields))
}

/// Parameters of one connection attempt, borrowed for the duration.
struct Startup<'a> {
    shard: &'a ShardConfig,
    addr: &'a str,
    extra: &'a [(&'a str, &'a str)],
}

impl Startup<'_> {
    fn unavailable(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Unavailable {
            shard: self.shard.name.clone(),
            addr: self.addr.to_owned(),
            reason: reason.into(),
        }
    }

    fn io(&self, e: &io::Error) -> BackendError {
        let reason = match e.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            io::ErrorKind::ConnectionReset => "connection reset by the server".to_owned(),
            io::ErrorKind::UnexpectedEof => {
                "the server closed the connection during startup".to_owned()
            }
            _ => e.to_string(),
        };
        self.unavailable(reason)
    }

    fn protocol(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            shard: self.shard.name.clone(),
            addr: self.addr.to_owned(),
            reason: reason.into(),
        }
    }

    fn auth(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Auth {
            shard: self.shard.name.clone(),
            reason: reason.into(),
        }
    }

    fn password(&self) -> Result<&str, BackendError> {
        self.shard.password.as_deref().ok_or_else(|| {
            self.auth(format!(
                "the server asks for a password for user {:?} but the shard map has none",
                self.shard.user
            ))
        })
    }

    async fn read_message(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<Message, BackendError> {
        loop {
            if let Some(message) = take_message(buf).map_err(|e| self.protocol(e))? {
                return Ok(message);
            }
            buf.reserve(4096);
            let n = stream.read_buf(buf).await.map_err(|e| self.io(&e))?;
            if n == 0 {
                return Err(self.unavailable("the server closed the connection during startup"));
            }
        }
    }

    async fn send(&self, stream: &mut Stream, buf: &mut BytesMut) -> Result<(), BackendError> {
        let result = stream.write_all(buf).await;
        buf.clear();
        result.map_err(|e| self.io(&e))
    }

    /// StartupMessage, authentication, then everything up to the first
    /// ReadyForQuery.
    async fn run(&self) -> Result<BackendConnection, BackendError> {
        let shard = self.shard;
        let mut stream = open_stream(&shard.host, shard.port)
            .await
            .map_err(|e| self.io(&e))?;

        let mut params: Vec<(&str, &str)> = vec![
            ("user", shard.user.as_str()),
            ("database", shard.database.as_str()),
        ];
        for (k, v) in self.extra {
            if *k != "user" && *k != "database" {
                params.push((k, v));
            }
        }
        if !params.iter().any(|(k, _)| *k == "application_name") {
            params.push(("application_name", DEFAULT_APPLICATION_NAME));
        }
        let mut out = BytesMut::with_capacity(256);
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| self.auth(format!("cannot encode startup message: {e}")))?;
        self.send(&mut stream, &mut out).await?;

        let mut buf = BytesMut::with_capacity(8192);
        let mut scram: Option<ScramSha256> = None;
        let mut server_parameters: Vec<(String, String)> = Vec::new();
        let mut key = (0, 0);
        loop {
            match self.read_message(&mut stream, &mut buf).await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = self.password()?;
                    frontend::password_message(password.as_bytes(), &mut out)
                        .map_err(|e| self.auth(e.to_string()))?;
                    self.send(&mut stream, &mut out).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password()?;
                    let hash = md5_hash(shard.user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| self.auth(e.to_string()))?;
                    self.send(&mut stream, &mut out).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut offered = Vec::new();
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| self.protocol(format!("malformed SASL mechanisms: {e}")))?
                    {
                        offered.push(m.to_owned());
                    }
                    // Channel binding needs TLS to the shard, which we do not
                    // speak; plain SCRAM-SHA-256 is always offered alongside.
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(self.auth(format!(
                            "the server offers SASL mechanisms {offered:?}, shardgate supports {SCRAM_SHA_256}"
                        )));
                    }
                    let password = self.password()?;
                    let client =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out)
                        .map_err(|e| self.auth(e.to_string()))?;
                    self.send(&mut stream, &mut out).await?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASLContinue without SASL"))?;
                    client
                        .update(body.data())
                        .map_err(|e| self.auth(format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(client.message(), &mut out)
                        .map_err(|e| self.auth(e.to_string()))?;
                    self.send(&mut stream, &mut out).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASLFinal without SASL"))?;
                    // Verifies the server signature: the server knows the password too.
                    client
                        .finish(body.data())
                        .map_err(|e| self.auth(format!("SCRAM server signature rejected: {e}")))?;
                }
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(self.auth(
                        "the server requires GSSAPI/SSPI/Kerberos authentication, which shardgate does not support; use scram-sha-256, md5, password or trust in pg_hba.conf",
                    ));
                }
                Message::ParameterStatus(body) => {
                    let name = body
                        .name()
                        .map_err(|e| self.protocol(format!("bad ParameterStatus: {e}")))?;
                    let value = body
                        .value()
                        .map_err(|e| self.protocol(format!("bad ParameterStatus: {e}")))?;
                    match server_parameters.iter_mut().find(|(n, _)| n == name) {
                        Some(slot) => slot.1 = value.to_owned(),
                        None => server_parameters.push((name.to_owned(), value.to_owned())),
                    }
                }
                Message::BackendKeyData(body) => key = (body.process_id(), body.secret_key()),
                Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => {
                    let fields = error_fields(&body).map_err(|e| self.protocol(e))?;
                    return Err(BackendError::Server {
                        shard: shard.name.clone(),
                        error: Box::new(ServerError {
                            sqlstate: intern_sqlstate(fields.code.as_bytes()),
                            severity: fields.severity,
                            message: fields.message,
                            detail: fields.detail,
                            hint: fields.hint,
                        }),
                    });
                }
                Message::ReadyForQuery(body) => {
                    return Ok(BackendConnection {
                        stream,
                        shard_name: shard.name.clone(),
                        addr: self.addr.to_owned(),
                        shard_index: 0,
                        server_parameters,
                        backend_pid: key.0,
                        secret_key: key.1,
                        created_at: Instant::now(),
                        transaction_status: body.status(),
                        awaiting_ready: false,
                        broken: false,
                        pending: buf,
                        prepared: PreparedCache::default(),
                        settings_signature: 0,
                        idle_since: Instant::now(),
                        reset_counter: 0,
                    });
                }
                other => return Err(self.protocol(unexpected("during startup", &other))),
            }
        }
    }
}

impl BackendConnection {
    /// Connect to `shard`, authenticate (trust, cleartext, md5 or
    /// SCRAM-SHA-256 without channel binding) and read up to the first
    /// ReadyForQuery, all within `connect_timeout`. Sends
    /// an empty `application_name` (what a client that sets none sees from
    /// Postgres, and then from shardgate).
    pub async fn connect(
        shard: &ShardConfig,
        shard_index: usize,
        connect_timeout: Duration,
    ) -> Result<BackendConnection, BackendError> {
        Self::connect_with_params(shard, shard_index, connect_timeout, &[]).await
    }

    /// Like [`connect`](Self::connect) with extra StartupMessage parameters
    /// (`application_name`, `options`, GUCs such as `DateStyle`); `user` and
    /// `database` always come from the shard map.
    pub async fn connect_with_params(
        shard: &ShardConfig,
        shard_index: usize,
        connect_timeout: Duration,
        extra: &[(&str, &str)],
    ) -> Result<BackendConnection, BackendError> {
        let addr = display_addr(&shard.host, shard.port);
        let startup = Startup {
            shard,
            addr: &addr,
            extra,
        };
        let started = Instant::now();
        match tokio::time::timeout(connect_timeout, startup.run()).await {
            Ok(Ok(mut conn)) => {
                conn.shard_index = shard_index;
                Ok(conn)
            }
            // Say how long the attempt took: "refused after 3ms" and "no
            // answer within connect_timeout" call for different fixes, and
            // a client may hear an attempt that began before it asked.
            Ok(Err(BackendError::Unavailable {
                shard,
                addr,
                reason,
            })) => Err(BackendError::Unavailable {
                shard,
                addr,
                reason: format!("{reason} after {}", fmt_elapsed(started.elapsed())),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::ConnectTimeout {
                shard: shard.name.clone(),
                addr,
                timeout: connect_timeout,
            }),
        }
    }

    pub fn shard_index(&self) -> usize {
        self.shard_index
    }

    pub fn shard_name(&self) -> &str {
        &self.shard_name
    }

    /// ParameterStatus values seen at startup (server_version, DateStyle,
    /// TimeZone, ...), in the order the server sent them.
    pub fn server_parameters(&self) -> &[(String, String)] {
        &self.server_parameters
    }

    /// (backend pid, secret key) from BackendKeyData, for CancelRequest.
    pub fn cancel_key(&self) -> (i32, i32) {
        (self.backend_pid, self.secret_key)
    }

    pub fn created_at(&self) -> Instant {
        self.created_at
    }

    /// `b'I'` idle, `b'T'` in a transaction, `b'E'` in a failed transaction,
    /// as of the last ReadyForQuery the proxy reported.
    pub fn transaction_status(&self) -> u8 {
        self.transaction_status
    }

    /// Called by the proxy's message loop for each ReadyForQuery it
    /// forwards; also records that the backend has finished answering.
    pub fn set_transaction_status(&mut self, status: u8) {
        self.transaction_status = status;
        self.awaiting_ready = false;
        if status == b'I' {
            self.idle_since = Instant::now();
        }
    }

    /// Whether the connection may be handed to a client: not broken, idle,
    /// and, once idle for [`HEALTH_CHECK_AFTER_IDLE`](super::HEALTH_CHECK_AFTER_IDLE),
    /// its socket neither closed nor holding unexpected bytes. The peek is a
    /// syscall; a connection used moments ago is alive for all practical
    /// purposes (measured: the peek was the only syscall per transaction
    /// PgBouncer does not make). Used by bb8's check and the hot stack alike.
    pub fn fit_for_checkout(&mut self) -> bool {
        self.fit_for_checkout_at(Instant::now())
    }

    /// [`BackendConnection::fit_for_checkout`] with the time already read
    /// (the hot stack reads the clock once for this and the lifetime check).
    pub fn fit_for_checkout_at(&mut self, now: Instant) -> bool {
        !self.is_broken()
            && !self.needs_reset()
            && (now.saturating_duration_since(self.idle_since) < super::HEALTH_CHECK_AFTER_IDLE
                || self.poll_idle_health())
    }

    /// True when the connection cannot go back to the pool as-is: inside a
    /// transaction, or requests were written whose ReadyForQuery was not
    /// reported through [`set_transaction_status`](Self::set_transaction_status).
    pub fn needs_reset(&self) -> bool {
        self.transaction_status != b'I' || self.awaiting_ready
    }

    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Write all of `bytes` (whole protocol frames). Marks the connection
    /// broken on error, since a partial frame leaves the stream unusable.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.awaiting_ready = true;
        let result = self.stream.write_all(bytes).await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Append whatever the backend has sent to `buf`, waiting for at least
    /// one byte. `Ok(0)` means EOF; EOF and errors mark the connection broken.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len();
            buf.extend_from_slice(&self.pending);
            self.pending.clear();
            return Ok(n);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        match self.stream.read_buf(buf).await {
            Ok(0) => {
                self.broken = true;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Give back bytes read from this connection but not consumed, so the
    /// next `read_buf` (or a [`reset`](Self::reset)) starts at a frame
    /// boundary. The proxy calls this before returning a connection whose
    /// client vanished while it held part of a backend frame; without it a
    /// reset cannot find the frame boundaries and discards the connection.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut joined = BytesMut::with_capacity(bytes.len() + self.pending.len());
        joined.extend_from_slice(bytes);
        joined.extend_from_slice(&self.pending);
        self.pending = joined;
    }

    /// Non-blocking health check of an idle connection, no round trip.
    ///
    /// An idle backend sends nothing, so: would-block = healthy; EOF, an
    /// error or any bytes (e.g. FATAL 57P01 "terminating connection due to
    /// administrator command" after the server was stopped) = broken.
    ///
    /// Uses `recv(MSG_PEEK | MSG_DONTWAIT)` rather than tokio's `try_read`:
    /// `try_read` trusts the readiness tokio has cached from the reactor and
    /// reports WouldBlock without asking the kernel if the reactor has not
    /// yet processed the FIN, which would hand out a dead connection.
    pub fn poll_idle_health(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if !self.pending.is_empty() {
            self.broken = true;
            return false;
        }
        let mut probe = [0u8; 1];
        // SAFETY: the fd is owned by `self.stream` and open for the duration
        // of this call; `probe` is a valid writable buffer of the given
        // length. MSG_PEEK leaves any data in the socket, MSG_DONTWAIT never
        // blocks, and tokio's readiness tracking is not affected.
        let n = unsafe {
            libc::recv(
                self.stream.raw_fd(),
                probe.as_mut_ptr().cast::<libc::c_void>(),
                probe.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let healthy = n < 0 && {
            let err = io::Error::last_os_error();
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        };
        if !healthy {
            self.broken = true;
        }
        healthy
    }

    /// Which session settings this connection has (see `frontend::settings`).
    pub fn settings_signature(&self) -> u64 {
        self.settings_signature
    }

    pub fn set_settings_signature(&mut self, signature: u64) {
        self.settings_signature = signature;
    }

    /// Shardgate-owned prepared statements that exist on this backend.
    pub fn prepared(&mut self) -> &mut PreparedCache {
        &mut self.prepared
    }

    /// Bring a connection that was given up mid-transaction (or mid-request)
    /// back to idle: abort any COPY, finish any extended-protocol batch,
    /// `ROLLBACK`, then read until a marker query answers with ReadyForQuery
    /// `'I'`. The marker is what makes it safe when the backend was still
    /// answering the client's last request: everything before it is
    /// discarded, nothing after it is left unread. Marks the connection
    /// broken on failure; callers bound it with a timeout.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        let result = self.reset_inner().await;
        match &result {
            Ok(()) => self.set_transaction_status(b'I'),
            Err(_) => self.broken = true,
        }
        result
    }

    async fn reset_inner(&mut self) -> Result<(), BackendError> {
        if self.broken {
            return Err(self.broken_error());
        }
        self.reset_counter += 1;
        let marker = format!(
            "shardgate_reset_{}_{}",
            self.backend_pid as u32, self.reset_counter
        );
        let mut out = BytesMut::with_capacity(128);
        // Postgres ignores CopyFail/Sync outside COPY/extended mode, so these
        // are harmless when the backend is simply idle in a transaction.
        let encode = |out: &mut BytesMut| -> io::Result<()> {
            frontend::copy_fail("shardgate: client went away", out)?;
            frontend::sync(out);
            frontend::query("ROLLBACK", out)?;
            frontend::query(&format!("SELECT '{marker}'"), out)
        };
        encode(&mut out).map_err(|e| self.protocol_error(format!("encoding reset: {e}")))?;
        self.write_all(&out).await.map_err(|e| self.io_error(&e))?;

        let mut buf = std::mem::take(&mut self.pending);
        let mut marker_seen = false;
        let mut skip = 0usize;
        loop {
            let message = loop {
                match take_control_or_skip(&mut buf, &mut skip)
                    .map_err(|e| self.protocol_error(e))?
                {
                    Some(message) => break message,
                    None => {
                        buf.reserve(8192);
                        let n = self
                            .stream
                            .read_buf(&mut buf)
                            .await
                            .map_err(|e| self.io_error(&e))?;
                        if n == 0 {
                            return Err(self.io_error(&io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection during reset",
                            )));
                        }
                    }
                }
            };
            match message {
                Skipped::DataRow(value) => {
                    if value == marker.as_bytes() {
                        marker_seen = true;
                    }
                }
                Skipped::Ready(status) if marker_seen => {
                    if !buf.is_empty() {
                        return Err(self.protocol_error("unexpected bytes after reset"));
                    }
                    if status != b'I' {
                        return Err(self.protocol_error(format!(
                            "still in transaction state '{}' after ROLLBACK",
                            char::from(status).escape_default()
                        )));
                    }
                    return Ok(());
                }
                Skipped::Ready(_) | Skipped::Other => {}
            }
        }
    }

    fn broken_error(&self) -> BackendError {
        BackendError::Broken {
            shard: self.shard_name.clone(),
        }
    }

    fn io_error(&self, e: &io::Error) -> BackendError {
        BackendError::Unavailable {
            shard: self.shard_name.clone(),
            addr: self.addr.clone(),
            reason: e.to_string(),
        }
    }

    fn protocol_error(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            shard: self.shard_name.clone(),
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }
}

/// Every message type tag a protocol 3.0 backend sends.
const BACKEND_TAGS: &[u8] = b"123AcCdDEGHIKnNRsStTvVWZ";

/// What the reset reader needs from a message.
enum Skipped {
    /// First column of a DataRow (empty for NULL / no columns).
    DataRow(Vec<u8>),
    Ready(u8),
    Other,
}

/// Like [`take_message`] but for the reset path, where the backend may be
/// finishing a large result the client abandoned: only DataRow and
/// ReadyForQuery are looked at, and frames larger than
/// [`MAX_CONTROL_MESSAGE`] are discarded as they stream in (`skip` carries
/// the bytes still to drop) instead of being buffered whole.
fn take_control_or_skip(buf: &mut BytesMut, skip: &mut usize) -> Result<Option<Skipped>, String> {
    if *skip > 0 {
        let n = (*skip).min(buf.len());
        buf.advance(n);
        *skip -= n;
        if *skip > 0 {
            return Ok(None);
        }
    }
    let header = match Header::parse(buf) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    // A tag no backend sends means we lost the frame boundaries (e.g. bytes
    // were read and not handed back with `unread`): fail now instead of
    // skipping a bogus length until the reset times out.
    if !BACKEND_TAGS.contains(&header.tag()) {
        return Err(format!(
            "lost message framing during reset (tag 0x{:02x})",
            header.tag()
        ));
    }
    let len = usize::try_from(header.len()).map_err(|_| "negative message length".to_owned())?;
    let total = len.checked_add(1).ok_or("message length overflow")?;
    if len > MAX_CONTROL_MESSAGE {
        if header.tag() == b'Z' {
            return Err("oversized ReadyForQuery during reset".to_owned());
        }
        let have = buf.len().min(total);
        buf.advance(have);
        *skip = total - have;
        return Ok(Some(Skipped::Other));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total);
    let body = &frame[5..];
    Ok(Some(match header.tag() {
        b'Z' => Skipped::Ready(*body.first().ok_or("empty ReadyForQuery")?),
        b'D' => Skipped::DataRow(first_column(body).unwrap_or_default()),
        _ => Skipped::Other,
    }))
}

/// First column of a DataRow body: i16 count, then i32 length + bytes.
fn first_column(body: &[u8]) -> Option<Vec<u8>> {
    let mut body = body;
    if body.remaining() < 6 || body.get_i16() < 1 {
        return None;
    }
    let len = usize::try_from(body.get_i32()).ok()?;
    body.get(..len).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn backend_sockets_detect_dead_peers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let Stream::Tcp(tcp) = open_stream("127.0.0.1", port).await.expect("connect") else {
            panic!("a TCP stream");
        };
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            KEEPALIVE_IDLE
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 3);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(KEEPALIVE_IDLE)
        );
    }

    fn shard(port: u16) -> ShardConfig {
        ShardConfig {
            name: "fake".into(),
            url: format!("postgres://u@127.0.0.1:{port}/db"),
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            password: None,
            database: "db".into(),
        }
    }

    /// A server that reads the startup message, sends `reply` and closes.
    async fn fake_server(reply: Vec<u8>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(&reply).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn malformed_startup_replies_are_errors_not_panics() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"R\x00\x00\x00\x02".to_vec(), "08P01"),
            (b"R\x7f\xff\xff\xff".to_vec(), "08P01"),
            (b"Q\x00\x00\x00\x04".to_vec(), "08P01"),
            (b"E\x00\x00\x00\x06C2".to_vec(), "08P01"),
            (b"E\x00\x00\x00\x07C2".to_vec(), "08006"),
            (b"R\x00\x00\x00\x08\x00\x00\x00\x03".to_vec(), "28000"),
            (b"R\x00\x00\x00\x08\x00\x00\x00\x07".to_vec(), "28000"),
            (Vec::new(), "08006"),
            (
                b"E\x00\x00\x00\x20SFATAL\x00C3D000\x00Mno such db\xff\x00\x00".to_vec(),
                "3D000",
            ),
        ];
        for (reply, code) in cases {
            let port = fake_server(reply.clone()).await;
            let err = BackendConnection::connect(&shard(port), 0, Duration::from_secs(5))
                .await
                .expect_err("garbage must not connect");
            assert_eq!(err.sqlstate(), code, "{reply:?}: {err}");
            assert!(err.to_string().contains("fake"), "{err}");
        }
    }

    proptest! {
        #[test]
        fn take_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match take_message(&mut buf) {
                    Ok(Some(Message::ErrorResponse(body))) => { let _ = error_fields(&body); }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut skip = 0;
            while let Ok(Some(_)) = take_control_or_skip(&mut buf, &mut skip) {}
        }
    }

    #[test]
    fn first_column_of_data_row() {
        let body = b"\x00\x01\x00\x00\x00\x02hi";
        assert_eq!(first_column(body), Some(b"hi".to_vec()));
        assert_eq!(first_column(b"\x00\x01\xff\xff\xff\xff"), None);
        assert_eq!(first_column(b"\x00\x01\x00\x00\x00\x09hi"), None);
    }
}
