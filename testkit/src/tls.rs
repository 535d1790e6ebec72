//! A throwaway certificate authority for the TLS tests: a CA, server
//! certificates for `localhost`/`127.0.0.1`, and client certificates whose
//! subject carries a role (`OU`), all written as PEM files into a folder the
//! test owns, the way an operator's PKI hands them to shardline.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One CA that signs every certificate asked of it.
pub struct Pki {
    dir: PathBuf,
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM), what clients and servers trust.
    pub ca: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = dn(&format!("{name} test CA"), None);
        let key = KeyPair::generate().context("CA key")?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("self-sign the CA")?;
        let ca = dir.join(format!("{name}-ca.pem"));
        write(&ca, &issuer.pem())?;
        Ok(Self { dir: dir.to_owned(), name: name.to_owned(), issuer, ca })
    }

    /// A server certificate valid for `localhost` and `127.0.0.1`.
    pub fn server(&self, file: &str) -> anyhow::Result<Pair> {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = CertificateParams::new(names).context("server parameters")?;
        params.distinguished_name = dn("localhost", None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, file)
    }

    /// A client certificate for `cn`, with `OU=role` when a role is given.
    pub fn client(&self, file: &str, cn: &str, role: Option<&str>) -> anyhow::Result<Pair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).context("client parameters")?;
        params.distinguished_name = dn(cn, role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, file)
    }

    fn issue(&self, params: CertificateParams, file: &str) -> anyhow::Result<Pair> {
        let key = KeyPair::generate().context("leaf key")?;
        let cert = params.signed_by(&key, &self.issuer).with_context(|| format!("sign {file}"))?;
        let pair = Pair {
            cert: self.dir.join(format!("{}-{file}.pem", self.name)),
            key: self.dir.join(format!("{}-{file}-key.pem", self.name)),
        };
        write(&pair.cert, &cert.pem())?;
        write(&pair.key, &key.serialize_pem())?;
        Ok(pair)
    }
}

fn dn(cn: &str, ou: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(ou) = ou {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    dn
}

fn write(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_files_signed_by_the_ca() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path(), "t")?;
        let server = pki.server("server")?;
        let client = pki.client("admin", "ops", Some("admin"))?;
        for path in [&pki.ca, &server.cert, &client.cert] {
            assert!(std::fs::read_to_string(path)?.starts_with("-----BEGIN CERTIFICATE-----"));
        }
        assert!(std::fs::read_to_string(&client.key)?.contains("PRIVATE KEY"));
        Ok(())
    }
}
