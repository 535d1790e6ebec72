//! What a client (a worker or the CLI) presents to a coordinator: TLS
//! for `https://` URLs (the CA to verify the coordinator with, and a
//! client certificate for mutual TLS) and a bearer token. One home for how
//! a channel is dialled and a request is signed, so the worker and the CLI
//! cannot drift apart on either.

use std::fmt;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// PEM texts for TLS: the CA certificate(s) and an optional client
/// certificate with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub ca: String,
    pub identity: Option<(String, String)>,
}

/// How a client authenticates; `Debug` hides the token and the key.
#[derive(Clone, Default)]
pub struct Credentials {
    /// `Bearer TOKEN`, checked to be a header value once, here.
    authorization: Option<AsciiMetadataValue>,
    tls: Option<TlsPem>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.authorization.as_ref().map(|_| "***"))
            .field("tls", &self.tls.as_ref().map(|t| if t.identity.is_some() { "ca+client" } else { "ca" }))
            .finish()
    }
}

impl Credentials {
    /// Refuses a token an HTTP header cannot carry (a control or
    /// non-ASCII character), which could never authenticate.
    pub fn new(token: Option<String>, tls: Option<TlsPem>) -> Result<Self, String> {
        let authorization = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                "the token holds a character an HTTP header cannot carry (allowed: visible ASCII)".to_owned()
            })?),
        };
        Ok(Self { authorization, tls })
    }

    /// A lazy channel to `url`: nothing is dialled until the first call.
    /// An `https://` URL is verified against the configured CA, or against
    /// the system's roots when none is configured.
    pub fn channel(
        &self,
        url: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Channel, String> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("`{url}` is not a URL a client can dial: {e}"))?
            .connect_timeout(connect_timeout)
            .timeout(timeout);
        if url.starts_with("https://") {
            let config = match &self.tls {
                Some(tls) => {
                    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
                    if let Some((cert, key)) = &tls.identity {
                        config = config.identity(Identity::from_pem(cert, key));
                    }
                    config
                }
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint.tls_config(config).map_err(|e| format!("TLS for `{url}`: {e}"))?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// `message` with `authorization: Bearer TOKEN` when a token is set.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }
}

/// A hint for a failed call's message when the failure looks like TLS on
/// one side only: a plaintext client to a TLS coordinator sees its
/// connection dropped or an HTTP/2 protocol error, a TLS client to a
/// plaintext one (or with the wrong CA) a handshake error. Only transport
/// failures qualify: an answer from the coordinator (a refused token, say)
/// never does.
pub fn tls_hint(url: &str, status: &tonic::Status) -> Option<&'static str> {
    use tonic::Code;
    if !matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled) {
        return None;
    }
    let lower = crate::endpoints::describe(status).to_ascii_lowercase();
    let transport =
        ["connection reset", "broken pipe", "h2 protocol error", "connection closed", "unexpected eof"]
            .iter()
            .any(|s| lower.contains(s));
    if url.starts_with("http://") && transport {
        return Some(
            "if the coordinator serves TLS, use an https:// URL and set the CA (`tls.ca`, or --tls-ca)",
        );
    }
    let handshake = [
        "invalidcontenttype",
        "corrupt message",
        "tls handshake",
        "invalid certificate",
        "unknownissuer",
        "certificate",
    ]
    .iter()
    .any(|s| lower.contains(s));
    if url.starts_with("https://") && handshake {
        return Some(
            "TLS failed: check that the coordinator serves TLS, that `tls.ca` signed its certificate, and that a client certificate it accepts is set when it requires one",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        let c = Credentials::new(Some("hunter2".into()), None);
        assert!(c.is_ok_and(|c| !format!("{c:?}").contains("hunter2")));
        assert!(Credentials::new(Some("bad\ntoken".into()), None).is_err());
    }

    #[test]
    fn requests_carry_the_bearer_token_and_none_without_one() {
        let signed = Credentials::new(Some("t0k".into()), None).map(|c| c.request(()));
        let header = signed.ok().and_then(|r| r.metadata().get("authorization").cloned());
        assert_eq!(header.as_ref().and_then(|v| v.to_str().ok()), Some("Bearer t0k"));
        let unsigned = Credentials::new(Some(String::new()), None).map(|c| c.request(()));
        assert!(unsigned.is_ok_and(|r| r.metadata().get("authorization").is_none()));
    }

    #[test]
    fn hints_name_tls_when_only_one_side_speaks_it() {
        use tonic::Status;
        let reset = Status::unavailable("error trying to connect: connection reset by peer");
        assert!(tls_hint("http://c:7400", &reset).is_some());
        assert!(tls_hint("https://c:7400", &reset).is_none(), "a reset says nothing about TLS on https");
        let h2 = Status::internal("h2 protocol error: http2 error");
        assert!(tls_hint("http://c:7400", &h2).is_some());
        let issuer = Status::unknown("transport error: invalid peer certificate: UnknownIssuer");
        assert!(tls_hint("https://c:7400", &issuer).is_some());
        let refused = Status::unavailable("tcp connect error: Connection refused");
        assert!(tls_hint("http://c:7400", &refused).is_none());
        let answered = Status::permission_denied("the client certificate names no role");
        assert!(tls_hint("https://c:7400", &answered).is_none(), "an answer is not a TLS failure");
    }
}
