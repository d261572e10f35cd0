//! From a fresh TCP connection to an authenticated client: TLS negotiation,
//! the startup packet, authentication (pgwire's mechanisms), ParameterStatus
//! mirrored from a real backend, and shardgate's own BackendKeyData.
//!
//! No backend connection is used before the client has authenticated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use bytes::BufMut;
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use pgwire::api::auth::md5pass::Md5PasswordAuth;
use pgwire::api::auth::mechanism::AuthMechanismFactory;
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::sasl::SaslMechanisms;
use pgwire::api::auth::{AuthDriver, AuthOutcome, ServerParameterProvider};
use pgwire::api::DefaultClient;
use pgwire::api::{ClientInfo, PgWireConnectionState, PidSecretKeyGenerator};
use pgwire::error::PgWireError;
use pgwire::messages::startup::{NegotiateProtocolVersion, SecretKey, Startup};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::server::{negotiate_tls, MaybeTls, PgWireMessageServerCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};

use super::auth::{Md5Source, ScramSource};
use super::cancel;
use super::presence::TERMINATE_FRAME;
use crate::config::AuthMethod;
use crate::metrics::AuthFailure;
use crate::protocol::synth::ProxyError;
use crate::server::Shared;

type StartupSocket = Framed<MaybeTls, PgWireMessageServerCodec<()>>;

/// User, database and startup settings of a client being authenticated.
type Login = (String, String, Vec<(String, String)>);

/// A client that completed startup and authentication.
pub struct ClientStartup {
    pub io: MaybeTls,
    /// Bytes the client sent after authentication that were already read.
    pub read_buf: BytesMut,
    pub user: String,
    pub database: String,
    /// Settings the client asked for at startup (application_name,
    /// client_encoding, `options=-c …`), applied like `SET`s.
    pub settings: Vec<(String, String)>,
    /// shardgate's BackendKeyData for this client.
    pub key: (i32, i32),
    /// A client of another database name than the map's: the pool its
    /// session runs on (`other_databases`), held for the session.
    pub other_database: Option<crate::other_databases::Lease>,
}

pub enum Accepted {
    Client(Box<ClientStartup>),
    /// An admin user logged in to the admin database (see `admin`).
    Admin(Box<ClientStartup>),
    /// The connection carried a CancelRequest, which was forwarded before
    /// the connection closed.
    Cancel,
    /// The client went away or was refused; nothing more to do.
    Closed,
}

/// Issues shardgate's own (pid, secret) pairs: pids count up, secrets are random.
pub struct KeyGenerator {
    next_pid: AtomicI32,
}

impl Default for KeyGenerator {
    fn default() -> Self {
        KeyGenerator {
            next_pid: AtomicI32::new(1_000_000 + (rand::random::<u16>() as i32)),
        }
    }
}

impl PidSecretKeyGenerator for KeyGenerator {
    fn generate(&self, _client: &dyn ClientInfo) -> (i32, SecretKey) {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        (pid, SecretKey::I32(rand::random::<i32>()))
    }
}

/// ParameterStatus values sent to the client: a real backend's, with the
/// client's own startup settings on top (as Postgres would report them).
struct MirroredParameters(HashMap<String, String>);

impl ServerParameterProvider for MirroredParameters {
    fn server_parameters<C>(&self, _client: &C) -> Option<HashMap<String, String>>
    where
        C: ClientInfo + ?Sized,
    {
        Some(self.0.clone())
    }
}

/// Runs the handshake within `login_timeout` (what a half-open connection
/// may hold a login slot for).
pub async fn accept(shared: &Arc<Shared>, tcp: TcpStream) -> Accepted {
    let client = tcp.peer_addr().ok();
    let timeout = shared.config.limits.login_timeout;
    let login = async {
        // Until its first packet is complete a connection costs its socket,
        // this small future and the bytes it sent; the handshake's state
        // (4 KB) and pgwire's buffers exist only after that.
        let Some(socket) = open(shared, tcp).await else {
            return Accepted::Closed;
        };
        Box::pin(handshake(shared, socket)).await
    };
    // Pinned here so the connection closes after the failure is recorded.
    let mut login = std::pin::pin!(login);
    match tokio::time::timeout(timeout, login.as_mut()).await {
        Ok(accepted) => accepted,
        Err(_) => {
            shared
                .login_failures
                .record(AuthFailure::Timeout, None, client);
            Accepted::Closed
        }
    }
}

/// Postgres's limit on the startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Reads the client's first packet (answering SSLRequest/GSSENCRequest on
/// the way) into a buffer of exactly its size, and frames the connection
/// for pgwire with it. pgwire's `negotiate_tls` would hold two 8 KiB
/// buffers for every connection that sent part of a packet (15 KB each
/// measured); it is used only for direct TLS.
async fn open(shared: &Shared, mut tcp: TcpStream) -> Option<StartupSocket> {
    // A Terminate before any startup packet (drivers closing a connection
    // they no longer need): Postgres closes without a word, so do we.
    let mut first = [0u8; 5];
    let peeked = tcp.peek(&mut first).await.ok()?;
    if peeked == 5 && first == TERMINATE_FRAME {
        return None;
    }
    if peeked > 0 && first[0] == 0x16 {
        // Direct TLS (sslnegotiation=direct): pgwire checks the ALPN.
        return Box::pin(negotiate_tls::<()>(tcp, shared.tls.clone()))
            .await
            .ok()
            .flatten();
    }
    let addr = tcp.peer_addr().ok()?;
    tcp.set_nodelay(true).ok()?;
    for _ in 0..3 {
        let mut length = [0u8; 4];
        tcp.read_exact(&mut length).await.ok()?;
        let length = u32::from_be_bytes(length) as usize;
        if !(8..=MAX_STARTUP_PACKET).contains(&length) {
            let error = ProxyError::fatal("08P01", "invalid length of startup packet");
            refuse_raw(&mut tcp, error).await;
            return None;
        }
        let mut packet = BytesMut::with_capacity(length);
        packet.extend_from_slice(&(length as u32).to_be_bytes());
        while packet.len() < length {
            let want = length - packet.len();
            if tcp.read_buf(&mut (&mut packet).limit(want)).await.ok()? == 0 {
                return None;
            }
        }
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let (io, secure) = match (length, code) {
            (8, SSL_REQUEST) => match &shared.tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await.ok()?;
                    let tls = Box::pin(acceptor.accept(tcp)).await.ok()?;
                    (MaybeTls::Tls(Box::new(tls)), true)
                }
                None => {
                    tcp.write_all(b"N").await.ok()?;
                    continue;
                }
            },
            (8, GSSENC_REQUEST) => {
                tcp.write_all(b"N").await.ok()?;
                continue;
            }
            _ => (MaybeTls::Plain(tcp), false),
        };
        let mut parts = FramedParts::new(
            io,
            PgWireMessageServerCodec::new(DefaultClient::new(addr, secure)),
        );
        if !secure {
            parts.read_buf = packet;
        }
        let mut socket = Framed::from_parts(parts);
        socket.set_state(PgWireConnectionState::AwaitingStartup);
        return Some(socket);
    }
    // More than an SSLRequest and a GSSENCRequest in a row.
    let error = ProxyError::fatal("08P01", "unexpected encryption request after negotiation");
    refuse_raw(&mut tcp, error).await;
    None
}

/// Sends a FATAL error on a connection not framed yet.
async fn refuse_raw(tcp: &mut TcpStream, error: ProxyError) {
    let mut buf = BytesMut::new();
    error.encode(&mut buf);
    let _ = tcp.write_all(&buf).await;
}

/// Refuses a connection beyond `max_pending_logins` like Postgres refuses
/// one beyond `max_connections`, without waiting on the client.
pub fn too_many_logins(shared: &Shared, tcp: &TcpStream) {
    shared
        .login_failures
        .record(AuthFailure::TooManyLogins, None, tcp.peer_addr().ok());
    let mut buf = BytesMut::new();
    ProxyError::fatal(
        "53300",
        "sorry, too many clients logging in already (max_pending_logins)",
    )
    .encode(&mut buf);
    // Best effort: a fresh socket's send buffer takes it whole.
    let _ = tcp.try_write(&buf);
}

async fn handshake(shared: &Arc<Shared>, socket: StartupSocket) -> Accepted {
    let mut socket = socket;
    let mut login: Option<Login> = None;
    let mut password_messages = 0usize;
    loop {
        if login.is_some() {
            // pgwire panics on some malformed messages during login (found
            // by tests/fuzz): only a well-formed password message or a
            // Terminate goes on to it.
            let sasl_initial =
                password_messages == 0 && shared.users.method == AuthMethod::ScramSha256;
            if let Err(error) = guard_login_message(&mut socket, sasl_initial).await {
                shared.login_failures.record(
                    AuthFailure::Protocol,
                    login.as_ref().map(|l| l.0.as_str()),
                    peer_address(socket.get_ref()),
                );
                refuse(&mut socket, error).await;
                return Accepted::Closed;
            }
            password_messages += 1;
        }
        let message = match socket.next().await {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                let text = format!("invalid startup packet: {error}");
                refuse(&mut socket, ProxyError::fatal("08P01", text)).await;
                return Accepted::Closed;
            }
            None => return Accepted::Closed,
        };
        match message {
            PgWireFrontendMessage::CancelRequest(cancel) => {
                // Without a startup packet pgwire cannot know the protocol
                // version and may hand the 4-byte key over as bytes.
                let secret = match cancel.secret_key {
                    SecretKey::I32(secret) => secret,
                    SecretKey::Bytes(bytes) if bytes.len() == 4 => {
                        i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
                    }
                    SecretKey::Bytes(_) => return Accepted::Closed,
                };
                // Forwarded while the client's connection is still open:
                // Postgres closes it only after signalling the backend, and
                // drivers (asyncpg) wait for that close before their next
                // statement. Closing first let the cancel land on that
                // next statement.
                cancel::forward(shared, cancel.pid, secret).await;
                return Accepted::Cancel;
            }
            PgWireFrontendMessage::Startup(startup) => {
                let (user, database, settings) = match check_startup(shared, &startup) {
                    Ok(found) => found,
                    Err(error) => {
                        refuse(&mut socket, error).await;
                        return Accepted::Closed;
                    }
                };
                if let Err(error) = negotiate_version(&mut socket, &startup).await {
                    refuse(&mut socket, error).await;
                    return Accepted::Closed;
                }
                pgwire::api::auth::save_startup_parameters_to_metadata(&mut socket, &startup);
                login = Some((user, database, settings));
                let mechanism = match shared.users.method {
                    AuthMethod::Trust => None,
                    AuthMethod::Md5 => Some(
                        Md5PasswordAuth::new(Arc::new(Md5Source(shared.users.clone()))).create(),
                    ),
                    AuthMethod::ScramSha256 => {
                        let scram = ScramAuth::new(Arc::new(ScramSource(shared.users.clone())));
                        Some(SaslMechanisms::new(vec![Arc::new(scram)]).create())
                    }
                };
                let Some(mechanism) = mechanism else {
                    return finish(shared, socket, login, None).await;
                };
                let driver = AuthDriver::<_, ()>::new(MirroredParameters(HashMap::new()));
                let step = driver.begin_authentication(&mut socket, mechanism).await;
                socket = match auth_step(shared, socket, &mut login, step).await {
                    Next::Continue(socket) => *socket,
                    Next::Done(accepted) => return accepted,
                };
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) if login.is_some() => {
                let driver = AuthDriver::<_, ()>::new(MirroredParameters(HashMap::new()));
                let step = driver.advance_authentication(&mut socket, message).await;
                socket = match auth_step(shared, socket, &mut login, step).await {
                    Next::Continue(socket) => *socket,
                    Next::Done(accepted) => return accepted,
                };
            }
            PgWireFrontendMessage::SslNegotiation(_) => {
                // A second SSLRequest/GSSENCRequest after negotiation: refuse like Postgres.
                let error =
                    ProxyError::fatal("08P01", "unexpected encryption request after negotiation");
                refuse(&mut socket, error).await;
                return Accepted::Closed;
            }
            _ => {
                let error = ProxyError::fatal("08P01", "expected a startup or password message");
                refuse(&mut socket, error).await;
                return Accepted::Closed;
            }
        }
    }
}

fn peer_address(io: &MaybeTls) -> Option<std::net::SocketAddr> {
    match io {
        MaybeTls::Plain(tcp) => tcp.peer_addr().ok(),
        MaybeTls::Tls(tls) => tls.get_ref().0.peer_addr().ok(),
        _ => None,
    }
}

/// The longest password message taken during login (Postgres allows
/// 1,000 bytes for a password; SCRAM messages are smaller still).
const MAX_LOGIN_MESSAGE: usize = 16 * 1024;

/// Reads the next login message whole into the socket's buffer and checks
/// what pgwire would otherwise trust: its tag (`p` or `X`), its length, and
/// a SASLInitialResponse's inner length.
async fn guard_login_message(
    socket: &mut StartupSocket,
    sasl_initial: bool,
) -> Result<(), ProxyError> {
    let malformed = |what: String| ProxyError::fatal("08P01", what);
    let total = loop {
        match crate::protocol::frame_length(socket.read_buffer(), MAX_LOGIN_MESSAGE) {
            Ok(Some(total)) if socket.read_buffer().len() >= total => break total,
            Ok(_) => {}
            Err(error) => return Err(malformed(format!("invalid login message: {error}"))),
        }
        if let Some(&tag) = socket.read_buffer().first() {
            if !matches!(tag, b'p' | b'X') {
                return Err(malformed(format!(
                    "expected a password message during login, got message type '{}'",
                    tag.escape_ascii()
                )));
            }
        }
        let mut chunk = [0u8; 1024];
        match socket.get_mut().read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(malformed("connection closed during login".into())),
            Ok(n) => socket.read_buffer_mut().extend_from_slice(&chunk[..n]),
        }
    };
    let frame = &socket.read_buffer()[..total];
    match frame[0] {
        b'p' if sasl_initial => crate::protocol::messages::check_sasl_initial_response(&frame[5..])
            .map_err(|error| malformed(format!("invalid SASL initial response: {error}"))),
        b'p' | b'X' => Ok(()),
        tag => Err(malformed(format!(
            "expected a password message during login, got message type '{}'",
            tag.escape_ascii()
        ))),
    }
}

/// After one authentication step: go on with the socket, or the outcome.
enum Next {
    /// Boxed: the socket is large and the enum is returned by value.
    Continue(Box<StartupSocket>),
    Done(Accepted),
}

/// One step of the handshake (begin or advance): continue, hand the
/// authenticated client over, or refuse it with 28P01.
async fn auth_step(
    shared: &Arc<Shared>,
    mut socket: StartupSocket,
    login: &mut Option<Login>,
    step: pgwire::error::PgWireResult<AuthOutcome>,
) -> Next {
    match step {
        Ok(AuthOutcome::InProgress) => Next::Continue(Box::new(socket)),
        Ok(AuthOutcome::Authenticated { final_message, .. }) => {
            Next::Done(finish(shared, socket, login.take(), final_message).await)
        }
        Err(error) => {
            let user = login.as_ref().map(|l| l.0.as_str());
            let reason = match error {
                PgWireError::InvalidPassword(_) if user.is_some_and(|u| shared.users.exists(u)) => {
                    AuthFailure::WrongPassword
                }
                PgWireError::InvalidPassword(_) => AuthFailure::UnknownUser,
                _ => AuthFailure::Protocol,
            };
            let client = pgwire::api::ClientInfo::socket_addr(&socket);
            shared.login_failures.record(reason, user, Some(client));
            auth_failed(&mut socket, login.as_ref()).await;
            Next::Done(Accepted::Closed)
        }
    }
}

/// Validates user, database and options of the startup packet.
fn check_startup(shared: &Shared, startup: &Startup) -> Result<Login, ProxyError> {
    if startup.protocol_number_major != 3 {
        return Err(ProxyError::fatal(
            "0A000",
            format!(
                "unsupported frontend protocol {}.{}: server supports 3.0",
                startup.protocol_number_major, startup.protocol_number_minor
            ),
        ));
    }
    let params = &startup.parameters;
    let user = params
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            ProxyError::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?
        .clone();
    let database = params
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .clone();
    if params.contains_key("replication")
        && params
            .get("replication")
            .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        return Err(ProxyError::fatal(
            "0A000",
            "shardgate does not support replication connections",
        ));
    }
    // With a password method an unknown user goes through the exchange and
    // fails like a wrong password (no enumeration of user names); trust
    // has no secret to protect and answers like Postgres does.
    if shared.users.method == AuthMethod::Trust && !shared.users.exists(&user) {
        return Err(ProxyError::fatal(
            "28000",
            format!("role \"{user}\" does not exist"),
        ));
    }
    // Another name with `other_databases` is checked after authentication,
    // by the server that serves it (as Postgres checks after it, too).
    if database != shared.config.database
        && shared.other_databases.is_none()
        && !is_admin_database(shared, &database)
    {
        return Err(crate::other_databases::not_served(shared, &database));
    }
    let mut settings = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => settings.extend(parse_options(value)?),
            name if name.starts_with("_pq_.") => {}
            _ => settings.push((name.clone(), value.clone())),
        }
    }
    Ok((user, database, settings))
}

/// `options` from the startup packet: `-c name=value` and `--name=value`.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ProxyError> {
    let mut settings = Vec::new();
    let mut words = split_options(options).into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("--").map(str::to_string)
        };
        let Some(assignment) = assignment else {
            return Err(ProxyError::fatal(
                "08P01",
                format!("unsupported startup option `{word}`; use -c name=value"),
            ));
        };
        let Some((name, value)) = assignment.split_once('=') else {
            return Err(ProxyError::fatal(
                "08P01",
                format!("startup option `{assignment}` is not name=value"),
            ));
        };
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

/// Splits on unescaped spaces; `\ ` is a literal space (libpq's rule).
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Clients asking for 3.x with x > 0, or with `_pq_.` options, get
/// NegotiateProtocolVersion and continue with 3.0 (what the shards speak).
async fn negotiate_version(
    socket: &mut StartupSocket,
    startup: &Startup,
) -> Result<(), ProxyError> {
    let unsupported: Vec<String> = startup
        .parameters
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    if startup.protocol_number_minor > 0 || !unsupported.is_empty() {
        let message = NegotiateProtocolVersion::new(0, unsupported);
        socket
            .send(PgWireBackendMessage::NegotiateProtocolVersion(message))
            .await
            .map_err(|e| ProxyError::fatal("08006", e.to_string()))?;
    }
    Ok(())
}

async fn finish(
    shared: &Arc<Shared>,
    mut socket: StartupSocket,
    login: Option<Login>,
    final_message: Option<pgwire::messages::startup::Authentication>,
) -> Accepted {
    let Some((user, database, settings)) = login else {
        return Accepted::Closed;
    };
    if is_admin_database(shared, &database) {
        return Box::pin(admin_login(shared, socket, final_message, user, database)).await;
    }
    let (other_database, server_parameters) = if database == shared.config.database {
        let parameters = shared
            .pools
            .any_server_parameters()
            .await
            .map_err(|error| ProxyError::fatal(error.sqlstate(), error.to_string()));
        (None, parameters)
    } else {
        match crate::other_databases::login(shared, &database).await {
            Ok((lease, parameters)) => (Some(lease), Ok(parameters)),
            Err(error) => (None, Err(error)),
        }
    };
    let mut parameters = match server_parameters {
        Ok(parameters) => parameters.into_iter().collect::<HashMap<String, String>>(),
        Err(error) => {
            refuse(&mut socket, error).await;
            return Accepted::Closed;
        }
    };
    for (name, value) in &settings {
        if REPORTED_SETTINGS.contains(&name.as_str()) {
            let reported = reported_name(name);
            let value = if reported == "client_encoding" {
                canonical_encoding(value)
            } else {
                value.clone()
            };
            parameters.insert(reported, value);
        }
    }
    parameters.insert("session_authorization".to_string(), user.clone());
    let Some((io, read_buf, key)) = complete_login(shared, socket, final_message, parameters).await
    else {
        return Accepted::Closed;
    };
    Accepted::Client(Box::new(ClientStartup {
        io,
        read_buf,
        user,
        database,
        settings,
        key,
        other_database,
    }))
}

/// Sends AuthenticationOk, the ParameterStatus values, BackendKeyData and
/// ReadyForQuery; returns the socket's parts and the client's key.
async fn complete_login(
    shared: &Arc<Shared>,
    mut socket: StartupSocket,
    final_message: Option<pgwire::messages::startup::Authentication>,
    parameters: HashMap<String, String>,
) -> Option<(MaybeTls, BytesMut, (i32, i32))> {
    let driver = AuthDriver::<_, ()>::new(MirroredParameters(parameters))
        .with_pid_secret_key_generator(shared.keys.clone());
    driver
        .complete_authentication(&mut socket, final_message)
        .await
        .ok()?;
    let (pid, secret) = match socket.pid_and_secret_key() {
        (pid, SecretKey::I32(secret)) => (pid, secret),
        _ => return None,
    };
    socket.set_state(PgWireConnectionState::ReadyForQuery);
    let parts = socket.into_parts();
    Some((parts.io, parts.read_buf, (pid, secret)))
}

/// Whether `database` is the admin console's (see `admin`).
fn is_admin_database(shared: &Shared, database: &str) -> bool {
    shared
        .config
        .admin
        .as_ref()
        .is_some_and(|admin| admin.database == database)
}

/// An authenticated login to the admin database: admin users get the
/// console (its own ParameterStatus values: it needs no shard), others are
/// refused.
async fn admin_login(
    shared: &Arc<Shared>,
    mut socket: StartupSocket,
    final_message: Option<pgwire::messages::startup::Authentication>,
    user: String,
    database: String,
) -> Accepted {
    let allowed = shared
        .config
        .admin
        .as_ref()
        .is_some_and(|admin| admin.users.contains(&user));
    if !allowed {
        let error = ProxyError::fatal(
            "42501",
            format!("permission denied for the admin console: \"{user}\" is not in admin.users"),
        );
        refuse(&mut socket, error).await;
        return Accepted::Closed;
    }
    let parameters: HashMap<String, String> = [
        ("server_version", "15.0 (shardgate admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "off"),
        ("application_name", ""),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .chain([("session_authorization".to_string(), user.clone())])
    .collect();
    let Some((io, read_buf, key)) = complete_login(shared, socket, final_message, parameters).await
    else {
        return Accepted::Closed;
    };
    Accepted::Admin(Box::new(ClientStartup {
        io,
        read_buf,
        user,
        database,
        settings: Vec::new(),
        key,
        other_database: None,
    }))
}

/// Settings Postgres reports back with ParameterStatus (GUC_REPORT), by the
/// lower-case name a client may use in the startup packet.
const REPORTED_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "DateStyle",
    "intervalstyle",
    "IntervalStyle",
    "timezone",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

/// Postgres reports encodings by their canonical name: it ignores case and
/// everything but letters and digits (`'utf-8'` is UTF8).
fn canonical_encoding(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    match cleaned.as_str() {
        "UNICODE" => "UTF8".to_string(),
        "LATIN1" | "ISO88591" => "LATIN1".to_string(),
        _ => cleaned,
    }
}

fn reported_name(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "datestyle" => "DateStyle".to_string(),
        "intervalstyle" => "IntervalStyle".to_string(),
        "timezone" => "TimeZone".to_string(),
        other => other.to_string(),
    }
}

async fn auth_failed(socket: &mut StartupSocket, login: Option<&Login>) {
    let user = login.map(|l| l.0.as_str()).unwrap_or_default();
    let error = ProxyError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    );
    refuse(socket, error).await;
}

/// Sends a FATAL error and flushes; the caller then drops the connection.
async fn refuse(socket: &mut StartupSocket, error: ProxyError) {
    let mut buf = BytesMut::new();
    error.encode(&mut buf);
    let io = socket.get_mut();
    let _ = tokio::io::AsyncWriteExt::write_all(io, &buf).await;
    let _ = tokio::io::AsyncWriteExt::flush(io).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_like_libpq() {
        let parsed =
            parse_options("-c statement_timeout=5s --search-path=a\\ b -cwork_mem=4MB").unwrap();
        assert_eq!(
            parsed,
            vec![
                ("statement_timeout".to_string(), "5s".to_string()),
                ("search_path".to_string(), "a b".to_string()),
                ("work_mem".to_string(), "4MB".to_string())
            ]
        );
        assert!(parse_options("-x").is_err());
    }
}
