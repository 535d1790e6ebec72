//! The HTTP API (axum): the three `/v1/` routes behind the bearer token,
//! and `/openapi.json`, `/metrics`, `/healthz`, `/readyz` open (probes and
//! Prometheus). Every route's metrics are taken by one middleware, keyed by
//! the route's template, so a path's names never become label values.
//!
//! Each `/v1/` handler checks in this order: the name is allow-listed
//! (else 404), the query (400), the body's size (413), then asks the
//! broker (404 for a name it does not have, 503 when it cannot be
//! reached, 504 past a deadline).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::amqp::{Amqp, Reply};
use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::kafka::{Kafka, Produced};

/// The header a client may shorten an invocation's deadline with.
pub const TIMEOUT_HEADER: &str = "shardline-timeout-ms";

/// What every request handler shares.
#[derive(Clone)]
pub struct Gateway {
    pub config: Arc<GatewayConfig>,
    pub token: Option<Arc<str>>,
    pub kafka: Kafka,
    pub amqp: Amqp,
    /// `/readyz`'s verdict, kept by [`crate::watch_brokers`].
    pub ready: Arc<Mutex<Result<(), String>>>,
    pub openapi: Arc<serde_json::Value>,
}

pub fn router(gateway: Gateway, metrics: PrometheusHandle) -> Router {
    let limit = gateway.config.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/streams/{stream}/records", post(produce))
        .route("/v1/topics/{topic}/messages", post(publish))
        .route("/v1/invoke/{subscription}", post(invoke))
        .route_layer(axum::middleware::from_fn_with_state(gateway.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            let body = crate::error::body("not_found", "no such route; see /openapi.json");
            (StatusCode::NOT_FOUND, Json(body))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(measure))
        .with_state(gateway)
}

/// Counts every request by route template and status, and times it.
async fn measure(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("shardline_gateway_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("shardline_gateway_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The bearer token, compared in constant time; none configured: open
/// (the config allows that only on loopback).
async fn authorize(State(g): State<Gateway>, request: Request, next: Next) -> Response {
    if let Some(token) = &g.token {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let bearer = given
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match bearer {
            None => {
                return ApiError::Unauthorized("missing `Authorization: Bearer TOKEN`".into())
                    .into_response();
            }
            Some(b) if !bool::from(b.as_bytes().ct_eq(token.as_bytes())) => {
                return ApiError::Unauthorized("wrong bearer token".into()).into_response();
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

/// `name` is in `list`, else 404 naming the config field.
fn allowed(what: &'static str, field: &str, list: &[String], name: &str) -> Result<(), ApiError> {
    if list.iter().any(|n| n == name) {
        Ok(())
    } else {
        Err(ApiError::not_found(what, name, format!("not exposed by this gateway (`{field}`)")))
    }
}

fn path(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(name)| name).map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    b.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("the request body is over {limit} bytes (max_body_bytes)"))
        }
        _ => ApiError::BadRequest(e.body_text()),
    })
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProduceQuery {
    key: Option<String>,
}

/// `POST /v1/streams/{stream}/records`: the body as one record's value.
async fn produce(
    State(g): State<Gateway>,
    stream: Result<Path<String>, PathRejection>,
    q: Result<Query<ProduceQuery>, QueryRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Produced>), ApiError> {
    let stream = path(stream)?;
    allowed("stream", "streams", &g.config.streams, &stream)?;
    let q = query(q)?;
    let value = body(b, g.config.max_body_bytes)?;
    let produced = g.kafka.produce(&stream, q.key.as_deref(), &value, content_type(&headers)).await?;
    Ok((StatusCode::ACCEPTED, Json(produced)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishQuery {
    #[serde(default)]
    routing_key: String,
}

/// `POST /v1/topics/{topic}/messages`: the body as one message.
async fn publish(
    State(g): State<Gateway>,
    topic: Result<Path<String>, PathRejection>,
    q: Result<Query<PublishQuery>, QueryRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let topic = path(topic)?;
    allowed("topic", "topics", &g.config.topics, &topic)?;
    let q = query(q)?;
    let payload = body(b, g.config.max_body_bytes)?;
    let id = g.amqp.publish(&topic, &q.routing_key, &payload, content_type(&headers)).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "message_id": id }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    /// Text, so any whole number is taken (one past u64 means "no shorter").
    timeout_ms: Option<String>,
}

/// `POST /v1/invoke/{subscription}`: the handler's reply as the response.
async fn invoke(
    State(g): State<Gateway>,
    subscription: Result<Path<String>, PathRejection>,
    q: Result<Query<InvokeQuery>, QueryRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let subscription = path(subscription)?;
    allowed("subscription", "subscriptions", &g.config.subscriptions, &subscription)?;
    let q = query(q)?;
    let deadline = deadline(g.config.invoke_timeout, q.timeout_ms.as_deref(), headers.get(TIMEOUT_HEADER))?;
    let payload = body(b, g.config.max_body_bytes)?;
    let _in_flight = InFlight::new();
    let reply = g.amqp.invoke(&subscription, &payload, content_type(&headers), deadline).await?;
    response(reply)
}

/// The invocation's deadline: `invoke_timeout`, or less if the client asks
/// (`timeout_ms` or the header: a whole number of ms, at least 1; any
/// larger than `invoke_timeout` changes nothing).
fn deadline(
    limit: Duration,
    query: Option<&str>,
    header: Option<&HeaderValue>,
) -> Result<Duration, ApiError> {
    let header = match header {
        None => None,
        Some(v) => Some(
            v.to_str().map_err(|_| ApiError::BadRequest(format!("header `{TIMEOUT_HEADER}` is not text")))?,
        ),
    };
    let mut deadline = limit;
    for (what, asked) in [("query parameter `timeout_ms`", query), ("header `Shardline-Timeout-Ms`", header)]
    {
        let Some(asked) = asked.map(str::trim) else { continue };
        let digits = !asked.is_empty() && asked.bytes().all(|b| b.is_ascii_digit());
        if !digits || asked.bytes().all(|b| b == b'0') {
            let why = format!("{what} is `{asked}`; allowed: a whole number of milliseconds, at least 1");
            return Err(ApiError::BadRequest(why));
        }
        // Past u64: longer than any limit, so no shorter deadline.
        let ms = asked.parse::<u64>().unwrap_or(u64::MAX);
        deadline = deadline.min(Duration::from_millis(ms));
    }
    Ok(deadline)
}

/// Headers a reply may not set: they describe this connection, not the reply.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"];

/// The handler's reply as an HTTP response; a status outside 200..=599 is 502.
fn response(reply: Reply) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(reply.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| ApiError::BadReply(format!("the handler replied with status {}", reply.status)))?;
    let mut response = (status, reply.body).into_response();
    let out = response.headers_mut();
    out.remove(header::CONTENT_TYPE);
    for (name, value) in &reply.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || (lower == "content-type" && reply.content_type.is_some()) {
            continue;
        }
        match (HeaderName::try_from(lower.as_str()), HeaderValue::try_from(value.as_str())) {
            (Ok(n), Ok(v)) => {
                out.append(n, v);
            }
            _ => {
                metrics::counter!("shardline_gateway_reply_headers_dropped_total").increment(1);
                tracing::warn!(header = %name, "a reply header that is not a valid HTTP header; dropped");
            }
        }
    }
    if let Some(ct) = reply.content_type.as_deref().and_then(|c| HeaderValue::try_from(c).ok()) {
        out.insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

/// `shardline_gateway_invocations_in_flight`, up while an invocation waits.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        metrics::gauge!("shardline_gateway_invocations_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("shardline_gateway_invocations_in_flight").decrement(1.0);
    }
}

async fn openapi(State(g): State<Gateway>) -> Json<serde_json::Value> {
    Json(g.openapi.as_ref().clone())
}

async fn readyz(State(g): State<Gateway>) -> Response {
    match crate::lock(&g.ready).clone() {
        Ok(()) => (StatusCode::OK, "ready: Kafka and RabbitMQ answer\n").into_response(),
        Err(why) => {
            let retry = [(header::RETRY_AFTER, crate::error::RETRY_AFTER_SECS.to_string())];
            (StatusCode::SERVICE_UNAVAILABLE, retry, format!("not ready: {why}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_is_the_shortest_asked_for() {
        let limit = Duration::from_secs(30);
        assert_eq!(deadline(limit, None, None), Ok(limit));
        assert_eq!(deadline(limit, Some("500"), None), Ok(Duration::from_millis(500)));
        let header = HeaderValue::from_static("200");
        assert_eq!(deadline(limit, Some("500"), Some(&header)), Ok(Duration::from_millis(200)));
        assert_eq!(deadline(limit, Some("90000"), None), Ok(limit), "never longer than invoke_timeout");
        let huge = HeaderValue::from_static("409146135469058791833600");
        assert_eq!(deadline(limit, None, Some(&huge)), Ok(limit), "past u64 is no shorter deadline");
        assert!(deadline(limit, Some("0"), None).is_err());
        assert!(deadline(limit, Some("-1"), None).is_err());
        assert!(deadline(limit, None, Some(&HeaderValue::from_static("soon"))).is_err());
    }

    #[test]
    fn a_reply_becomes_the_response() {
        let reply = Reply {
            status: 201,
            headers: vec![
                ("x-seen".into(), "yes".into()),
                ("content-length".into(), "999".into()),
                ("content-type".into(), "text/wrong".into()),
            ],
            content_type: Some("text/plain".into()),
            body: b"hi".to_vec(),
        };
        let r = response(reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers().get("x-seen").and_then(|v| v.to_str().ok()), Some("yes"));
        assert_eq!(r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some("text/plain"));
        assert_ne!(r.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()), Some("999"));
        let bad = Reply { status: 42, headers: vec![], content_type: None, body: vec![] };
        assert_eq!(response(bad).map(|_| ()).map_err(|e| e.code()), Err("bad_reply"));
    }
}

/// The router itself, without brokers (clients are lazy; every request
/// here is answered before one is needed): each path of the OpenAPI
/// document is routed, and the checks before the broker answer as
/// documented.
#[cfg(test)]
mod routing {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn app() -> Router {
        let config = GatewayConfig {
            streams: vec!["s".into()],
            max_body_bytes: 10,
            token: Some("t0k".into()),
            ..GatewayConfig::default()
        };
        let gateway = Gateway {
            token: Some(Arc::from("t0k")),
            kafka: Kafka::new(&config).unwrap_or_else(|e| panic!("{e}")),
            amqp: Amqp::new(&config),
            ready: Arc::new(Mutex::new(Err("starting".into()))),
            openapi: Arc::new(crate::openapi::document(&config, true)),
            config: Arc::new(config),
        };
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        router(gateway, metrics)
    }

    async fn call(method: &str, uri: &str, auth: Option<&str>, body: &'static [u8]) -> (u16, String) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let request = request.body(Body::from(body)).unwrap_or_else(|e| panic!("{e}"));
        let response = app().oneshot(request).await.unwrap_or_else(|e| match e {});
        let status = response.status().as_u16();
        let bytes =
            axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let code = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        (status, code.unwrap_or(text))
    }

    #[tokio::test]
    async fn every_documented_path_is_routed() {
        let config = GatewayConfig::default();
        let doc = crate::openapi::document(&config, true);
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for (path, item) in paths {
            for method in item.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
            {
                let uri =
                    path.replace("{stream}", "x").replace("{topic}", "x").replace("{subscription}", "x");
                let (status, code) = call(&method.to_uppercase(), &uri, Some("Bearer t0k"), b"").await;
                assert!(code != "not_found" && status != 405, "{method} {path}: {status} {code}");
            }
        }
        assert_eq!(call("GET", "/nowhere", None, b"").await, (404, "not_found".into()));
    }

    #[tokio::test]
    async fn checks_before_the_broker_answer_as_documented() {
        let streams = "/v1/streams/s/records";
        assert_eq!(call("POST", streams, None, b"x").await, (401, "unauthorized".into()));
        assert_eq!(call("POST", streams, Some("Bearer nope"), b"x").await, (401, "unauthorized".into()));
        assert_eq!(
            call("POST", "/v1/streams/other/records", Some("bearer t0k"), b"x").await,
            (404, "unknown_stream".into())
        );
        let query = "/v1/streams/s/records?bogus=1";
        assert_eq!(call("POST", query, Some("Bearer t0k"), b"x").await, (400, "bad_request".into()));
        let big = call("POST", streams, Some("Bearer t0k"), b"eleven bytes").await;
        assert_eq!(big, (413, "payload_too_large".into()));
        assert_eq!(call("GET", "/readyz", None, b"").await.0, 503);
        assert_eq!(call("GET", "/healthz", None, b"").await.0, 200);
    }
}
