//! Connecting to RabbitMQ: the one function every AMQP connection of the
//! worker, the coordinator and the test harnesses goes through, so
//! `amqp_tls` (the CA an `amqps://` broker's certificate chains to, and a
//! client certificate for brokers that require one) reaches all of them.
//!
//! lapin speaks TLS through rustls for `amqps://` URLs; the CA is added to
//! the system's roots. Without `amqp_tls` an `amqps://` broker must carry
//! a publicly trusted certificate.

use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::{ClientTls, Invalid, ensure};

/// `amqp_tls` is checked (readable PEM files) and only set with an
/// `amqps://` URL, where it would otherwise go unused.
pub fn check_amqp_tls(url: &str, tls: Option<&ClientTls>) -> Result<(), Invalid> {
    let Some(tls) = tls else { return Ok(()) };
    let allowed = "an amqps:// amqp_url, or no amqp_tls";
    ensure(url.starts_with("amqps://"), "amqp_tls", "set while amqp_url is not amqps://", allowed)?;
    tls.check("amqp_tls")
}

/// Connects to `url` as `name` (shown in RabbitMQ's connection list),
/// trusting `tls`'s CA and presenting its certificate. The PEM files are
/// read now, so renewed certificates count from the next connection.
pub async fn connect(url: &str, tls: Option<&ClientTls>, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let config = match tls {
        None => OwnedTLSConfig::default(),
        Some(tls) => {
            let (ca, identity) = tls.read().map_err(|e| {
                let e = std::io::Error::new(e.kind(), format!("amqp_tls: cannot read a PEM file: {e}"));
                lapin::Error::from(ErrorKind::IOError(Arc::new(e)))
            })?;
            let identity = identity
                .map(|(cert, key)| OwnedIdentity::PKCS8 { pem: cert.into_bytes(), key: key.into_bytes() });
            OwnedTLSConfig { cert_chain: Some(ca), identity }
        }
    };
    let connected =
        Connection::connect_with_config(url, props, config, lapin::runtime::default_runtime()?).await;
    connected.map_err(|e| match e.kind() {
        // rustls says what is wrong with the certificate, not whose CA
        // was asked: say which, so the operator knows what to fix.
        ErrorKind::IOError(io) if io.to_string().contains("certificate") => {
            let trusted = match tls {
                Some(tls) => format!("amqp_tls.ca `{}` and the system's roots", tls.ca.display()),
                None => "the system's roots (set amqp_tls.ca for a private CA)".to_owned(),
            };
            let e = std::io::Error::new(
                io.kind(),
                format!("{io} (the broker's certificate, checked against {trusted})"),
            );
            lapin::Error::from(ErrorKind::IOError(Arc::new(e)))
        }
        _ => e,
    })
}
