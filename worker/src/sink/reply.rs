//! Replies of synchronous invocations: a record that arrived with
//! `reply_to` (RabbitMQ direct reply-to, as the gateway sends) gets the
//! handler's [`Reply`] published to that address through the default
//! exchange, with the request's correlation id and the status in the
//! `shardline.status` header. Published once the record succeeded and
//! before it is acked, so an answered request is never lost to a crash
//! between the two (it may be answered twice; the requester keeps the
//! first). A requester that went away is never a batch failure: the record
//! itself was handled. With a plain reply queue that is gone the publish is
//! unroutable, logged and counted; with direct reply-to RabbitMQ drops the
//! reply silently.

use std::collections::HashMap;
use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use shardline_proto::LeaseId;
use shardline_proto::topology::{DIRECT_REPLY_TO, headers};

use crate::amqp::{Message, PublishError, Publisher};
use crate::handler::{Record, Reply, ReplyTo};
use crate::sink::publish::short_string;

/// Publishes the replies of `records` (the ones that succeeded) that
/// `replies` holds; replies to records not in `records` or without
/// `reply_to` are dropped and counted.
pub async fn send(
    publisher: Option<&Publisher>,
    lease: &LeaseId,
    records: &[Arc<Record>],
    replies: &[Reply],
) {
    if replies.is_empty() {
        return;
    }
    let by_position: HashMap<i64, &Record> = records.iter().map(|r| (r.position(), &**r)).collect();
    let by_position = &by_position;
    let sends = replies.iter().map(|reply| async move {
        let Some(to) = by_position.get(&reply.position).and_then(|r| r.reply_to.as_ref()) else {
            tracing::debug!(%lease, position = reply.position, "reply to a record without reply_to (or one that failed); dropped");
            return "no_reply_to";
        };
        let Some(publisher) = publisher else {
            tracing::warn!(%lease, "a reply on a source that cannot send one; dropped");
            return "no_reply_to";
        };
        let published = match message(to, reply) {
            Ok(m) => publisher.publish(std::slice::from_ref(&m)).await,
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => "sent",
            Err(PublishError::Unroutable { .. }) => {
                tracing::info!(%lease, queue = %to.queue, "requester gone before its reply; dropped");
                "requester_gone"
            }
            Err(e) => {
                tracing::warn!(%lease, queue = %to.queue, error = %e, "reply not sent");
                "failed"
            }
        }
    });
    for outcome in futures::future::join_all(sends).await {
        metrics::counter!("shardline_replies_total", "outcome" => outcome).increment(1);
    }
}

/// The AMQP message of `reply` to `to`. Public for the fuzz targets and
/// tests.
pub fn message(to: &ReplyTo, reply: &Reply) -> Result<Message, PublishError> {
    let header_bytes = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
    let mut table = crate::amqp::field_table(header_bytes)?;
    table.insert(headers::STATUS.into(), AMQPValue::LongInt(i32::from(reply.status)));
    let mut properties = BasicProperties::default();
    if let Some(id) = &to.correlation_id {
        properties = properties.with_correlation_id(short_string("the correlation id", id)?);
    }
    let content_type = reply.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(headers::CONTENT_TYPE));
    if let Some((_, v)) = content_type {
        properties = properties.with_content_type(short_string("the content-type header", v)?);
    }
    Ok(Message {
        exchange: String::new(),
        routing_key: to.queue.clone(),
        body: reply.body.clone(),
        headers: table,
        properties: Some(properties),
        // RabbitMQ returns a mandatory message to a direct reply-to address
        // although it delivered it (and drops one whose requester is gone
        // without a word); only a plain reply queue can report a requester
        // gone.
        unroutable_ok: to.queue.starts_with(DIRECT_REPLY_TO),
        ..Message::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_carries_status_correlation_and_content_type() {
        let to = ReplyTo { queue: "amq.rabbitmq.reply-to.g1h".into(), correlation_id: Some("c-1".into()) };
        let reply = Reply {
            position: 3,
            status: 201,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"hi".to_vec(),
        };
        let m = message(&to, &reply).unwrap();
        assert_eq!((m.exchange.as_str(), m.routing_key.as_str()), ("", "amq.rabbitmq.reply-to.g1h"));
        assert_eq!(m.headers.inner().get(headers::STATUS), Some(&AMQPValue::LongInt(201)));
        let props = m.properties.unwrap();
        assert_eq!(props.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
        assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(m.body, b"hi");
    }

    #[test]
    fn an_overlong_header_name_is_an_error_not_a_panic() {
        let to = ReplyTo { queue: "q".into(), correlation_id: None };
        let reply =
            Reply { position: 0, status: 200, headers: vec![("h".repeat(300), "v".into())], body: vec![] };
        assert!(matches!(message(&to, &reply), Err(PublishError::TooLong { .. })));
    }
}
