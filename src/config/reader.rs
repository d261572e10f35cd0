//! Reads the spanned YAML tree into a typed [`Config`], collecting every error.
//!
//! Each reader method reports problems at the node that has them and goes on,
//! returning `None` for the part it could not read, so one run shows all errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::spanned::{self, Mark, Node, NodeKind};
use super::values::{parse_duration, parse_size, BoundType, BoundValue};
use super::*;
use crate::suggest::closest;

const TOP_KEYS: &[&str] = &[
    "listen",
    "metrics",
    "tls",
    "database",
    "users",
    "auth",
    "pool",
    "shards",
    "functions",
    "tables",
    "default_table",
    "two_phase_commit",
    "max_merge_memory",
    "migrations",
    "threads",
    "catalog_refresh",
    "max_message_size",
    "max_client_memory",
    "login_timeout",
    "max_pending_logins",
    "other_databases",
    "admin",
    "shutdown_timeout",
];
const ADMIN_KEYS: &[&str] = &["database", "users"];
const OTHER_DATABASES_KEYS: &[&str] = &["shard", "max_databases", "idle_timeout"];
const POOL_KEYS: &[&str] = &[
    "mode",
    "size",
    "connect_timeout",
    "checkout_timeout",
    "idle_timeout",
    "max_lifetime",
    "query_timeout",
    "idle_transaction_timeout",
    "pause_timeout",
];
const FUNCTION_KINDS: &[&str] = &[
    "hash",
    "modulo",
    "consistent_hash",
    "range",
    "list",
    "tenant",
];

pub(super) fn read(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut reader = Reader {
        file: path.to_path_buf(),
        base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        env,
        errors: Vec::new(),
    };
    let root = match spanned::parse(text) {
        Ok(root) => root,
        Err(error) => {
            reader.error(error.mark, format!("YAML syntax error: {}", error.message));
            return Err(ConfigErrors(reader.errors));
        }
    };
    let config = reader.config(&root);
    let mut errors = reader.errors;
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => {
            errors.sort_by_key(|e| (e.line, e.column));
            errors.dedup();
            Err(ConfigErrors(errors))
        }
    }
}

/// Entries of a mapping whose keys were checked against an allowed list.
struct Entries<'a> {
    entries: Vec<(&'a str, &'a Node)>,
}

impl<'a> Entries<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, node)| *node)
    }
}

struct Reader<'e> {
    file: PathBuf,
    base_dir: PathBuf,
    env: &'e dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn error(&mut self, mark: Mark, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            message: message.into(),
        });
    }

    /// A mapping whose keys must all be in `allowed`; reports unknown and duplicate keys.
    fn mapping<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Entries<'n>> {
        let NodeKind::Mapping(raw) = &node.kind else {
            if node.is_null() {
                return Some(Entries {
                    entries: Vec::new(),
                });
            }
            self.error(
                node.mark,
                format!(
                    "{what} must be a mapping (key: value), found {}",
                    node.describe()
                ),
            );
            return None;
        };
        let mut entries: Vec<(&'n str, &'n Node)> = Vec::with_capacity(raw.len());
        for (key, value) in raw {
            let Some(name) = key.as_scalar() else {
                self.error(key.mark, format!("keys in {what} must be plain words"));
                continue;
            };
            if let Some((_, first)) = entries.iter().find(|(k, _)| *k == name) {
                let line = first.mark.line;
                self.error(
                    key.mark,
                    format!("duplicate key `{name}` in {what} (first given on line {line})"),
                );
                continue;
            }
            if !allowed.is_empty() && !allowed.contains(&name) {
                let hint = match closest(name, allowed) {
                    Some(best) => format!("did you mean `{best}`? "),
                    None => String::new(),
                };
                self.error(
                    key.mark,
                    format!(
                        "unknown key `{name}` in {what}; {hint}allowed keys: {}",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            entries.push((name, value));
        }
        Some(Entries { entries })
    }

    /// A list of nodes; a missing/null value is an empty list.
    fn sequence<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.kind {
            NodeKind::Sequence(items) => Some(items),
            _ if node.is_null() => Some(&[]),
            _ => {
                self.error(
                    node.mark,
                    format!("{what} must be a list, found {}", node.describe()),
                );
                None
            }
        }
    }

    /// A scalar with `${VAR}` replaced from the environment.
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        let Some(raw) = node.as_scalar() else {
            self.error(
                node.mark,
                format!("{what} must be a single value, found {}", node.describe()),
            );
            return None;
        };
        match substitute_env(raw, self.env) {
            Ok(value) => Some(value),
            Err(message) => {
                self.error(node.mark, format!("{what}: {message}"));
                None
            }
        }
    }

    fn required<'n>(
        &mut self,
        entries: &Entries<'n>,
        key: &str,
        parent: &Node,
        what: &str,
    ) -> Option<&'n Node> {
        let node = entries.get(key);
        if node.is_none() {
            self.error(parent.mark, format!("{what} needs `{key}`"));
        }
        node
    }

    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match self.string(node, what)?.as_str() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            other => {
                self.error(
                    node.mark,
                    format!("{what} must be true or false, found `{other}`"),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let text = self.string(node, what)?;
        parse_duration(&text)
            .map_err(|message| self.error(node.mark, format!("{what}: {message}")))
            .ok()
    }

    fn choice<T: Copy>(&mut self, node: &Node, what: &str, options: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, what)?;
        match options.iter().find(|(name, _)| *name == text) {
            Some((_, value)) => Some(*value),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.error(
                    node.mark,
                    format!(
                        "{what} `{text}` is not allowed; allowed: {}",
                        names.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn address(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = self.string(node, what)?;
        let valid = text
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .unwrap_or(false);
        if !valid {
            self.error(
                node.mark,
                format!("{what} `{text}` is not an address; write host:port, e.g. 127.0.0.1:6432"),
            );
            return None;
        }
        Some(text)
    }

    fn path(&mut self, node: &Node, what: &str) -> Option<PathBuf> {
        let text = self.string(node, what)?;
        Some(self.base_dir.join(text))
    }

    fn config(&mut self, root: &Node) -> Option<Config> {
        let top = self.mapping(root, "the shard map", TOP_KEYS)?;
        let listen = match top.get("listen") {
            Some(node) => self.address(node, "`listen`"),
            None => Some("127.0.0.1:6432".to_string()),
        };
        let metrics = top
            .get("metrics")
            .and_then(|n| self.address(n, "`metrics`"));
        let tls = top.get("tls").and_then(|n| self.tls(n));
        let auth = match top.get("auth") {
            Some(node) => self.choice(
                node,
                "`auth`",
                &[
                    ("scram-sha-256", AuthMethod::ScramSha256),
                    ("md5", AuthMethod::Md5),
                    ("trust", AuthMethod::Trust),
                ],
            ),
            None => Some(AuthMethod::ScramSha256),
        };
        let users = match top.get("users") {
            Some(node) => self.users(node, auth.unwrap_or(AuthMethod::Trust)),
            None => Some(Vec::new()),
        };
        if let (Some(users), Some(auth)) = (&users, auth) {
            if users.is_empty() && auth != AuthMethod::Trust {
                self.error(
                    root.mark,
                    "no `users`: with `auth` other than trust nobody could log in; add users: [{ name: app, password: \"${APP_PASSWORD}\" }]",
                );
            }
        }
        let pool = match top.get("pool") {
            Some(node) => self.pool(node),
            None => Some(PoolConfig::default()),
        };
        let shards = match top.get("shards") {
            Some(node) => self.shards(node),
            None => {
                self.error(
                    root.mark,
                    "the shard map needs `shards`: a list of { name, url }",
                );
                None
            }
        };
        let shard_names: Vec<String> = shards
            .as_ref()
            .map(|s| s.iter().map(|s: &ShardConfig| s.name.clone()).collect())
            .unwrap_or_default();
        let functions = match top.get("functions") {
            Some(node) => self.functions(node, &shard_names),
            None => Some(Vec::new()),
        };
        let function_names: Vec<String> = functions
            .as_ref()
            .map(|f| f.iter().map(|f: &FunctionConfig| f.name.clone()).collect())
            .unwrap_or_default();
        let tables = match top.get("tables") {
            Some(node) => self.tables(node, &function_names, functions.is_some()),
            None => Some(Vec::new()),
        };
        let default_table = match top.get("default_table") {
            Some(node) => self.choice(
                node,
                "`default_table`",
                &[
                    ("replicated", DefaultTable::Replicated),
                    ("error", DefaultTable::Error),
                ],
            ),
            None => Some(DefaultTable::Error),
        };
        let two_phase_commit = match top.get("two_phase_commit") {
            Some(node) => self.bool(node, "`two_phase_commit`"),
            None => Some(true),
        };
        let max_merge_memory = match top.get("max_merge_memory") {
            Some(node) => self.string(node, "`max_merge_memory`").and_then(|text| {
                parse_size(&text)
                    .map_err(|m| self.error(node.mark, format!("`max_merge_memory`: {m}")))
                    .ok()
            }),
            None => Some(256 << 20),
        };
        let migrations = match top.get("migrations") {
            Some(node) => self.migrations(node),
            None => Some(MigrationsConfig {
                dir: self.base_dir.join("migrations"),
                sets: Vec::new(),
            }),
        };
        let threads = match top.get("threads") {
            Some(node) => match self.string(node, "`threads`").map(|t| t.parse::<usize>()) {
                Some(Ok(n)) if n <= 1024 => Some(n),
                Some(_) => {
                    self.error(
                        node.mark,
                        "`threads` must be a whole number from 0 (one per CPU) to 1024",
                    );
                    None
                }
                None => None,
            },
            None => Some(1),
        };
        let catalog_refresh = match top.get("catalog_refresh") {
            Some(node) => self.duration(node, "`catalog_refresh`"),
            None => Some(Duration::from_secs(30)),
        };
        let limits = self.limits(&top);
        let other_databases = match top.get("other_databases") {
            Some(node) => self
                .other_databases(node, &shard_names, shards.is_some())
                .map(Some),
            None => Some(None),
        };
        let database = match top.get("database") {
            Some(node) => self.string(node, "`database`"),
            None => shards
                .as_ref()
                .and_then(|s| s.first())
                .map(|s| s.database.clone()),
        };
        let shutdown_timeout = match top.get("shutdown_timeout") {
            Some(node) => self.duration(node, "`shutdown_timeout`"),
            None => Some(Duration::from_secs(30)),
        };
        let admin = match top.get("admin") {
            Some(node) => self
                .admin(node, users.as_deref(), database.as_deref())
                .map(Some),
            None => Some(None),
        };
        Some(Config {
            source: self.file.clone(),
            listen: listen?,
            metrics,
            tls,
            database: database?,
            users: users?,
            auth: auth?,
            pool: pool?,
            shards: shards?,
            functions: functions?,
            tables: tables?,
            default_table: default_table?,
            two_phase_commit: two_phase_commit?,
            max_merge_memory: max_merge_memory?,
            migrations: migrations?,
            threads: threads?,
            catalog_refresh: catalog_refresh?,
            limits: limits?,
            other_databases: other_databases?,
            admin: admin?,
            shutdown_timeout: shutdown_timeout?,
        })
    }

    /// `admin: { database, users }`. The users must be in `users:` (when
    /// it could be read) and the database must not be the map's own.
    fn admin(
        &mut self,
        node: &Node,
        known: Option<&[UserConfig]>,
        database: Option<&str>,
    ) -> Option<AdminConfig> {
        let what = "`admin`";
        let entries = self.mapping(node, what, ADMIN_KEYS)?;
        let mut ok = true;
        let admin_database = match entries.get("database") {
            Some(n) => {
                let name = self.string(n, "`admin.database`")?;
                if Some(name.as_str()) == database {
                    self.error(
                        n.mark,
                        format!(
                            "`admin.database` is `{name}`, the database the application uses; \
                             give the console a name of its own (default `shardgate`)"
                        ),
                    );
                    ok = false;
                }
                name
            }
            None => AdminConfig::DEFAULT_DATABASE.to_string(),
        };
        let list = self.required(&entries, "users", node, what)?;
        let items = self.sequence(list, "`admin.users`")?;
        if items.is_empty() {
            self.error(list.mark, "`admin.users` must name at least one user");
            ok = false;
        }
        let mut users = Vec::new();
        for item in items {
            let Some(name) = self.string(item, "an admin user") else {
                ok = false;
                continue;
            };
            if let Some(known) = known {
                if !known.iter().any(|u| u.name == name) {
                    let names: Vec<&str> = known.iter().map(|u| u.name.as_str()).collect();
                    self.error(
                        item.mark,
                        format!(
                            "`admin.users` names `{name}`, which is not in `users` (it needs a \
                             password there); users: {}",
                            names.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
            users.push(name);
        }
        ok.then_some(AdminConfig {
            database: admin_database,
            users,
        })
    }

    /// `other_databases: { shard, max_databases, idle_timeout }`. The shard
    /// is checked only when `shards` could be read (else its error says
    /// enough).
    fn other_databases(
        &mut self,
        node: &Node,
        shards: &[String],
        shards_read: bool,
    ) -> Option<OtherDatabasesConfig> {
        let what = "`other_databases`";
        let NodeKind::Mapping(_) = &node.kind else {
            self.error(
                node.mark,
                format!(
                    "{what} must be a mapping such as {{ shard: s0 }} (the shard whose server serves \
                     other database names), found {}",
                    node.describe()
                ),
            );
            return None;
        };
        let entries = self.mapping(node, what, OTHER_DATABASES_KEYS)?;
        let mut ok = true;
        let shard = match self.required(&entries, "shard", node, what) {
            Some(n) if shards_read => self.shard_ref(n, shards, "`other_databases.shard`"),
            Some(_) => Some(0),
            None => None,
        };
        let mut max_databases = OtherDatabasesConfig::DEFAULT_MAX_DATABASES;
        if let Some(n) = entries.get("max_databases") {
            match self
                .string(n, "`other_databases.max_databases`")
                .map(|t| t.parse::<usize>())
            {
                Some(Ok(max)) if (1..=1000).contains(&max) => max_databases = max,
                Some(_) => {
                    self.error(
                        n.mark,
                        "`other_databases.max_databases` must be a whole number from 1 to 1000",
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
        let idle_timeout = match entries.get("idle_timeout") {
            Some(n) => self.duration(n, "`other_databases.idle_timeout`"),
            None => Some(Duration::ZERO),
        };
        let config = OtherDatabasesConfig {
            shard: shard?,
            max_databases,
            idle_timeout: idle_timeout?,
        };
        ok.then_some(config)
    }

    /// `max_message_size`, `max_client_memory`, `login_timeout`, `max_pending_logins`.
    fn limits(&mut self, top: &Entries<'_>) -> Option<ClientLimits> {
        let mut limits = ClientLimits::default();
        let mut ok = true;
        for (key, slot) in [
            ("max_message_size", &mut limits.max_message_size),
            ("max_client_memory", &mut limits.max_client_memory),
        ] {
            let Some(node) = top.get(key) else { continue };
            let Some(text) = self.string(node, &format!("`{key}`")) else {
                ok = false;
                continue;
            };
            // A message is at most 1 GiB in Postgres (and its length an i32).
            let (most, range) = if key == "max_message_size" {
                (1 << 30, "1kB to 1GiB")
            } else {
                (1 << 40, "1kB to 1TiB")
            };
            match parse_size(&text) {
                Ok(size) if (1024..=most).contains(&size) => *slot = size as usize,
                Ok(_) => {
                    self.error(node.mark, format!("`{key}` must be from {range}"));
                    ok = false;
                }
                Err(message) => {
                    self.error(node.mark, format!("`{key}`: {message}"));
                    ok = false;
                }
            }
        }
        if limits.max_client_memory / 2 < limits.max_message_size {
            // A message of the largest allowed size (charged twice: read
            // buffer and its copy to the shard) must always fit, or its
            // session would wait forever.
            let node = top
                .get("max_client_memory")
                .or_else(|| top.get("max_message_size"));
            if let (Some(node), true) = (node, ok) {
                self.error(
                    node.mark,
                    format!(
                        "`max_client_memory` ({} bytes) must be at least twice `max_message_size` ({} bytes): each message is held twice, read and on its way to the shard",
                        limits.max_client_memory, limits.max_message_size
                    ),
                );
                ok = false;
            }
        }
        if let Some(node) = top.get("login_timeout") {
            match self.duration(node, "`login_timeout`") {
                Some(d) if !d.is_zero() => limits.login_timeout = d,
                Some(_) => {
                    self.error(node.mark, "`login_timeout` must be greater than zero");
                    ok = false;
                }
                None => ok = false,
            }
        }
        if let Some(node) = top.get("max_pending_logins") {
            match self
                .string(node, "`max_pending_logins`")
                .map(|t| t.parse::<usize>())
            {
                Some(Ok(n)) if (1..=1_000_000).contains(&n) => limits.max_pending_logins = n,
                Some(_) => {
                    self.error(
                        node.mark,
                        "`max_pending_logins` must be a whole number from 1 to 1000000",
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
        ok.then_some(limits)
    }

    fn tls(&mut self, node: &Node) -> Option<TlsConfig> {
        let entries = self.mapping(node, "`tls`", &["cert", "key"])?;
        let cert = self.required(&entries, "cert", node, "`tls`");
        let key = self.required(&entries, "key", node, "`tls`");
        let cert = cert.and_then(|n| self.existing_file(n, "`tls.cert`"));
        let key = key.and_then(|n| self.existing_file(n, "`tls.key`"));
        Some(TlsConfig {
            cert: cert?,
            key: key?,
        })
    }

    fn existing_file(&mut self, node: &Node, what: &str) -> Option<PathBuf> {
        let path = self.path(node, what)?;
        if !path.is_file() {
            self.error(
                node.mark,
                format!("{what}: file {} does not exist", path.display()),
            );
            return None;
        }
        Some(path)
    }

    fn users(&mut self, node: &Node, auth: AuthMethod) -> Option<Vec<UserConfig>> {
        let items = self.sequence(node, "`users`")?;
        let mut users: Vec<(UserConfig, usize)> = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(entries) = self.mapping(item, "a user", &["name", "password"]) else {
                ok = false;
                continue;
            };
            let name = self
                .required(&entries, "name", item, "a user")
                .and_then(|n| self.string(n, "user `name`"));
            let password = entries.get("password").and_then(|n| {
                let text = self.string(n, "`password`")?;
                let secret = classify_secret(text);
                if let Err(message) = check_secret(&secret, auth) {
                    self.error(n.mark, message);
                    return None;
                }
                Some(secret)
            });
            let Some(name) = name else {
                ok = false;
                continue;
            };
            if entries.get("password").is_some() && password.is_none() {
                ok = false;
                continue;
            }
            if password.is_none() && auth != AuthMethod::Trust {
                self.error(
                    item.mark,
                    format!("user `{name}` has no `password`, but `auth` is not trust"),
                );
                ok = false;
                continue;
            }
            if let Some((_, line)) = users.iter().find(|(u, _)| u.name == name) {
                self.error(
                    item.mark,
                    format!("user `{name}` is listed twice (first on line {line})"),
                );
                ok = false;
                continue;
            }
            users.push((UserConfig { name, password }, item.mark.line));
        }
        ok.then(|| users.into_iter().map(|(u, _)| u).collect())
    }

    fn pool(&mut self, node: &Node) -> Option<PoolConfig> {
        let entries = self.mapping(node, "`pool`", POOL_KEYS)?;
        let mut pool = PoolConfig::default();
        let mut ok = true;
        if let Some(n) = entries.get("mode") {
            match self.choice(
                n,
                "`pool.mode`",
                &[
                    ("transaction", PoolMode::Transaction),
                    ("session", PoolMode::Session),
                ],
            ) {
                Some(mode) => pool.mode = mode,
                None => ok = false,
            }
        }
        if let Some(n) = entries.get("size") {
            match self.string(n, "`pool.size`").map(|t| t.parse::<u32>()) {
                Some(Ok(size)) if (1..=10_000).contains(&size) => pool.size = size,
                Some(_) => {
                    self.error(n.mark, "`pool.size` must be a whole number from 1 to 10000");
                    ok = false;
                }
                None => ok = false,
            }
        }
        for (key, slot) in [
            ("connect_timeout", &mut pool.connect_timeout),
            ("checkout_timeout", &mut pool.checkout_timeout),
            ("idle_timeout", &mut pool.idle_timeout),
            ("max_lifetime", &mut pool.max_lifetime),
            ("pause_timeout", &mut pool.pause_timeout),
        ] {
            if let Some(n) = entries.get(key) {
                match self.duration(n, &format!("`pool.{key}`")) {
                    Some(d) if !d.is_zero() => *slot = d,
                    Some(_) => {
                        self.error(n.mark, format!("`pool.{key}` must be greater than zero"));
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
        // Zero (the default) turns these off, as in PgBouncer.
        for (key, slot) in [
            ("query_timeout", &mut pool.query_timeout),
            (
                "idle_transaction_timeout",
                &mut pool.idle_transaction_timeout,
            ),
        ] {
            if let Some(n) = entries.get(key) {
                match self.duration(n, &format!("`pool.{key}`")) {
                    Some(d) => *slot = d,
                    None => ok = false,
                }
            }
        }
        ok.then_some(pool)
    }

    fn shards(&mut self, node: &Node) -> Option<Vec<ShardConfig>> {
        let items = self.sequence(node, "`shards`")?;
        if items.is_empty() {
            self.error(
                node.mark,
                "`shards` is empty; a shard map needs at least one shard",
            );
            return None;
        }
        let mut shards: Vec<(ShardConfig, usize)> = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(entries) = self.mapping(item, "a shard", &["name", "url"]) else {
                ok = false;
                continue;
            };
            let name = self
                .required(&entries, "name", item, "a shard")
                .and_then(|n| self.name(n, "shard `name`"));
            let url = self.required(&entries, "url", item, "a shard");
            let shard = url.and_then(|n| self.shard_url(n, name.as_deref().unwrap_or("")));
            let (Some(name), Some(shard)) = (name, shard) else {
                ok = false;
                continue;
            };
            if let Some((_, line)) = shards.iter().find(|(s, _)| s.name == name) {
                self.error(
                    item.mark,
                    format!("duplicate shard name `{name}` (first on line {line}); shard names must be unique"),
                );
                ok = false;
                continue;
            }
            shards.push((ShardConfig { name, ..shard }, item.mark.line));
        }
        ok.then(|| shards.into_iter().map(|(s, _)| s).collect())
    }

    /// Names of shards, functions: letters, digits, `_` and `-`.
    fn name(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = self.string(node, what)?;
        let valid = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            self.error(
                node.mark,
                format!("{what} `{text}` may only contain letters, digits, `_` and `-`"),
            );
            return None;
        }
        Some(text)
    }

    fn shard_url(&mut self, node: &Node, shard: &str) -> Option<ShardConfig> {
        let url = self.string(node, "shard `url`")?;
        match parse_shard_url(&url) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                let shown = redact_url(&url);
                self.error(
                    node.mark,
                    format!("shard `{shard}`: bad url `{shown}`: {message}; expected postgres://user[:password]@host[:port]/database"),
                );
                None
            }
        }
    }

    fn shard_ref(&mut self, node: &Node, shards: &[String], what: &str) -> Option<usize> {
        let name = self.string(node, what)?;
        match shards.iter().position(|s| *s == name) {
            Some(index) => Some(index),
            None => {
                self.error(
                    node.mark,
                    format!(
                        "{what} names unknown shard `{name}`; defined shards: {}",
                        shards.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn functions(&mut self, node: &Node, shards: &[String]) -> Option<Vec<FunctionConfig>> {
        let entries = self.mapping(node, "`functions`", &[])?;
        let mut functions = Vec::new();
        let mut ok = true;
        for (name, body) in &entries.entries {
            match self.function(name, body, shards) {
                Some(kind) => functions.push(FunctionConfig {
                    name: name.to_string(),
                    kind,
                }),
                None => ok = false,
            }
        }
        ok.then_some(functions)
    }

    fn function(&mut self, name: &str, node: &Node, shards: &[String]) -> Option<FunctionKind> {
        let what = format!("function `{name}`");
        let NodeKind::Mapping(_) = &node.kind else {
            self.error(
                node.mark,
                format!(
                    "{what} must be a mapping with `kind` ({}), found {}",
                    FUNCTION_KINDS.join(", "),
                    node.describe()
                ),
            );
            return None;
        };
        let all = self.mapping(node, &what, &[])?;
        let kind_node = self.required(&all, "kind", node, &what)?;
        let kind = self.string(kind_node, "`kind`")?;
        let allowed: &[&str] = match kind.as_str() {
            "hash" | "modulo" => &["kind"],
            "consistent_hash" => &["kind", "vnodes"],
            "range" => &["kind", "type", "ranges"],
            "list" => &["kind", "type", "values", "default"],
            "tenant" => &["kind", "mode", "tenants", "default", "schema_template"],
            other => {
                self.error(
                    kind_node.mark,
                    format!(
                        "{what}: unknown kind `{other}`; allowed kinds: {}",
                        FUNCTION_KINDS.join(", ")
                    ),
                );
                return None;
            }
        };
        let entries = self.mapping(node, &format!("{what} (kind {kind})"), allowed)?;
        match kind.as_str() {
            "hash" => Some(FunctionKind::Hash),
            "modulo" => Some(FunctionKind::Modulo),
            "consistent_hash" => {
                let vnodes = match entries.get("vnodes") {
                    Some(n) => match self.string(n, "`vnodes`").map(|t| t.parse::<u32>()) {
                        Some(Ok(v)) if (1..=65_536).contains(&v) => Some(v),
                        Some(_) => {
                            self.error(
                                n.mark,
                                format!("{what}: `vnodes` must be a whole number from 1 to 65536"),
                            );
                            None
                        }
                        None => None,
                    },
                    None => Some(256),
                };
                Some(FunctionKind::ConsistentHash { vnodes: vnodes? })
            }
            "range" => self.range(&what, node, &entries, shards),
            "list" => self.list(&what, node, &entries, shards),
            _ => self.tenant(&what, node, &entries, shards),
        }
    }

    /// The declared `type:`, or the type all the given scalars agree on.
    fn bound_type(
        &mut self,
        what: &str,
        declared: Option<&Node>,
        samples: &[&Node],
    ) -> Option<BoundType> {
        if let Some(node) = declared {
            let text = self.string(node, "`type`")?;
            return match BoundType::parse_name(&text) {
                Some(t) => Some(t),
                None => {
                    self.error(
                        node.mark,
                        format!(
                            "{what}: unknown `type` `{text}`; allowed: int, text, date, timestamp"
                        ),
                    );
                    None
                }
            };
        }
        let mut found: Option<(BoundType, Mark)> = None;
        for sample in samples {
            let NodeKind::Scalar { value, plain } = &sample.kind else {
                continue;
            };
            let inferred = BoundValue::infer_type(value, *plain);
            match found {
                None => found = Some((inferred, sample.mark)),
                Some((BoundType::Date, _)) if inferred == BoundType::Timestamp => {
                    found = Some((BoundType::Timestamp, sample.mark))
                }
                Some((BoundType::Timestamp, _)) if inferred == BoundType::Date => {}
                Some((t, first)) if t != inferred => {
                    self.error(
                        sample.mark,
                        format!(
                            "{what}: `{value}` looks like {} but the value on line {} looks like {}; set `type:` (int, text, date, timestamp)",
                            inferred.name(),
                            first.line,
                            t.name()
                        ),
                    );
                    return None;
                }
                Some(_) => {}
            }
        }
        Some(found.map(|(t, _)| t).unwrap_or(BoundType::Text))
    }

    fn bound(&mut self, node: &Node, bound_type: BoundType, what: &str) -> Option<BoundValue> {
        let text = self.string(node, what)?;
        BoundValue::parse(bound_type, &text)
            .map_err(|m| self.error(node.mark, format!("{what}: {m}")))
            .ok()
    }

    fn range(
        &mut self,
        what: &str,
        node: &Node,
        entries: &Entries,
        shards: &[String],
    ) -> Option<FunctionKind> {
        let ranges_node = self.required(entries, "ranges", node, what)?;
        let items = self.sequence(ranges_node, &format!("{what}: `ranges`"))?;
        if items.is_empty() {
            self.error(ranges_node.mark, format!("{what}: `ranges` is empty"));
            return None;
        }
        let mut bodies = Vec::new();
        for item in items {
            bodies.push((
                item,
                self.mapping(item, "a range", &["from", "to", "shard"])?,
            ));
        }
        let samples: Vec<&Node> = bodies
            .iter()
            .flat_map(|(_, e)| [e.get("from"), e.get("to")])
            .flatten()
            .collect();
        let key_type = self.bound_type(what, entries.get("type"), &samples)?;
        let mut ranges: Vec<(RangeConfig, Mark)> = Vec::new();
        let mut ok = true;
        for (item, body) in &bodies {
            let from = body
                .get("from")
                .filter(|n| !n.is_null())
                .map(|n| self.bound(n, key_type, "`from`"));
            let to = body
                .get("to")
                .filter(|n| !n.is_null())
                .map(|n| self.bound(n, key_type, "`to`"));
            let shard = self
                .required(body, "shard", item, "a range")
                .and_then(|n| self.shard_ref(n, shards, "range `shard`"));
            match (from, to, shard) {
                (Some(None), _, _) | (_, Some(None), _) | (_, _, None) => ok = false,
                (from, to, Some(shard)) => {
                    let (from, to) = (from.flatten(), to.flatten());
                    if let (Some(f), Some(t)) = (&from, &to) {
                        if f >= t {
                            self.error(
                                item.mark,
                                format!("{what}: empty range: `from` {f} is not below `to` {t}"),
                            );
                            ok = false;
                            continue;
                        }
                    }
                    ranges.push((RangeConfig { from, to, shard }, item.mark));
                }
            }
        }
        if !ok {
            return None;
        }
        for pair in ranges.windows(2) {
            let ((prev, prev_mark), (next, next_mark)) = (&pair[0], &pair[1]);
            let line = prev_mark.line;
            match (&prev.to, &next.from) {
                (None, _) => {
                    self.error(*next_mark, format!("{what}: this range overlaps the range on line {line}, which has no `to` (it is open to the end); ranges must be listed in ascending order without overlap"));
                    ok = false;
                }
                (Some(_), None) => {
                    self.error(*next_mark, format!("{what}: this range has no `from` (open start) so it overlaps the range on line {line}; only the first range may have an open start"));
                    ok = false;
                }
                (Some(to), Some(from)) if from < to => {
                    self.error(*next_mark, format!("{what}: this range starts at {from}, inside the range on line {line} that ends at {to}; ranges must not overlap and must be listed in ascending order"));
                    ok = false;
                }
                (Some(to), Some(from)) if from > to => {
                    self.error(*next_mark, format!("{what}: gap between {to} (end of the range on line {line}) and {from}; keys in between would have no shard; make `from` equal the previous `to`"));
                    ok = false;
                }
                _ => {}
            }
        }
        ok.then(|| FunctionKind::Range {
            key_type,
            ranges: ranges.into_iter().map(|(r, _)| r).collect(),
        })
    }

    fn list(
        &mut self,
        what: &str,
        node: &Node,
        entries: &Entries,
        shards: &[String],
    ) -> Option<FunctionKind> {
        let values_node = self.required(entries, "values", node, what)?;
        let NodeKind::Mapping(raw) = &values_node.kind else {
            self.error(
                values_node.mark,
                format!(
                    "{what}: `values` must be a mapping value: shard, e.g. {{ eu: s0, us: s1 }}"
                ),
            );
            return None;
        };
        let keys: Vec<&Node> = raw.iter().map(|(k, _)| k).collect();
        let key_type = self.bound_type(what, entries.get("type"), &keys)?;
        let mut values: Vec<(BoundValue, usize)> = Vec::new();
        let mut ok = true;
        for (key, shard) in raw {
            let value = self.bound(key, key_type, "list value");
            let shard = self.shard_ref(
                shard,
                shards,
                &format!("list value `{}`", key.as_scalar().unwrap_or("?")),
            );
            match (value, shard) {
                (Some(value), Some(shard)) => {
                    if values.iter().any(|(v, _)| *v == value) {
                        self.error(key.mark, format!("{what}: value {value} is listed twice"));
                        ok = false;
                    } else {
                        values.push((value, shard));
                    }
                }
                _ => ok = false,
            }
        }
        let default = match entries.get("default") {
            Some(n) => Some(self.shard_ref(n, shards, "`default`")?),
            None => None,
        };
        ok.then_some(FunctionKind::List {
            key_type,
            values,
            default,
        })
    }

    fn tenant(
        &mut self,
        what: &str,
        node: &Node,
        entries: &Entries,
        shards: &[String],
    ) -> Option<FunctionKind> {
        let mode = match entries.get("mode") {
            Some(n) => self.choice(
                n,
                "`mode`",
                &[
                    ("database", TenantMode::Database),
                    ("schema", TenantMode::Schema),
                ],
            )?,
            None => TenantMode::Database,
        };
        let tenants_node = self.required(entries, "tenants", node, what)?;
        let NodeKind::Mapping(raw) = &tenants_node.kind else {
            self.error(
                tenants_node.mark,
                format!("{what}: `tenants` must be a mapping tenant: shard, e.g. {{ acme: s0 }}"),
            );
            return None;
        };
        let mut tenants: Vec<(String, usize)> = Vec::new();
        let mut ok = true;
        for (key, shard) in raw {
            let tenant = self.string(key, "tenant id");
            let shard = self.shard_ref(shard, shards, "tenant shard");
            match (tenant, shard) {
                (Some(t), Some(s)) if !tenants.iter().any(|(x, _)| *x == t) => tenants.push((t, s)),
                (Some(t), Some(_)) => {
                    self.error(key.mark, format!("{what}: tenant `{t}` is listed twice"));
                    ok = false;
                }
                _ => ok = false,
            }
        }
        let default = match entries.get("default") {
            Some(n) => Some(self.shard_ref(n, shards, "`default`")?),
            None => None,
        };
        let schema_template = match entries.get("schema_template") {
            Some(n) => {
                let t = self.string(n, "`schema_template`")?;
                if !t.contains("{tenant}") {
                    self.error(
                        n.mark,
                        format!("{what}: `schema_template` `{t}` must contain {{tenant}}"),
                    );
                    return None;
                }
                t
            }
            None => "{tenant}".to_string(),
        };
        ok.then_some(FunctionKind::Tenant {
            mode,
            tenants,
            default,
            schema_template,
        })
    }

    fn tables(
        &mut self,
        node: &Node,
        functions: &[String],
        functions_ok: bool,
    ) -> Option<Vec<TableConfig>> {
        let entries = self.mapping(node, "`tables`", &[])?;
        let mut tables = Vec::new();
        let mut ok = true;
        for (name, body) in &entries.entries {
            let what = format!("table `{name}`");
            let Some(fields) = self.mapping(body, &what, &["key", "function", "replicated"]) else {
                ok = false;
                continue;
            };
            let replicated = match fields.get("replicated") {
                Some(n) => match self.bool(n, "`replicated`") {
                    Some(r) => r,
                    None => {
                        ok = false;
                        continue;
                    }
                },
                None => false,
            };
            if replicated {
                if fields.get("key").is_some() || fields.get("function").is_some() {
                    self.error(body.mark, format!("{what} is `replicated: true` and also has `key`/`function`; a replicated table is copied whole to every shard, remove one or the other"));
                    ok = false;
                    continue;
                }
                tables.push(TableConfig {
                    name: name.to_string(),
                    placement: TablePlacement::Replicated,
                });
                continue;
            }
            let key = self
                .required(
                    &fields,
                    "key",
                    body,
                    &format!("{what} (sharded; or set `replicated: true`)"),
                )
                .and_then(|n| self.string(n, "`key`"));
            let function = self
                .required(&fields, "function", body, &what)
                .and_then(|n| {
                    let f = self.string(n, "`function`")?;
                    if functions_ok && !functions.contains(&f) {
                        let defined = if functions.is_empty() {
                            "none".to_string()
                        } else {
                            functions.join(", ")
                        };
                        self.error(
                            n.mark,
                            format!(
                                "{what} uses unknown function `{f}`; defined functions: {defined}"
                            ),
                        );
                        return None;
                    }
                    Some(f)
                });
            match (key, function) {
                (Some(key), Some(function)) => tables.push(TableConfig {
                    name: name.to_string(),
                    placement: TablePlacement::Sharded { key, function },
                }),
                _ => ok = false,
            }
        }
        ok.then_some(tables)
    }

    fn migrations(&mut self, node: &Node) -> Option<MigrationsConfig> {
        let entries = self.mapping(node, "`migrations`", &["dir", "sets"])?;
        let dir = match entries.get("dir") {
            Some(n) => self.path(n, "`migrations.dir`")?,
            None => self.base_dir.join("migrations"),
        };
        let mut sets = Vec::new();
        let mut ok = true;
        if let Some(sets_node) = entries.get("sets") {
            let named = self.mapping(sets_node, "`migrations.sets`", &[])?;
            for (name, set) in named.entries {
                let what = format!("migration set `{name}`");
                let Some(fields) = self.mapping(set, &what, &["dir", "databases"]) else {
                    ok = false;
                    continue;
                };
                let dir = self
                    .required(&fields, "dir", set, &what)
                    .and_then(|n| self.path(n, "`dir`"));
                let databases = self
                    .required(&fields, "databases", set, &what)
                    .and_then(|n| self.shards(n));
                match (dir, databases) {
                    (Some(dir), Some(databases)) => sets.push(MigrationSet {
                        name: name.to_string(),
                        dir,
                        databases,
                    }),
                    _ => ok = false,
                }
            }
        }
        ok.then_some(MigrationsConfig { dir, sets })
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` from `env`; `$$` is a literal `$`.
pub(super) fn substitute_env(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    if !raw.contains('$') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err("`${` without a closing `}`".to_string());
            };
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`${{{expr}}}` is not a valid environment variable reference"
                ));
            }
            match (env(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(format!("environment variable `{name}` is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn classify_secret(text: String) -> Secret {
    if text.starts_with("SCRAM-SHA-256$") {
        Secret::ScramVerifier(text)
    } else if text.len() == 35
        && text.starts_with("md5")
        && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        Secret::Md5Hash(text)
    } else {
        Secret::Plain(text)
    }
}

fn check_secret(secret: &Secret, auth: AuthMethod) -> Result<(), String> {
    match (secret, auth) {
        (Secret::ScramVerifier(v), _) if !valid_scram_verifier(v) => Err(
            "malformed SCRAM verifier; expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> as in pg_authid".to_string(),
        ),
        (Secret::ScramVerifier(_), AuthMethod::Md5) => Err(
            "a SCRAM verifier cannot check md5 logins; give the plain password or an md5 hash, or use auth: scram-sha-256".to_string(),
        ),
        (Secret::Md5Hash(_), AuthMethod::ScramSha256) => Err(
            "an md5 hash cannot check scram-sha-256 logins; give the plain password or a SCRAM verifier, or use auth: md5".to_string(),
        ),
        _ => Ok(()),
    }
}

fn valid_scram_verifier(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("SCRAM-SHA-256$") else {
        return false;
    };
    let Some((iter_salt, keys)) = rest.split_once('$') else {
        return false;
    };
    let Some((iterations, salt)) = iter_salt.split_once(':') else {
        return false;
    };
    iterations.parse::<u32>().is_ok() && !salt.is_empty() && keys.split(':').count() == 2
}

/// Parses `postgres://user[:password]@host[:port]/database[?params]`.
fn parse_shard_url(url: &str) -> Result<ShardConfig, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or("it must start with postgres:// or postgresql://")?;
    let rest = rest.split('?').next().unwrap_or(rest);
    let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user)?, Some(percent_decode(pass)?)),
            None => (percent_decode(u)?, None),
        },
        None => (String::new(), None),
    };
    if user.is_empty() {
        return Err("no user name".to_string());
    }
    if hostport.is_empty() {
        return Err("no host".to_string());
    }
    if hostport.contains(',') {
        return Err(
            "several hosts in one url are not supported; give each shard one host".to_string(),
        );
    }
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or("unclosed `[` in host")?;
        let port = after.strip_prefix(':').unwrap_or("");
        (host.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        5432
    } else {
        port.parse::<u16>()
            .map_err(|_| format!("port `{port}` is not a number from 1 to 65535"))?
    };
    let database = percent_decode(database)?;
    if database.is_empty() {
        return Err("no database name after the host".to_string());
    }
    // Finally, the whole URL the way libpq-compatible clients read it.
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string())?;
    Ok(ShardConfig {
        name: String::new(),
        url: url.to_string(),
        host,
        port,
        user,
        password,
        database,
    })
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            let value =
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape `%{hex}`"))?;
            out.push(value);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "%-escapes do not form UTF-8".to_string())
}

/// The URL with its password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find('/').unwrap_or(after.len());
    match after[..authority_end].rfind('@') {
        Some(at) => match after[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &after[..colon],
                &after[at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn env_substitution() {
        assert_eq!(substitute_env("a${SET}b", &env).unwrap(), "avalueb");
        assert_eq!(substitute_env("${UNSET:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(substitute_env("$$5", &env).unwrap(), "$5");
        assert!(substitute_env("${UNSET}", &env)
            .unwrap_err()
            .contains("UNSET"));
        assert!(substitute_env("${SET", &env).is_err());
    }

    #[test]
    fn urls() {
        let s = parse_shard_url("postgres://app:p%40ss@db1:6543/shop").unwrap();
        assert_eq!(
            (
                s.user.as_str(),
                s.password.as_deref(),
                s.host.as_str(),
                s.port,
                s.database.as_str()
            ),
            ("app", Some("p@ss"), "db1", 6543, "shop")
        );
        assert!(parse_shard_url("mysql://a@b/c").is_err());
        assert!(parse_shard_url("postgres://a@b:99999/c").is_err());
        assert!(parse_shard_url("postgres://a@b").is_err());
        assert_eq!(
            redact_url("postgres://u:secret@h/d"),
            "postgres://u:***@h/d"
        );
    }

    #[test]
    fn client_limits_and_their_errors() {
        let base = "shards: [ { name: s0, url: \"postgres://u@h/d\" } ]\nauth: trust\n";
        let read = |extra: &str| read(Path::new("m.yaml"), &format!("{base}{extra}"), &env);
        let defaults = read("").expect("defaults").limits;
        assert_eq!(defaults, ClientLimits::default());
        let set = read("max_message_size: 1MiB\nmax_client_memory: 4MiB\nlogin_timeout: 2s\nmax_pending_logins: 50\n")
            .expect("limits")
            .limits;
        assert_eq!(
            (
                set.max_message_size,
                set.max_client_memory,
                set.login_timeout,
                set.max_pending_logins
            ),
            (1 << 20, 4 << 20, Duration::from_secs(2), 50)
        );
        let error = read("max_message_size: 128MiB\nmax_client_memory: 200MiB\n")
            .expect_err("budget below one message")
            .to_string();
        assert!(
            error.starts_with("m.yaml:4:20: `max_client_memory`"),
            "{error}"
        );
        let error = read("max_message_size: 2GiB\n")
            .expect_err("too large")
            .to_string();
        assert!(
            error.contains("m.yaml:3:19: `max_message_size` must be from 1kB to 1GiB"),
            "{error}"
        );
        let error = read("max_mesage_size: 1MiB\n")
            .expect_err("typo")
            .to_string();
        assert!(
            error.contains("did you mean `max_message_size`?"),
            "{error}"
        );
    }

    #[test]
    fn other_databases_and_their_errors() {
        let base = "shards:\n  - { name: s0, url: \"postgres://u@h/d\" }\n  - { name: s1, url: \"postgres://u@h2/d\" }\nauth: trust\n";
        let read = |extra: &str| read(Path::new("m.yaml"), &format!("{base}{extra}"), &env);
        assert_eq!(read("").expect("default").other_databases, None);
        assert_eq!(
            read("other_databases: { shard: s1 }\n")
                .expect("shard only")
                .other_databases,
            Some(OtherDatabasesConfig {
                shard: 1,
                max_databases: 16,
                idle_timeout: Duration::ZERO
            })
        );
        assert_eq!(
            read("other_databases: { shard: s0, max_databases: 3, idle_timeout: 2m }\n")
                .expect("all keys")
                .other_databases,
            Some(OtherDatabasesConfig {
                shard: 0,
                max_databases: 3,
                idle_timeout: Duration::from_secs(120)
            })
        );
        for (extra, expected) in [
            (
                "other_databases: { shard: s9 }\n",
                "m.yaml:5:27: `other_databases.shard` names unknown shard `s9`; defined shards: s0, s1",
            ),
            (
                "other_databases: {}\n",
                "m.yaml:5:18: `other_databases` needs `shard`",
            ),
            (
                "other_databases:\n",
                "m.yaml:6:1: `other_databases` must be a mapping such as { shard: s0 }",
            ),
            (
                "other_databases: s0\n",
                "m.yaml:5:18: `other_databases` must be a mapping",
            ),
            (
                "other_databases: { shard: s0, max_databases: 0 }\n",
                "m.yaml:5:46: `other_databases.max_databases` must be a whole number from 1 to 1000",
            ),
            (
                "other_databases: { shard: s0, idle_timeout: soon }\n",
                "m.yaml:5:45: `other_databases.idle_timeout`:",
            ),
            (
                "other_databases: { shard: s0, max_database: 4 }\n",
                "m.yaml:5:31: unknown key `max_database` in `other_databases`; did you mean `max_databases`?",
            ),
            (
                "other_database: { shard: s0 }\n",
                "did you mean `other_databases`?",
            ),
        ] {
            let error = read(extra).expect_err(extra).to_string();
            assert!(error.contains(expected), "{extra}: {error}");
        }
    }

    #[test]
    fn admin_console_and_its_errors() {
        let base = "shards:\n  - { name: s0, url: \"postgres://u@h/d\" }\nauth: trust\nusers: [ { name: app }, { name: ops } ]\n";
        let read = |extra: &str| read(Path::new("m.yaml"), &format!("{base}{extra}"), &env);
        assert_eq!(read("").expect("default").admin, None);
        assert_eq!(
            read("admin: { users: [ ops ] }\n")
                .expect("users only")
                .admin,
            Some(AdminConfig {
                database: "shardgate".into(),
                users: vec!["ops".into()]
            })
        );
        for (extra, expected) in [
            (
                "admin: { users: [ root ] }\n",
                "m.yaml:5:19: `admin.users` names `root`, which is not in `users`",
            ),
            (
                "admin: { users: [] }\n",
                "m.yaml:5:17: `admin.users` must name at least one user",
            ),
            (
                "admin: { database: d, users: [ ops ] }\n",
                "m.yaml:5:20: `admin.database` is `d`, the database the application uses",
            ),
            ("admin: {}\n", "m.yaml:5:8: `admin` needs `users`"),
            ("admin: { user: [ ops ] }\n", "did you mean `users`?"),
        ] {
            let error = read(extra).expect_err(extra).to_string();
            assert!(error.contains(expected), "{extra}: {error}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("poool", TOP_KEYS), Some("pool"));
        assert_eq!(closest("zzzzzz", TOP_KEYS), None);
    }
}
