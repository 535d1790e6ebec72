//! Secrets and TLS files named by a config: read when the config is
//! loaded, so a missing or unreadable file is a config error naming the
//! field, not a failure at the first connection. Secrets come from files
//! (Kubernetes mounts Secrets as files) or the environment, so a config
//! file, often a ConfigMap, need not hold them.

use std::path::{Path, PathBuf};

use crate::{Invalid, ensure};

/// The text of a secret file, without the trailing newline editors and
/// `kubectl create secret --from-file` leave. Empty is refused: an empty
/// token would authenticate nobody, or worse, everybody.
pub fn read_secret(field: &str, path: &Path) -> Result<String, Invalid> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Invalid::new(field, format!("`{}`", path.display()), format!("a readable file ({e})"))
    })?;
    let secret = text.trim_end_matches(['\r', '\n']).to_owned();
    ensure(
        !secret.is_empty(),
        field,
        format!("`{}`, an empty file", path.display()),
        "a file holding the secret",
    )?;
    Ok(secret)
}

/// A readable PEM file holding at least one `-----BEGIN` block.
pub fn check_pem(field: &str, path: &Path) -> Result<(), Invalid> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Invalid::new(field, format!("`{}`", path.display()), format!("a readable PEM file ({e})"))
    })?;
    let shown = format!("`{}`, which holds no PEM block", path.display());
    ensure(text.contains("-----BEGIN "), field, shown, "a PEM file (-----BEGIN ...)")
}

/// How a client reaches a TLS server: the CA that signed the server's
/// certificate, and its own certificate and key for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate, for servers that require one.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// Every file readable PEM; `cert` and `key` both or neither.
    pub fn check(&self, table: &str) -> Result<(), Invalid> {
        let each = || {
            check_pem("ca", &self.ca)?;
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => {
                    check_pem("cert", cert)?;
                    check_pem("key", key)
                }
                (None, None) => Ok(()),
                (Some(_), None) => {
                    Err(Invalid::new("key", "missing", "the client certificate's key, with `cert`"))
                }
                (None, Some(_)) => Err(Invalid::new("cert", "missing", "the client certificate, with `key`")),
            }
        };
        each().map_err(|e| e.under(table))
    }

    /// The PEM texts: (CA, optional (cert, key)). Read again at connect
    /// time; [`ClientTls::check`] has vouched for them at load.
    pub fn read(&self) -> std::io::Result<(String, Option<(String, String)>)> {
        let ca = std::fs::read_to_string(&self.ca)?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((std::fs::read_to_string(cert)?, std::fs::read_to_string(key)?)),
            _ => None,
        };
        Ok((ca, identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_its_newline_and_may_not_be_empty_or_missing() {
        let dir = std::env::temp_dir().join(format!("shardline-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").ok();
        assert_eq!(read_secret("auth_token_file", &file), Ok("s3cret".into()));
        std::fs::write(&file, "\n").ok();
        let e = read_secret("auth_token_file", &file).map_err(|e| e.to_string());
        assert!(e.as_ref().is_err_and(|e| e.contains("an empty file")), "{e:?}");
        let e = read_secret("auth_token_file", &dir.join("absent")).map_err(|e| e.field);
        assert_eq!(e, Err("auth_token_file".into()));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn client_tls_needs_a_pem_ca_and_cert_with_key() {
        let dir = std::env::temp_dir().join(format!("shardline-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").ok();
        let tls = ClientTls { ca: pem.clone(), cert: None, key: None };
        assert_eq!(tls.check("tls"), Ok(()));
        let half = ClientTls { ca: pem.clone(), cert: Some(pem.clone()), key: None };
        assert_eq!(half.check("tls").map_err(|e| e.field), Err("tls.key".into()));
        let text = dir.join("not.pem");
        std::fs::write(&text, "hello").ok();
        let bad = ClientTls { ca: text, cert: None, key: None };
        assert_eq!(bad.check("tls").map_err(|e| e.field), Err("tls.ca".into()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
