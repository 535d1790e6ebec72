//! Who may call what. Every call is authenticated by the interceptor
//! ([`Auth`]): a bearer token (compared in constant time with each
//! configured one) or, with mutual TLS, the client certificate's subject
//! `OU` names a [`Role`]. The role rides in the request's extensions and
//! each RPC states the [`Access`] it needs ([`allow`]).
//!
//! - `worker`: the worker service only (register, heartbeat, checkpoint
//!   and release what it holds: the core refuses the rest).
//! - `viewer`: the admin service's reads (leases, checkpoints, workers,
//!   usage, health, subscriptions), nothing that changes state or exports it.
//! - `admin`: everything.
//!
//! With no credential configured at all (allowed only on a loopback
//! `listen`), every caller is admin, as before roles existed.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// What a credential grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Worker,
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Worker => "worker",
            Self::Viewer => "viewer",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [Self::Admin, Self::Worker, Self::Viewer].into_iter().find(|r| r.name() == name)
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The worker service.
    Work,
    /// An admin read.
    Read,
    /// An admin change, or an export (it holds every checkpoint).
    Write,
}

impl Access {
    fn granted_to(self, role: Role) -> bool {
        matches!((self, role), (_, Role::Admin) | (Self::Work, Role::Worker) | (Self::Read, Role::Viewer))
    }

    fn needs(self) -> &'static str {
        match self {
            Self::Work => "the worker or admin role",
            Self::Read => "the viewer or admin role",
            Self::Write => "the admin role",
        }
    }
}

/// The authenticated caller, put into each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub role: Role,
}

/// The tokens a coordinator accepts, by role (the config's resolved
/// `*_token` / `*_token_file` / `SHARDLINE_*TOKEN`).
#[derive(Default, Clone)]
pub struct Tokens {
    pub admin: Option<String>,
    pub worker: Option<String>,
    pub viewer: Option<String>,
}

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.admin.is_none() && self.worker.is_none() && self.viewer.is_none()
    }
}

/// The interceptor on both services.
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<Vec<(Vec<u8>, Role)>>,
    /// Client certificates may carry a role (`tls.client_ca` is set).
    certificates: bool,
    /// `Some`: every call through this interceptor needs it (the worker
    /// service); the admin service's handlers check per call.
    need: Option<Access>,
}

impl Auth {
    pub fn new(tokens: &Tokens, certificates: bool) -> Self {
        let each =
            [(&tokens.admin, Role::Admin), (&tokens.worker, Role::Worker), (&tokens.viewer, Role::Viewer)];
        let tokens = each.into_iter().filter_map(|(t, role)| Some((t.clone()?.into_bytes(), role))).collect();
        Self { tokens: Arc::new(tokens), certificates, need: None }
    }

    /// The same credentials, every call needing `access`.
    pub fn requiring(&self, access: Access) -> Self {
        Self { need: Some(access), ..self.clone() }
    }

    /// No credential configured: everyone is admin (loopback only, see
    /// the config's checks).
    fn open(&self) -> bool {
        self.tokens.is_empty() && !self.certificates
    }

    fn role_of<T>(&self, req: &Request<T>) -> Result<Role, Status> {
        if self.open() {
            return Ok(Role::Admin);
        }
        let header = req.metadata().get("authorization").map(|v| v.to_str().unwrap_or_default());
        if let Some(header) = header {
            let Some(token) = header.strip_prefix("Bearer ") else {
                return Err(Status::unauthenticated("the authorization header is not `Bearer TOKEN`"));
            };
            return self.by_token(token.as_bytes()).ok_or_else(|| Status::unauthenticated("wrong token"));
        }
        if self.certificates
            && let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
        {
            return role_of_certificate(leaf).map_err(Status::permission_denied);
        }
        Err(Status::unauthenticated(if self.certificates {
            "no credentials: send `authorization: Bearer TOKEN` or a client certificate whose subject has OU=admin, worker or viewer"
        } else {
            "no credentials: send `authorization: Bearer TOKEN`"
        }))
    }

    /// Every configured token is compared, each in constant time, so the
    /// time taken tells nothing about how much of a guess was right.
    fn by_token(&self, given: &[u8]) -> Option<Role> {
        let mut found = None;
        for (token, role) in self.tokens.iter() {
            if bool::from(token.as_slice().ct_eq(given)) {
                found = Some(*role);
            }
        }
        found
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let role = self.role_of(&req)?;
        if let Some(need) = self.need {
            check(role, need)?;
        }
        req.extensions_mut().insert(Caller { role });
        Ok(req)
    }
}

/// `Ok` if the request's caller may do what `access` covers. A request
/// that did not pass the interceptor has no caller and is refused.
pub fn allow<T>(req: &Request<T>, access: Access) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(caller) => check(caller.role, access),
        None => Err(Status::internal("the call was not authenticated (no caller); refusing it")),
    }
}

fn check(role: Role, access: Access) -> Result<(), Status> {
    if access.granted_to(role) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the {} role may not make this call: it needs {}",
            role.name(),
            access.needs()
        )))
    }
}

/// The role a client certificate names in its subject's `OU`.
fn role_of_certificate(der: &[u8]) -> Result<Role, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let units: Vec<&str> =
        cert.subject().iter_organizational_unit().filter_map(|ou| ou.as_str().ok()).collect();
    units.iter().find_map(|ou| Role::from_name(ou)).ok_or_else(|| {
        format!(
            "the client certificate (subject `{}`) names no role: its OU must be admin, worker or viewer, or send a token",
            cert.subject()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn bearer(token: &str) -> Request<()> {
        let mut req = Request::new(());
        if let Ok(value) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", value);
        }
        req
    }

    fn tokens() -> Tokens {
        Tokens { admin: Some("adm".into()), worker: Some("wrk".into()), viewer: Some("vw".into()) }
    }

    #[test]
    fn each_token_gets_its_role_and_a_wrong_one_nothing() {
        let auth = Auth::new(&tokens(), false);
        assert_eq!(auth.role_of(&bearer("adm")).ok(), Some(Role::Admin));
        assert_eq!(auth.role_of(&bearer("wrk")).ok(), Some(Role::Worker));
        assert_eq!(auth.role_of(&bearer("vw")).ok(), Some(Role::Viewer));
        for wrong in ["ad", "admx", "", "WRK"] {
            let e = auth.role_of(&bearer(wrong)).err().map(|s| s.code());
            assert_eq!(e, Some(tonic::Code::Unauthenticated), "{wrong:?}");
        }
        let none = auth.role_of(&Request::new(())).err().map(|s| s.code());
        assert_eq!(none, Some(tonic::Code::Unauthenticated));
    }

    #[test]
    fn with_no_credentials_configured_everyone_is_admin() {
        let auth = Auth::new(&Tokens::default(), false);
        assert_eq!(auth.role_of(&Request::new(())).ok(), Some(Role::Admin));
        // Certificates configured: no longer open.
        let certs = Auth::new(&Tokens::default(), true);
        assert!(certs.role_of(&Request::new(())).is_err());
    }

    #[test]
    fn roles_grant_what_the_threat_model_says() {
        use Access::*;
        let grants = |role| [Work, Read, Write].map(|a| a.granted_to(role));
        assert_eq!(grants(Role::Admin), [true, true, true]);
        assert_eq!(grants(Role::Worker), [true, false, false]);
        assert_eq!(grants(Role::Viewer), [false, true, false]);
    }

    #[test]
    fn the_worker_service_refuses_a_viewer_and_admin_calls_check_the_caller() {
        let auth = Auth::new(&tokens(), false);
        let mut work = auth.requiring(Access::Work);
        let denied = work.call(bearer("vw")).err().map(|s| s.code());
        assert_eq!(denied, Some(tonic::Code::PermissionDenied));
        assert!(work.call(bearer("wrk")).is_ok());
        let mut admin = auth.clone();
        let Ok(req) = admin.call(bearer("wrk")) else { panic!("a worker token authenticates") };
        let e = allow(&req, Access::Write).err();
        assert_eq!(e.as_ref().map(Status::code), Some(tonic::Code::PermissionDenied));
        assert!(e.is_some_and(|s| s.message().contains("the worker role")));
        assert!(allow(&Request::new(()), Access::Read).is_err(), "no caller, no access");
    }

    #[test]
    fn a_certificate_names_its_role_in_ou() -> Result<(), rcgen::Error> {
        let cert = |ou: Option<&str>| -> Result<Vec<u8>, rcgen::Error> {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(rcgen::DnType::CommonName, "w1");
            if let Some(ou) = ou {
                params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, ou);
            }
            let key = rcgen::KeyPair::generate()?;
            Ok(params.self_signed(&key)?.der().to_vec())
        };
        assert_eq!(role_of_certificate(&cert(Some("worker"))?), Ok(Role::Worker));
        assert_eq!(role_of_certificate(&cert(Some("viewer"))?), Ok(Role::Viewer));
        let none = role_of_certificate(&cert(None)?);
        assert!(none.is_err_and(|e| e.contains("names no role")));
        let other = role_of_certificate(&cert(Some("root"))?);
        assert!(other.is_err());
        Ok(())
    }
}
