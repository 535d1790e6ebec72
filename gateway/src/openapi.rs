//! The OpenAPI 3.0 document served at `/openapi.json`, written by hand
//! (every route, parameter, body and response, the error schema) and held
//! to the router by the tests below and, end to end, by schemathesis
//! (tests/tests/gateway.rs). The allow-listed names are the path
//! parameters' `enum`s, so a client (or a fuzzer) learns what exists.

use serde_json::{Value, json};

use crate::api::TIMEOUT_HEADER;
use crate::config::GatewayConfig;

/// Every `error.code` the API answers.
pub const ERROR_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "not_found",
    "unknown_stream",
    "unknown_topic",
    "unknown_subscription",
    "payload_too_large",
    "unroutable",
    "bad_reply",
    "unavailable",
    "timeout",
];

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn unavailable() -> Value {
    let mut e = error("A broker cannot be reached or refused; try again after `Retry-After` seconds.");
    e["headers"] =
        json!({ "Retry-After": { "description": "seconds to wait", "schema": { "type": "integer" } } });
    e
}

fn unauthorized() -> Value {
    let mut e = error("No bearer token, or the wrong one (only when the gateway has a token).");
    e["headers"] = json!({ "WWW-Authenticate": { "schema": { "type": "string" } } });
    e
}

/// A path parameter naming one of `names` (any string is accepted and
/// answered 404 when it is not one of them).
fn name_parameter(name: &str, what: &str, names: &[String]) -> Value {
    let mut schema = json!({ "type": "string", "minLength": 1 });
    if !names.is_empty() {
        schema["enum"] = json!(names);
    }
    json!({ "name": name, "in": "path", "required": true, "description": what, "schema": schema })
}

fn request_body(what: &str) -> Value {
    json!({
        "required": false,
        "description": format!("{what}, bytes as sent (at most `max_body_bytes`); the Content-Type travels with it"),
        "content": {
            "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
            "application/json": { "schema": {} },
            "text/plain": { "schema": { "type": "string" } }
        }
    })
}

/// The document for `config` (its allow-lists and whether a token is needed).
pub fn document(config: &GatewayConfig, secured: bool) -> Value {
    let security = if secured { json!([{ "bearer": [] }]) } else { json!([]) };
    let common = |mut responses: Value| {
        for (status, response) in [
            ("400", error("A query parameter or header the route does not accept, or a malformed path.")),
            ("401", unauthorized()),
            ("404", error("The name is not exposed by this gateway, or the broker does not have it.")),
            ("413", error("The body is over `max_body_bytes` (or Kafka's record size).")),
            ("503", unavailable()),
        ] {
            responses[status] = response;
        }
        responses
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shardline gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTP triggers for shardline: records to Kafka streams, messages to RabbitMQ topics, and synchronous invocation of a subscription's handler. Errors are JSON `{\"error\":{\"code\",\"message\"}}`."
        },
        "paths": {
            "/v1/streams/{stream}/records": {
                "post": {
                    "operationId": "produceRecord",
                    "summary": "Produce the body as one record (acks=all, idempotent).",
                    "security": security,
                    "parameters": [
                        name_parameter("stream", "the stream's Kafka topic (`streams`)", &config.streams),
                        { "name": "key", "in": "query", "required": false, "description": "the record's key", "schema": { "type": "string" } }
                    ],
                    "requestBody": request_body("the record's value"),
                    "responses": common(json!({
                        "202": {
                            "description": "Acknowledged by every in-sync replica.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Produced" } } }
                        }
                    }))
                }
            },
            "/v1/topics/{topic}/messages": {
                "post": {
                    "operationId": "publishMessage",
                    "summary": "Publish the body to the topic's exchange (mandatory, with publisher confirms).",
                    "security": security,
                    "parameters": [
                        name_parameter("topic", "the topic's exchange (`topics`)", &config.topics),
                        { "name": "routing_key", "in": "query", "required": false, "description": "the routing key (default empty; at most 255 bytes)", "schema": { "type": "string" } }
                    ],
                    "requestBody": request_body("the message's body"),
                    "responses": common(json!({
                        "202": {
                            "description": "Confirmed by RabbitMQ and routed to at least one queue.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Published" } } }
                        },
                        "422": error("No queue is bound for the routing key: the message would be lost (`unroutable`).")
                    }))
                }
            },
            "/v1/invoke/{subscription}": {
                "post": {
                    "operationId": "invoke",
                    "summary": "Invoke the subscription's handler and answer with its reply (status, headers, body).",
                    "security": security,
                    "parameters": [
                        name_parameter("subscription", "the subscription (`subscriptions`)", &config.subscriptions),
                        { "name": "timeout_ms", "in": "query", "required": false, "description": "a deadline shorter than `invoke_timeout`", "schema": { "type": "integer", "minimum": 1 } },
                        { "name": TIMEOUT_HEADER, "in": "header", "required": false, "description": "the same as `timeout_ms`", "schema": { "type": "integer", "minimum": 1 } }
                    ],
                    "requestBody": request_body("the request the handler gets as the record's value"),
                    "responses": common(json!({
                        "200": { "description": "The handler's reply (its status, headers and body; 200 is the usual one)." },
                        "502": error("The handler's reply cannot be an HTTP response (`bad_reply`)."),
                        "504": error("No reply within the deadline (`timeout`)."),
                        "default": { "description": "The handler's reply with the status it chose." }
                    }))
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": { "200": { "description": "OpenAPI 3", "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (`shardline_gateway_*`).",
                    "responses": { "200": { "description": "text exposition format", "content": { "text/plain": { "schema": { "type": "string" } } } } }
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "200 while the process serves.",
                    "responses": { "200": { "description": "ok", "content": { "text/plain": { "schema": { "type": "string" } } } } }
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "200 when Kafka and RabbitMQ answer; 503 naming the one that does not.",
                    "responses": {
                        "200": { "description": "ready", "content": { "text/plain": { "schema": { "type": "string" } } } },
                        "503": {
                            "description": "not ready, and why",
                            "headers": { "Retry-After": { "schema": { "type": "integer" } } },
                            "content": { "text/plain": { "schema": { "type": "string" } } }
                        }
                    }
                }
            }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "additionalProperties": false,
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "additionalProperties": false,
                            "properties": {
                                "code": { "type": "string", "enum": ERROR_CODES },
                                "message": { "type": "string" }
                            }
                        }
                    }
                },
                "Produced": {
                    "type": "object",
                    "required": ["partition", "offset"],
                    "additionalProperties": false,
                    "properties": {
                        "partition": { "type": "integer", "minimum": 0 },
                        "offset": { "type": "integer", "minimum": 0 }
                    }
                },
                "Published": {
                    "type": "object",
                    "required": ["message_id"],
                    "additionalProperties": false,
                    "properties": { "message_id": { "type": "string" } }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[test]
    fn every_route_and_error_is_documented() {
        let config = GatewayConfig { streams: vec!["orders".into()], ..GatewayConfig::default() };
        let doc = document(&config, true);
        assert_eq!(doc["openapi"], "3.0.3");
        for (path, method) in [
            ("/v1/streams/{stream}/records", "post"),
            ("/v1/topics/{topic}/messages", "post"),
            ("/v1/invoke/{subscription}", "post"),
            ("/openapi.json", "get"),
            ("/metrics", "get"),
            ("/healthz", "get"),
            ("/readyz", "get"),
        ] {
            let op = &doc["paths"][path][method];
            assert!(op.is_object(), "{method} {path} is not documented");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{path}: no responses");
            if path.starts_with("/v1/") {
                for status in ["400", "401", "404", "413", "503"] {
                    let r = &op["responses"][status];
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error"
                    );
                }
                assert_eq!(op["security"], json!([{ "bearer": [] }]));
            }
        }
        let paths = doc["paths"].as_object().map(|p| p.len());
        assert_eq!(paths, Some(7), "a route in the document the router does not have, or the reverse");
        let invoke = &doc["paths"]["/v1/invoke/{subscription}"]["post"]["responses"];
        assert!(invoke["504"].is_object());
        assert_eq!(
            doc["paths"]["/v1/streams/{stream}/records"]["post"]["parameters"][0]["schema"]["enum"],
            json!(["orders"])
        );
        // Every code an error can carry is in the schema's enum.
        let errors = [
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized(String::new()),
            ApiError::not_found("stream", "", ""),
            ApiError::not_found("topic", "", ""),
            ApiError::not_found("subscription", "", ""),
            ApiError::TooLarge(String::new()),
            ApiError::Unroutable { topic: String::new(), routing_key: String::new() },
            ApiError::BadReply(String::new()),
            ApiError::Unavailable(String::new()),
            ApiError::Timeout(String::new()),
        ];
        for e in errors {
            assert!(ERROR_CODES.contains(&e.code()), "{} is not in the document", e.code());
        }
        let open = document(&config, false);
        assert_eq!(open["paths"]["/v1/invoke/{subscription}"]["post"]["security"], json!([]));
    }
}
