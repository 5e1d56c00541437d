//! TLS for PostgreSQL connections (the sink, lookups, change data capture), configured as
//! libpq is: `sslmode` and `sslrootcert` in the URL.
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no |
//! | `verify-ca` | always | chain, against the roots |
//! | `verify-full` | always | chain and host name |
//!
//! Roots: the PEM file `sslrootcert` names, else the system's. tokio-postgres itself knows
//! only disable/prefer/require, so the URL is rewritten for it and the checks are ours
//! (rustls, through tokio-postgres-rustls).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A PostgreSQL URL with its TLS settings taken out.
#[derive(Debug, Clone)]
pub struct PgUrl {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// Parses a `postgres://` URL (or a key=value string, passed to tokio-postgres as is).
pub fn parse(url: &str) -> anyhow::Result<PgUrl> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let config = url.parse().map_err(|e| anyhow::anyhow!("postgres url: {e}"))?;
        return Ok(PgUrl { config, mode: SslMode::Prefer, root_cert: None });
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut mode, mut root_cert) = (SslMode::Prefer, None);
    let mut keep = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("sslmode", v) => {
                mode = match v {
                    "disable" => SslMode::Disable,
                    "prefer" | "allow" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => anyhow::bail!("postgres url: sslmode={other}: use disable, prefer, require, verify-ca or verify-full"),
                }
            }
            ("sslrootcert", v) => root_cert = Some(PathBuf::from(v)),
            _ => keep.push(kv.to_string()),
        }
    }
    let theirs = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    keep.push(format!("sslmode={theirs}"));
    let config = format!("{base}?{}", keep.join("&")).parse().map_err(|e| anyhow::anyhow!("postgres url: {e}"))?;
    Ok(PgUrl { config, mode, root_cert })
}

impl PgUrl {
    /// The rustls settings for this mode.
    pub fn tls(&self) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(NoCheck(provider)),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let inner: Arc<dyn ServerCertVerifier> = match &self.root_cert {
                    Some(path) => {
                        let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
                        let mut roots = rustls::RootCertStore::empty();
                        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                            let cert: CertificateDer<'static> = cert.map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
                            roots.add(cert).map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
                        }
                        if roots.is_empty() {
                            anyhow::bail!("sslrootcert {} holds no PEM certificate", path.display());
                        }
                        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                            .build()
                            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
                    }
                    None => Arc::new(
                        rustls_platform_verifier::Verifier::new(provider).map_err(|e| anyhow::anyhow!("TLS: system roots: {e}"))?,
                    ),
                };
                if self.mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly(inner))
                } else {
                    inner
                }
            }
        };
        let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    /// Connects; the connection runs on its own task (ending with a warning naming `what`).
    pub async fn connect(&self, what: &'static str) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let (client, conn) = self.config.connect(self.tls()?).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "{what} connection closed");
            }
        });
        Ok((client, task))
    }

    /// The same settings for the replication connection (pgwire-replication speaks libpq's
    /// modes itself).
    pub fn replication_tls(&self) -> pgwire_replication::config::TlsConfig {
        use pgwire_replication::config::{SslMode as M, TlsConfig};
        let mode = match self.mode {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            SslMode::Require => M::Require,
            SslMode::VerifyCa => M::VerifyCa,
            SslMode::VerifyFull => M::VerifyFull,
        };
        TlsConfig { mode, ca_pem_path: self.root_cert.clone(), ..Default::default() }
    }
}

/// `prefer` and `require`: encrypted, certificate not checked (libpq's meaning of them).
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let u = parse("postgres://a:b@h:5433/db?application_name=x&sslmode=verify-full&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(u.mode, SslMode::VerifyFull);
        assert_eq!(u.root_cert.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert_eq!(u.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(u.config.get_application_name(), Some("x"));
        assert_eq!(parse("postgres://h/db").unwrap().mode, SslMode::Prefer);
        assert_eq!(parse("postgres://h/db?sslmode=disable").unwrap().config.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        assert!(parse("postgres://h/db?sslmode=sometimes").unwrap_err().to_string().contains("sslmode=sometimes"));
        assert!(parse("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent").unwrap().tls().is_err());
    }
}
