//! The Lambda Runtime API (`/2018-06-01/runtime/...`) as one function
//! process sees it, served on a loopback port of its own.
//!
//! A port per process (per incarnation: a replaced process gets a new
//! one) is how the worker knows which process asked for an invocation, so
//! the process holding a batch past its deadline is the one killed; a
//! dead process's lingering connection reaches closed channels, never its
//! successor's invocation. The handlers here decide nothing: `/next` hands
//! the process's supervisor a reply slot and waits; posts are checked
//! against the invocation in flight (Lambda's `InvalidRequestID`, and
//! `InvalidStateTransition` for an init error after init) and passed on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Lambda's limit on a synchronous response (and so on a reply here).
pub const MAX_REPLY_BYTES: usize = 6 * 1024 * 1024;

/// An invocation as handed to the process by `/next`.
#[derive(Debug)]
pub struct Dispatch {
    pub id: String,
    pub event: Bytes,
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: String,
}

/// What a function reported for an invocation (or its init).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionError {
    pub error_type: String,
    pub message: String,
}

impl std::fmt::Display for FunctionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

/// A post the process made about the invocation in flight, or its init.
#[derive(Debug)]
pub enum Post {
    Response { id: String, body: Bytes },
    Error { id: String, error: FunctionError },
    InitError(FunctionError),
}

/// Shared between the HTTP handlers and the process's supervisor.
#[derive(Clone)]
struct Api {
    next: mpsc::Sender<oneshot::Sender<Dispatch>>,
    posts: mpsc::Sender<Post>,
    current: Current,
    /// Set at the first `/next`: the process finished its init.
    initialised: Arc<AtomicBool>,
}

/// The id of the invocation in flight, if any.
pub type Current = Arc<std::sync::Mutex<Option<String>>>;

/// One process's endpoint: its address for `AWS_LAMBDA_RUNTIME_API`, and
/// what its requests bring to the supervisor. Dropping it stops serving.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// A `/next` waiting for an invocation (at most one at a time from a
    /// runtime client that works one invocation at a time).
    pub next: mpsc::Receiver<oneshot::Sender<Dispatch>>,
    pub posts: mpsc::Receiver<Post>,
    pub current: Current,
    server: JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Its listener goes; connections still open reach closed channels
        // and get 500s until their process (being replaced) is gone.
        self.server.abort();
    }
}

impl Endpoint {
    /// Binds a fresh loopback port and serves the Runtime API on it.
    pub async fn bind() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (next_tx, next) = mpsc::channel(4);
        let (posts_tx, posts) = mpsc::channel(4);
        let current = Current::default();
        let api = Api {
            next: next_tx,
            posts: posts_tx,
            current: current.clone(),
            initialised: Arc::new(AtomicBool::new(false)),
        };
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next_invocation))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .layer(DefaultBodyLimit::max(MAX_REPLY_BYTES))
            .with_state(api);
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(%addr, error = %e, "the Runtime API endpoint stopped serving");
            }
        });
        Ok(Self { addr, next, posts, current, server })
    }
}

async fn next_invocation(State(api): State<Api>) -> Response {
    api.initialised.store(true, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    if api.next.send(tx).await.is_err() {
        return container_error("the worker is replacing this process");
    }
    let Ok(d) = rx.await else {
        return container_error("the worker is replacing this process");
    };
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        // Ids and ARNs are the worker's own ASCII; a trace id from a record
        // header that is no header value is left out rather than sent bad.
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set("lambda-runtime-aws-request-id", &d.id);
    set("lambda-runtime-deadline-ms", &d.deadline_ms.to_string());
    set("lambda-runtime-invoked-function-arn", &d.function_arn);
    set("lambda-runtime-trace-id", &d.trace_id);
    set("content-type", "application/json");
    (StatusCode::OK, headers, d.event).into_response()
}

async fn response(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = take_current(&api, &id) {
        return refused;
    }
    let post = match body {
        Ok(body) => Post::Response { id, body },
        Err(e) => {
            // Lambda fails the invocation when its response is too large.
            let error = FunctionError {
                error_type: "Function.ResponseSizeTooLarge".into(),
                message: format!("the response could not be read ({e}); at most {MAX_REPLY_BYTES} bytes"),
            };
            let status = e.status();
            forward(&api, Post::Error { id, error }).await;
            return refuse(status, "RequestTooLarge", &e.body_text());
        }
    };
    forward(&api, post).await;
    accepted()
}

async fn error(State(api): State<Api>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = take_current(&api, &id) {
        return refused;
    }
    forward(&api, Post::Error { id, error: function_error(&headers, &body) }).await;
    accepted()
}

async fn init_error(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    if api.initialised.load(Ordering::Relaxed) {
        let message = "init/error after the runtime asked for an invocation";
        return refuse(StatusCode::FORBIDDEN, "InvalidStateTransition", message);
    }
    forward(&api, Post::InitError(function_error(&headers, &body))).await;
    accepted()
}

/// Ends the invocation `id` if it is the one in flight; else the refusal.
fn take_current(api: &Api, id: &str) -> Option<Response> {
    let mut current = crate::lock(&api.current);
    if current.as_deref() == Some(id) {
        *current = None;
        return None;
    }
    let message = format!("no invocation `{id}` is waiting for a result from this process");
    Some(refuse(StatusCode::BAD_REQUEST, "InvalidRequestID", &message))
}

async fn forward(api: &Api, post: Post) {
    if api.posts.send(post).await.is_err() {
        tracing::debug!("a post arrived for a process being replaced; dropped with it");
    }
}

/// Lambda's error document: `{errorMessage, errorType, stackTrace}`; the
/// type may come in `Lambda-Runtime-Function-Error-Type` instead.
fn function_error(headers: &HeaderMap, body: &[u8]) -> FunctionError {
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let header = headers.get("lambda-runtime-function-error-type").and_then(|v| v.to_str().ok());
    let error_type = doc
        .get("errorType")
        .and_then(Value::as_str)
        .or(header)
        .filter(|t| !t.is_empty())
        .unwrap_or("Unhandled")
        .to_owned();
    let message = match doc.get("errorMessage").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned(),
    };
    FunctionError { error_type, message }
}

fn accepted() -> Response {
    json_response(StatusCode::ACCEPTED, &json!({"status": "OK"}))
}

fn refuse(status: StatusCode, error_type: &str, message: &str) -> Response {
    json_response(status, &json!({"errorMessage": message, "errorType": error_type}))
}

/// Lambda's 500: the runtime client should exit.
fn container_error(message: &str) -> Response {
    refuse(StatusCode::INTERNAL_SERVER_ERROR, "Runtime.ContainerError", message)
}

fn json_response(status: StatusCode, doc: &Value) -> Response {
    let content_type = [("content-type", HeaderValue::from_static("application/json"))];
    (status, content_type, doc.to_string()).into_response()
}
