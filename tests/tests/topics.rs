//! RabbitMQ topic exchanges (`[[topics]] kind = "topic"`): a subscription
//! gets only the messages whose routing key matches its `binding_key`, and
//! one without `binding_key` gets all (`#`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shardline_testkit::config::{self, TopicKind};
use shardline_tests::amqp::{depth, publisher};
use shardline_tests::kafka::read_topic;
use shardline_tests::{Coordinator, create_topic, eventually, start_worker_config, unique};
use shardline_worker::amqp::Message;
use support::Topology;

/// Routing keys and the ids published with each.
const KEYS: [(&str, std::ops::Range<u64>); 3] = [("eu.a", 0..5), ("eu.b.c", 5..10), ("us.a", 10..15)];

/// Subscription `eu` binds `eu.*` (one word after `eu.`), `all` sets no
/// key. Published before any worker runs, `eu`'s queue holds the 5 `eu.a`
/// messages and `all`'s the 15; a worker then processes exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_exchange_routes_only_matching_keys_to_each_subscription() -> Result<()> {
    let t = Topology::new(1, 2);
    let (exchange, eu, all) = (&t.exchanges[0], &t.subscriptions[0], &t.subscriptions[1]);
    let receipts = unique("receipts");
    create_topic(&receipts, 1).await?;
    let dir = tempfile::tempdir()?;
    let mut config = t.config("forward");
    config.topics[0].kind = TopicKind::Topic;
    config.subscriptions[0].binding_key = Some("eu.*".into());
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    eventually(Duration::from_secs(20), "both subscription queues", || async {
        Ok((depth(eu).await.is_ok() && depth(all).await.is_ok()).then_some(()))
    })
    .await?;
    let messages: Vec<Message> = KEYS
        .iter()
        .flat_map(|(key, ids)| {
            ids.clone().map(|i| Message {
                exchange: exchange.clone(),
                routing_key: (*key).to_owned(),
                body: format!("id-{i}").into_bytes(),
                message_id: Some(format!("id-{i}")),
                ..Message::default()
            })
        })
        .collect();
    publisher().publish(&messages).await.map_err(anyhow::Error::msg).context("publish")?;
    let depths = (depth(eu).await?, depth(all).await?);
    ensure!(depths == (5, 15), "queue depths (eu.*, #) are {depths:?}, want (5, 15)");

    let _w = start_worker_config(&c.url, "a", config::hosting("forward", &[("topic", &receipts)]))?;
    let got = eventually(Duration::from_secs(40), "20 receipts", || {
        let receipts = receipts.clone();
        async move {
            let got =
                tokio::task::spawn_blocking(move || read_topic(&receipts, Duration::from_secs(30))).await??;
            Ok((got.len() >= 20).then_some(got))
        }
    })
    .await?;
    let mut processed = BTreeMap::<String, BTreeSet<String>>::new();
    for r in &got {
        let subscription = r.header("shardline.stream").context("a receipt without shardline.stream")?;
        ensure!(processed.entry(subscription.to_owned()).or_default().insert(r.value.clone()), "{r:?} twice");
    }
    let ids = |range: std::ops::Range<u64>| range.map(|i| format!("id-{i}")).collect::<BTreeSet<String>>();
    let want = BTreeMap::from([(eu.clone(), ids(0..5)), (all.clone(), ids(0..15))]);
    ensure!(processed == want, "processed by subscription {processed:?}, want {want:?}");
    Ok(())
}
