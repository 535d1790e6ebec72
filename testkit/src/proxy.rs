//! A TCP proxy put between a process and what it talks to, so network
//! faults can be injected on one link without touching either process: the
//! load harness puts one between each worker and the coordinator, the
//! failover tests one between a coordinator and PostgreSQL.
//!
//! Each worker's config names its own proxy (127.0.0.1, a port the OS
//! chose) as the coordinator; the proxy dials the coordinator's real
//! address per connection, so a coordinator restarted on the same address
//! (the harness pins the port) is reached again by the next connection.
//!
//! Modes:
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Frozen`]: nothing is forwarded either way; bytes already read
//!   are held and the sockets are simply not read any more, so TCP
//!   back-pressure stalls the sender, as in a network partition. New
//!   connections are accepted but not dialled through until the freeze
//!   ends. At the end the held bytes flow on: the byte streams stay intact,
//!   so HTTP/2 framing survives and the client needs no reconnect, which is
//!   also what a healed partition looks like to TCP.
//! - [`Mode::DropReplies`]: client→coordinator bytes are forwarded,
//!   coordinator→client bytes are read and discarded: the coordinator
//!   hears every heartbeat, the worker hears nothing. Dropping bytes breaks
//!   HTTP/2 framing, so [`Proxy::close_all`] ends every connection when the
//!   period is over and the client reconnects.
//!
//! The proxy records when it last forwarded client→coordinator bytes: the
//! coordinator's last heartbeat from that worker is at or before that
//! instant, which bounds when the worker's session can have ended.
//!
//! [`Proxy::start_tls`] terminates TLS: clients speak TLS to the proxy,
//! which presents a certificate of the test's [`crate::tls::Pki`] and
//! forwards plain bytes. It stands in for a broker's TLS listener (an
//! `amqps://` RabbitMQ) in front of the plain brokers the tests run; the
//! modes apply to it alike.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Wall-clock milliseconds, as the harness's ledger counts them.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Bytes read at a time per direction: control traffic is small.
const BUF: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Frozen,
    DropReplies,
}

/// What every connection task watches: the mode, and a counter bumped to
/// close every connection opened before it.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: Mode,
    closes: u64,
}

/// The client→coordinator record.
#[derive(Debug, Default)]
struct Upstream {
    /// Wall-clock ms of the last client→coordinator bytes forwarded.
    last_ms: Option<u64>,
    /// Marks set by [`Proxy::mark_resumed`]: (mark, first forward at or
    /// after it). Only the newest can still be open.
    marks: Vec<(u64, Option<u64>)>,
}

struct Shared {
    /// `host:port` of the coordinator.
    target: Mutex<String>,
    control: watch::Sender<Control>,
    upstream: Mutex<Upstream>,
    /// Set: clients speak TLS to the proxy ([`Proxy::start_tls`]).
    tls: Option<TlsAcceptor>,
}

impl Shared {
    fn upstream(&self) -> MutexGuard<'_, Upstream> {
        self.upstream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Books client→coordinator bytes forwarded now.
    fn forwarded_up(&self) {
        let now = now_ms();
        let mut up = self.upstream();
        up.last_ms = Some(now);
        if let Some((_, first @ None)) = up.marks.last_mut() {
            *first = Some(now);
        }
    }
}

/// One worker's proxy; its tasks (listener and connections) end when it is
/// dropped.
pub struct Proxy {
    url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The listener task owns the connection tasks (a JoinSet), so
        // aborting it ends them all.
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a port the OS chooses) and forwards to the
    /// coordinator at `target_url` (`http://host:port`).
    pub async fn start(target_url: &str) -> anyhow::Result<Self> {
        Self::listen(target_url, None).await
    }

    /// The same, terminating TLS with `server` (a certificate and key, PEM)
    /// and forwarding plain bytes to `target_url` (`http://` or `tcp://`
    /// `host:port`).
    pub async fn start_tls(target_url: &str, server: &crate::tls::Pair) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_file_iter(&server.cert)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("cannot read {}", server.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&server.key)
            .with_context(|| format!("cannot read {}", server.key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the proxy's server certificate")?;
        Self::listen(target_url, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn listen(target_url: &str, tls: Option<TlsAcceptor>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.context("cannot bind the worker proxy")?;
        let addr = listener.local_addr().context("the worker proxy has no local address")?;
        let (control, _) = watch::channel(Control { mode: Mode::Pass, closes: 0 });
        let shared = Arc::new(Shared {
            target: Mutex::new(authority(target_url)?),
            control,
            upstream: Mutex::new(Upstream::default()),
            tls,
        });
        let task = tokio::spawn(accept(listener, shared.clone()));
        Ok(Self { url: format!("http://{addr}"), addr, shared, task })
    }

    /// The address it listens on (127.0.0.1, a port the OS chose).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to give the worker as its coordinator.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Points new connections at `target_url` (a coordinator that moved).
    pub fn retarget(&self, target_url: &str) -> anyhow::Result<()> {
        let authority = authority(target_url)?;
        *self.shared.target.lock().unwrap_or_else(PoisonError::into_inner) = authority;
        Ok(())
    }

    /// Starts a fault (or [`Mode::Pass`]: ends one without a mark).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.control.send_modify(|c| c.mode = mode);
    }

    /// Ends a fault: back to [`Mode::Pass`], with every connection open
    /// now closed first when `close` (one change, so no connection opened
    /// in between can keep the fault's mode). Returns the mark for
    /// [`Proxy::first_up_after`]: set before the bytes flow again, so the
    /// first of them is seen.
    pub fn resume(&self, close: bool) -> u64 {
        let mark = self.mark_resumed();
        self.shared.control.send_modify(|c| {
            c.mode = Mode::Pass;
            if close {
                c.closes += 1;
            }
        });
        mark
    }

    /// Wall-clock ms of the last client→coordinator bytes forwarded.
    pub fn last_up_ms(&self) -> Option<u64> {
        self.shared.upstream().last_ms
    }

    /// Starts watching for the first client→coordinator bytes forwarded
    /// from now on; returns the mark.
    fn mark_resumed(&self) -> u64 {
        let mark = now_ms();
        self.shared.upstream().marks.push((mark, None));
        mark
    }

    /// When client→coordinator bytes were first forwarded after `mark`
    /// (`None`: not yet).
    pub fn first_up_after(&self, mark: u64) -> Option<u64> {
        self.shared.upstream().marks.iter().find(|(m, _)| *m == mark).and_then(|(_, first)| *first)
    }
}

/// `host:port` of an `http://host:port[/]` (or `tcp://`) URL.
fn authority(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("the proxy needs an http:// or tcp:// URL, not {url}"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        anyhow::bail!("the proxy needs a URL of the form http://host:port, not {url}");
    }
    Ok(authority.to_owned())
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(connection(client, shared.clone()));
                }
                // Out of descriptors and the like: the worker's own retry
                // dials again, and the figures show the gap.
                Err(e) => {
                    eprintln!("warning: the worker proxy cannot accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client connection: held while frozen, then dialled through and
/// pumped both ways until either side closes or [`Proxy::close_all`].
async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let mut control = shared.control.subscribe();
    let closes = control.borrow().closes;
    if wait_unfrozen(&mut control, closes).await.is_err() {
        return;
    }
    // Without TCP_NODELAY small gRPC frames only wait longer; a socket
    // that refuses it still forwards correctly.
    nodelay(&client);
    match shared.tls.clone() {
        None => {
            let (read, write) = client.into_split();
            forward(read, write, shared, closes).await;
        }
        // The handshake before the target is dialled: a client that
        // refuses the certificate (a test's wrong CA) reaches nothing.
        Some(acceptor) => match acceptor.accept(client).await {
            Ok(tls) => {
                let (read, write) = tokio::io::split(tls);
                forward(read, write, shared, closes).await;
            }
            Err(e) => eprintln!("the TLS proxy: handshake failed: {e}"),
        },
    }
}

fn nodelay(socket: &TcpStream) {
    if let Err(e) = socket.set_nodelay(true) {
        eprintln!("warning: the worker proxy cannot set TCP_NODELAY: {e}");
    }
}

/// Dials the target and pumps both ways.
async fn forward(
    client_read: impl AsyncRead + Unpin,
    client_write: impl AsyncWrite + Unpin,
    shared: Arc<Shared>,
    closes: u64,
) {
    let target = shared.target.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let Ok(server) = TcpStream::connect(&target).await else {
        // The coordinator is down (restarting): dropping the client's
        // socket is what it would see without the proxy.
        return;
    };
    nodelay(&server);
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Direction::Up, shared.clone(), closes);
    let down = pump(server_read, client_write, Direction::Down, shared, closes);
    // Either direction ending ends the connection: the other half's
    // socket is dropped with this task.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client → coordinator.
    Up,
    /// Coordinator → client.
    Down,
}

/// Closed by [`Proxy::close_all`] (or the proxy is gone).
struct Closed;

/// Waits while the proxy is frozen.
async fn wait_unfrozen(control: &mut watch::Receiver<Control>, closes: u64) -> Result<(), Closed> {
    loop {
        let now = *control.borrow_and_update();
        if now.closes != closes {
            return Err(Closed);
        }
        if now.mode != Mode::Frozen {
            return Ok(());
        }
        control.changed().await.map_err(|_| Closed)?;
    }
}

/// Copies one direction, obeying the mode before each read and again
/// before each write (a read that was under way when a freeze began must
/// not be forwarded during it).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    direction: Direction,
    shared: Arc<Shared>,
    closes: u64,
) {
    let mut control = shared.control.subscribe();
    let mut buf = vec![0u8; BUF];
    loop {
        if wait_unfrozen(&mut control, closes).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A freeze or close while waiting for bytes: look again.
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        if wait_unfrozen(&mut control, closes).await.is_err() {
            return;
        }
        let mode = control.borrow().mode;
        if direction == Direction::Down && mode == Mode::DropReplies {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if direction == Direction::Up {
            shared.forwarded_up();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server standing in for the coordinator.
    async fn echo() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                        eprintln!("echo server: {e}");
                    }
                });
            }
        });
        Ok((url, task))
    }

    async fn roundtrip(s: &mut TcpStream, text: &[u8], within: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        s.write_all(text).await?;
        let mut got = vec![0u8; text.len()];
        match tokio::time::timeout(within, s.read_exact(&mut got)).await {
            Ok(read) => {
                read?;
                Ok(Some(got))
            }
            Err(_) => Ok(None),
        }
    }

    fn addr(url: &str) -> anyhow::Result<String> {
        authority(url)
    }

    #[tokio::test]
    async fn passes_freezes_and_drops_replies() -> anyhow::Result<()> {
        let (target, _server) = echo().await?;
        let proxy = Proxy::start(&target).await?;
        let mut s = TcpStream::connect(addr(proxy.url())?).await?;
        assert_eq!(roundtrip(&mut s, b"one", Duration::from_secs(5)).await?, Some(b"one".to_vec()));
        let before = proxy.last_up_ms().context("no upstream bytes booked")?;

        proxy.set_mode(Mode::Frozen);
        assert_eq!(roundtrip(&mut s, b"two", Duration::from_millis(300)).await?, None, "frozen");
        assert_eq!(proxy.last_up_ms(), Some(before), "nothing forwarded while frozen");
        // A new connection is accepted but not dialled through.
        let mut late = TcpStream::connect(addr(proxy.url())?).await?;
        assert_eq!(roundtrip(&mut late, b"new", Duration::from_millis(200)).await?, None);
        let mark = proxy.resume(false);
        // The held bytes flow on: the stream is intact.
        let mut got = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
        assert_eq!(&got, b"two");
        tokio::time::timeout(Duration::from_secs(5), late.read_exact(&mut got)).await??;
        assert_eq!(&got, b"new");
        let first = proxy.first_up_after(mark).context("no forward after the mark")?;
        assert!(first >= mark);

        proxy.set_mode(Mode::DropReplies);
        assert_eq!(roundtrip(&mut s, b"lost", Duration::from_millis(300)).await?, None, "reply dropped");
        assert!(proxy.last_up_ms() >= Some(first), "requests still go through");
        proxy.resume(true);
        // The connection from before is closed; a new one works.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await?;
        assert!(!matches!(closed, Ok(n) if n > 0), "closed: {closed:?}");
        let mut again = TcpStream::connect(addr(proxy.url())?).await?;
        assert_eq!(roundtrip(&mut again, b"back", Duration::from_secs(5)).await?, Some(b"back".to_vec()));
        Ok(())
    }

    #[test]
    fn authority_needs_a_plain_http_url() -> anyhow::Result<()> {
        assert_eq!(authority("http://127.0.0.1:7400")?, "127.0.0.1:7400");
        assert_eq!(authority("http://localhost:7400/")?, "localhost:7400");
        assert_eq!(authority("tcp://127.0.0.1:5672")?, "127.0.0.1:5672");
        assert!(authority("https://x:1").is_err());
        assert!(authority("http://x:1/path").is_err());
        Ok(())
    }
}
