//! The TLS acceptor for `tls: { cert, key }` (PEM files).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("tls.key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("tls: certificate and key do not form a valid server identity: {0}")]
    Config(String),
}

pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_path = config.cert.display().to_string();
    let key_path = config.key.display().to_string();
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| TlsError::Certificate {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_path,
            reason: "no PEM certificate found".to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Key {
        path: key_path,
        reason: e.to_string(),
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let server_config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server_config)))
}
