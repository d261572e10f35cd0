//! Client authentication material: the map's users turned into what pgwire's
//! md5 and SCRAM mechanisms need, computed once at startup (SCRAM's PBKDF2 is
//! deliberately slow, so it must not run per login).
//!
//! Unknown users go through the same exchange as known ones (a mock SCRAM
//! verifier derived from the name and a server secret, the md5 mechanism
//! with a salt no answer can match) and fail with the same 28P01, as in
//! Postgres: a client cannot tell which user names exist. Failures are
//! counted and logged, at most one line a second per reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret, SCRAM_ITERATIONS};
use pgwire::api::auth::{AuthSource, LoginInfo, Password};
use pgwire::error::{PgWireError, PgWireResult};
use sha2::{Digest, Sha256};

use crate::config::{AuthMethod, Config, Secret};
use crate::metrics::{AuthFailure, Metrics};
use crate::throttle::LogThrottle;

/// What shardgate knows about one user's password.
#[derive(Clone)]
enum Credential {
    /// No password (only valid with `auth: trust`).
    None,
    /// `md5(password || user)` as lowercase hex, without the `md5` prefix.
    Md5 { hex: String },
    Scram {
        salt: Vec<u8>,
        iterations: usize,
        stored_key: Vec<u8>,
        server_key: Vec<u8>,
    },
    /// Both forms, from a plain password.
    Both {
        md5_hex: String,
        scram: Box<Credential>,
    },
}

/// The users of a shard map, ready for authentication.
#[derive(Clone)]
pub struct UserDirectory {
    pub method: AuthMethod,
    users: Arc<HashMap<String, Credential>>,
    /// Keys the mock SCRAM verifiers of unknown users: derived from the
    /// map's secrets, so it is stable across restarts of one map (as a
    /// stored verifier's salt is) and unknown to anyone without them.
    mock_key: [u8; 32],
}

impl std::fmt::Debug for UserDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDirectory")
            .field("method", &self.method)
            .field("users", &self.users.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("user `{user}`: {reason}")]
pub struct CredentialError {
    user: String,
    reason: String,
}

impl UserDirectory {
    pub fn from_config(config: &Config) -> Result<UserDirectory, CredentialError> {
        let mut users = HashMap::new();
        let mut mock_key = Sha256::new();
        mock_key.update(b"shardgate mock SCRAM key\0");
        for user in &config.users {
            mock_key.update(user.name.as_bytes());
            mock_key.update([0]);
            if let Some(Secret::Plain(text) | Secret::ScramVerifier(text) | Secret::Md5Hash(text)) =
                &user.password
            {
                mock_key.update(text.as_bytes());
            }
            mock_key.update([0]);
            let credential = match &user.password {
                None => Credential::None,
                Some(secret) => credential(&user.name, secret, config.auth).map_err(|reason| {
                    CredentialError {
                        user: user.name.clone(),
                        reason,
                    }
                })?,
            };
            users.insert(user.name.clone(), credential);
        }
        Ok(UserDirectory {
            method: config.auth,
            users: Arc::new(users),
            mock_key: mock_key.finalize().into(),
        })
    }

    pub fn exists(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// What an unknown user (or one without a SCRAM credential) is
    /// challenged with: the same salt and iteration count on every attempt,
    /// like a real user's, and keys no proof can match. Postgres does the
    /// same (`scram_mock_salt`).
    fn mock_scram(&self, user: &str) -> ScramSecret {
        let derive = |purpose: &[u8]| -> [u8; 32] {
            let mut hash = Sha256::new();
            hash.update(self.mock_key);
            hash.update(purpose);
            hash.update(user.as_bytes());
            hash.finalize().into()
        };
        ScramSecret::Verifier {
            salt: derive(b"salt\0")[..16].to_vec(),
            iterations: SCRAM_ITERATIONS,
            stored_key: derive(b"stored\0").to_vec(),
            server_key: derive(b"server\0").to_vec(),
        }
    }

    fn md5_hex(&self, user: &str) -> Option<&str> {
        match self.users.get(user)? {
            Credential::Md5 { hex } => Some(hex),
            Credential::Both { md5_hex, .. } => Some(md5_hex),
            _ => None,
        }
    }

    fn scram(&self, user: &str) -> Option<ScramSecret> {
        let credential = match self.users.get(user)? {
            Credential::Both { scram, .. } => scram.as_ref(),
            other => other,
        };
        match credential {
            Credential::Scram {
                salt,
                iterations,
                stored_key,
                server_key,
            } => Some(ScramSecret::Verifier {
                salt: salt.clone(),
                iterations: *iterations,
                stored_key: stored_key.clone(),
                server_key: server_key.clone(),
            }),
            _ => None,
        }
    }
}

fn md5_hex(data: &[u8]) -> String {
    format!("{:x}", md5::compute(data))
}

fn credential(user: &str, secret: &Secret, method: AuthMethod) -> Result<Credential, String> {
    match secret {
        Secret::Md5Hash(hash) => Ok(Credential::Md5 {
            hex: hash[3..].to_ascii_lowercase(),
        }),
        Secret::ScramVerifier(text) => parse_verifier(text),
        Secret::Plain(password) => {
            let md5 = md5_hex(format!("{password}{user}").as_bytes());
            if method != AuthMethod::ScramSha256 {
                return Ok(Credential::Md5 { hex: md5 });
            }
            let salt: [u8; 16] = rand::random();
            let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
            let ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } = ScramSecret::verifier_from_salted_password(salt.to_vec(), salted, SCRAM_ITERATIONS)
            else {
                return Err("could not derive a SCRAM verifier".to_string());
            };
            Ok(Credential::Both {
                md5_hex: md5,
                scram: Box::new(Credential::Scram {
                    salt,
                    iterations,
                    stored_key,
                    server_key,
                }),
            })
        }
    }
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
fn parse_verifier(text: &str) -> Result<Credential, String> {
    let bad = || "malformed SCRAM verifier".to_string();
    let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
    let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
    let (iterations, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
    let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |part: &str, what: &str| {
        b64.decode(part)
            .map_err(|e| format!("SCRAM verifier {what} is not base64: {e}"))
    };
    let stored_key = decode(stored, "StoredKey")?;
    let server_key = decode(server, "ServerKey")?;
    if stored_key.len() != 32 || server_key.len() != 32 {
        return Err("SCRAM verifier keys must be 32 bytes (SHA-256)".to_string());
    }
    Ok(Credential::Scram {
        salt: decode(salt, "salt")?,
        iterations: iterations.parse().map_err(|_| bad())?,
        stored_key,
        server_key,
    })
}

/// pgwire's md5 mechanism compares the client's answer with `Password`:
/// `md5` + md5(md5hex(password||user) || salt), salt chosen per login.
#[derive(Debug)]
pub struct Md5Source(pub UserDirectory);

#[async_trait]
impl AuthSource for Md5Source {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        let salt: [u8; 4] = rand::random();
        let expected = match self.0.md5_hex(user) {
            Some(hex) => {
                let mut data = hex.as_bytes().to_vec();
                data.extend_from_slice(&salt);
                format!("md5{}", md5_hex(&data))
            }
            // Unknown or SCRAM-only user: a value no answer can match.
            None => String::from("!"),
        };
        Ok(Password::new(Some(salt.to_vec()), expected.into_bytes()))
    }
}

/// pgwire's SCRAM mechanism asks for the verifier of the user logging in.
#[derive(Debug)]
pub struct ScramSource(pub UserDirectory);

#[async_trait]
impl AuthSource for ScramSource {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        Err(PgWireError::InvalidPassword(
            login.user().unwrap_or_default().to_string(),
        ))
    }

    async fn get_scram_secret(&self, login: &LoginInfo) -> PgWireResult<(ScramSecret, Option<()>)> {
        let user = login.user().unwrap_or_default();
        match self.0.scram(user) {
            Some(secret) => Ok((secret, None)),
            None => Ok((self.0.mock_scram(user), None)),
        }
    }
}

/// Counts failed logins and logs them: at most one line a second per
/// reason, with how many were left out since the last one, so a password
/// guesser cannot flood the log.
pub struct LoginFailures {
    metrics: Arc<Metrics>,
    logged: [LogThrottle; AuthFailure::ALL.len()],
}

impl LoginFailures {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub fn new(metrics: Arc<Metrics>) -> LoginFailures {
        LoginFailures {
            metrics,
            logged: std::array::from_fn(|_| LogThrottle::new(Self::INTERVAL)),
        }
    }

    /// Records one failure; `user` is what the client sent (never a password).
    pub fn record(&self, reason: AuthFailure, user: Option<&str>, client: Option<SocketAddr>) {
        self.metrics.auth_failure(reason);
        let Some(suppressed) = self.logged[reason as usize].admit() else {
            return;
        };
        let client = client.map(|a| a.to_string()).unwrap_or_default();
        // `?user`: Debug quotes and escapes it, so a name cannot forge log lines.
        tracing::warn!(
            reason = reason.as_str(),
            user = ?user.unwrap_or_default(),
            %client,
            suppressed,
            "client login failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_parsing() {
        let good = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$o6dGnqtmhb5jFNJrFrzThCYw0Lu1lDw2Yx7y6zQbEvg=:FUyRoJvbPo9gxnhT5SjWT1Kq0Zn0o0F1m2lXoA+Fgtk=";
        assert!(matches!(
            parse_verifier(good),
            Ok(Credential::Scram {
                iterations: 4096,
                ..
            })
        ));
        assert!(parse_verifier("SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB").is_err());
        assert!(parse_verifier("SCRAM-SHA-256$x").is_err());
    }

    #[test]
    fn mock_verifiers_are_stable_per_user_and_map() {
        let config = |password: &str| {
            let text = format!(
                "auth: scram-sha-256\nusers: [ {{ name: app, password: {password} }} ]\nshards: [ {{ name: s0, url: \"postgres://u@h/d\" }} ]\n"
            );
            Config::parse(std::path::Path::new("m.yaml"), &text, &|_| None).unwrap()
        };
        let directory = UserDirectory::from_config(&config("one")).unwrap();
        let salt = |d: &UserDirectory, user: &str| match d.mock_scram(user) {
            ScramSecret::Verifier {
                salt, iterations, ..
            } => (salt, iterations),
            ScramSecret::SaltedPassword { .. } => panic!("verifier expected"),
        };
        assert_eq!(salt(&directory, "mallory"), salt(&directory, "mallory"));
        assert_eq!(salt(&directory, "mallory").1, SCRAM_ITERATIONS);
        assert_eq!(salt(&directory, "mallory").0.len(), 16);
        assert_ne!(salt(&directory, "mallory"), salt(&directory, "eve"));
        let other = UserDirectory::from_config(&config("two")).unwrap();
        assert_ne!(salt(&directory, "mallory"), salt(&other, "mallory"));
    }

    #[test]
    fn md5_of_password_and_user() {
        // Postgres: 'md5' || md5('secret' || 'app')
        let c = credential("app", &Secret::Plain("secret".into()), AuthMethod::Md5).unwrap();
        let Credential::Md5 { hex } = c else {
            panic!("md5 expected")
        };
        assert_eq!(hex, md5_hex(b"secretapp"));
    }
}
