//! The fan-out example (`examples/fanout`) on real RabbitMQ, PostgreSQL,
//! coordinator and a `fanout` worker: one topic, the `audit` subscription
//! (never gives up, writes each message once) and the slow `notify`
//! subscription (one slot, 100 ms a message, every 10th recipient bounces:
//! two retries, then the dead-letter queue). N notifications published:
//! the audit log reaches N rows while the notifier's queue still holds a
//! backlog (the slow subscriber does not hold the other back); at the end
//! notified + dead-lettered = N, audited = N, exactly, and the dead
//! letters are exactly the bounced messages, each with its error. Two
//! workers run; the one holding the notifier's slot is `kill -9`ed while
//! the backlog waits (its slot moves to the other worker, redelivered
//! messages are written once, a bounce may be dead-lettered twice).

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_proto::v1;
use shardline_testkit::config::{self, Backoff, SubscriptionConfig, TopicConfig, TopicKind};
use shardline_testkit::postgres::{Schema, base_url};
use shardline_tests::amqp::{cleanup, connect, drain_queue};
use shardline_tests::{Coordinator, CoordinatorConfig, WorkerConfig, eventually, unique};
use shardline_worker::amqp::{Message, Publisher};

const N: u64 = 300;
const BOUNCE_EVERY: u64 = 10;

fn bounces(i: u64) -> bool {
    i % BOUNCE_EVERY == BOUNCE_EVERY - 1
}

/// Notification `i` as the example's producer writes it.
fn notification(topic: &str, i: u64) -> Message {
    let domain = if bounces(i) { "bounce.example" } else { "example.com" };
    let body =
        serde_json::json!({"recipient": format!("user{i}@{domain}"), "text": format!("order {i} shipped")});
    Message {
        exchange: topic.to_owned(),
        body: body.to_string().into_bytes(),
        message_id: Some(format!("n-{i}")),
        ..Message::default()
    }
}

async fn count(schema: &Schema, table: &str) -> Result<i64> {
    let db = schema.client().await?;
    Ok(db.query_one(&format!("SELECT count(*) FROM {}.{table}", schema.name), &[]).await?.try_get(0)?)
}

async fn ids(schema: &Schema, table: &str) -> Result<BTreeSet<String>> {
    let db = schema.client().await?;
    let rows = db.query(&format!("SELECT message_id FROM {}.{table}", schema.name), &[]).await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Ready messages in `queue`, through the kit's passive declare.
async fn ready(queue: &str) -> Result<u64> {
    Ok(shardline_testkit::amqp::depth(&connect().await?, queue).await?.ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_complete_while_the_slow_notifier_still_has_a_backlog() -> Result<()> {
    let schema = Schema::create("fanout").await?;
    let (topic, audit, notify) = (unique("notifications"), unique("audit"), unique("notify"));

    let mut audit_sub = SubscriptionConfig::new(&audit, &topic, "audit");
    audit_sub.settings.batch_size = 50;
    audit_sub.settings.max_retries = None;
    audit_sub.max_concurrency = 2;
    let mut notify_sub = SubscriptionConfig::new(&notify, &topic, "notify");
    notify_sub.settings.batch_size = 10;
    notify_sub.settings.report_item_failures = true;
    notify_sub.settings.max_retries = Some(2);
    notify_sub.settings.retry_backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_millis(800),
        multiplier: 2.0,
        ..Backoff::default()
    };
    notify_sub.max_concurrency = 1;
    let mut guard = cleanup();
    guard.exchanges.push(topic.clone());
    let guard = [&audit_sub, &notify_sub]
        .iter()
        .fold(guard, |g, s| g.subscription(&s.name, &s.settings.mapping(&s.handler).policy));

    let config = CoordinatorConfig {
        topics: vec![TopicConfig { name: topic.clone(), kind: TopicKind::Fanout }],
        subscriptions: vec![audit_sub, notify_sub],
        ..support::timings()
    };
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let db = [("postgres", base_url()), ("schema", schema.name.clone())];
    let mut worker = WorkerConfig {
        coordinator: c.url.clone(),
        amqp_url: shardline_tests::amqp::amqp_url(),
        worker_id: Some("fanout-1".into()),
        ..config::hosting("audit", &db)
    };
    let mut notify_settings = config::settings(&db);
    notify_settings.extend(config::settings(&[("per_message", "100ms")]));
    worker.handlers.insert("notify".into(), notify_settings);
    let mut workers = Vec::new();
    for id in ["fanout-1", "fanout-2"] {
        let config = WorkerConfig { worker_id: Some(id.into()), ..worker.clone() };
        let path = support::config_file(dir.path(), id, &config)?;
        workers.push((id, support::spawn("fanout", &["--config", &path], &[], Stdio::null())?));
    }

    // Both subscriptions declared and consuming before anything is published.
    eventually(Duration::from_secs(60), "both subscriptions consuming", || async {
        let reply = c.admin().await?.list_subscriptions(v1::ListSubscriptionsRequest {}).await?;
        let subs = reply.into_inner().subscriptions;
        let on = |name: &str| subs.iter().any(|s| s.name == name && s.error.is_empty() && s.consumers >= 1);
        Ok((on(&audit) && on(&notify)).then_some(()))
    })
    .await?;

    let publisher = Publisher::connect(&shardline_tests::amqp::amqp_url(), "example-fanout");
    let messages: Vec<Message> = (0..N).map(|i| notification(&topic, i)).collect();
    for chunk in messages.chunks(100) {
        publisher.publish(chunk).await.map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    }

    let n = i64::try_from(N)?;
    eventually(Duration::from_secs(120), "the audit log to hold every message", || async {
        Ok((count(&schema, "audit_log").await? == n).then_some(()))
    })
    .await?;
    let (backlog, notified) = (ready(&notify).await?, count(&schema, "notified").await?);
    eprintln!("fanout: audit_log has all {N}; the notifier has sent {notified}, {backlog} wait in its queue");
    ensure!(backlog > 0, "the notifier had no backlog when the audit log was complete (sent {notified})");
    // The worker running the notifier dies mid-backlog.
    let holder = c.leases_of(&notify).await?.into_iter().map(|l| l.owner).find(|o| !o.is_empty());
    let victim = workers.iter_mut().find(|(id, _)| Some(*id) == holder.as_deref());
    let Some((id, proc)) = victim else { anyhow::bail!("no worker holds the notifier's slot ({holder:?})") };
    proc.kill9()?;
    eprintln!("fanout: killed {id} (-9), which held the notifier's slot");

    let bounced = (0..N).filter(|i| bounces(*i)).count() as u64;
    let dlq = shardline_proto::topology::dead_letter_queue(&notify);
    eventually(Duration::from_secs(300), "notified + dead-lettered to reach N", || async {
        let done = count(&schema, "notified").await? + i64::try_from(ready(&dlq).await?)?;
        Ok((done >= n).then_some(()))
    })
    .await?;
    // Nothing more arrives: read the dead letters (and make sure no late one follows).
    let copies =
        drain_queue(&dlq, usize::try_from(bounced)?, Duration::from_secs(3), Duration::from_secs(60)).await?;
    // A bounce being retried when its worker died can reach the DLQ twice
    // (its retry copy and its redelivery): one per message counts.
    let mut seen = BTreeSet::new();
    let dead: Vec<_> = copies.into_iter().filter(|d| seen.insert(d.body.clone())).collect();
    let (notified, audited) = (ids(&schema, "notified").await?, ids(&schema, "audit_log").await?);
    eprintln!(
        "fanout: notified {} + dead-lettered {} = {N}; audited {}",
        notified.len(),
        dead.len(),
        audited.len()
    );
    let all: BTreeSet<String> = (0..N).map(|i| format!("n-{i}")).collect();
    let sent: BTreeSet<String> = (0..N).filter(|i| !bounces(*i)).map(|i| format!("n-{i}")).collect();
    ensure!(audited == all, "the audit log is not exactly the {N} messages: {} rows", audited.len());
    ensure!(
        notified == sent,
        "notified {} messages, want exactly the {} that do not bounce",
        notified.len(),
        sent.len()
    );
    ensure!(dead.len() as u64 == bounced, "{} dead letters, want {bounced}", dead.len());
    for d in &dead {
        ensure!(
            d.body.contains("@bounce.example"),
            "a message that does not bounce was dead-lettered: {}",
            d.body
        );
        ensure!(
            d.header("shardline.reason") == Some("retries_exhausted"),
            "reason of {}: {:?}",
            d.body,
            d.headers
        );
        ensure!(d.header("shardline.attempts") == Some("3"), "attempts of {}: {:?}", d.body, d.headers);
    }
    ensure!(notified.len() + dead.len() == usize::try_from(N)?, "notified + dead-lettered != {N}");
    ensure!(ready(&dlq).await? == 0 && ready(&notify).await? == 0, "queues left non-empty");
    drop(guard);
    Ok(())
}
