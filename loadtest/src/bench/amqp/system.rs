//! The whole system on the same queue: the real coordinator declares the
//! topology (topic exchange, quorum subscription queue, dead-letter and
//! retry queues) and leases one queue slot; one real worker (the `noop`
//! handler) takes the slot and drains the queue.
//!
//! The coordinator is started before anything is published, so the
//! baseline consumes the very queue it declared (same type, same
//! arguments): [`start_coordinator`] comes first, [`run`] only after the
//! baseline has closed its consumer and the queue was filled again.
//!
//! Progress is the worker's own `shardline_records_total` (it counts a
//! batch after its ack is sent, as the baseline counts), scraped every
//! [`POLL`](crate::bench::compare::POLL), together with the queue's ready count from a passive declare:
//! the run is over when the worker has handled every message and the queue
//! holds none. The coordinator's `ListSubscriptions` is used only to know
//! that the topology exists: its `unacked` comes from heartbeats and lags.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_testkit::config::table;
use tokio::time::Instant;

use super::queue::{self, Names};
use crate::bench::compare::{Sample, SystemFigures, WORKER_ID, run_system};
use crate::child::{Coordinator, Setup, WorkerSettings};

/// The only handler run: the figures are the machinery's, not a handler's.
const HANDLER: &str = "noop";
/// How often the coordinator reads the queues: often enough that the
/// topology's status is known soon after it is declared.
const SCALE_INTERVAL: &str = "500ms";
/// How long the coordinator gets to connect and declare the topology.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(30);
/// The worker's config names Kafka whatever it consumes; this is its
/// default address, and with no shard leased it is never contacted.
const KAFKA_BROKERS: &str = "127.0.0.1:9092";
const RECORDS: &str = "shardline_records_total";

/// The subscription the coordinator is configured with.
pub struct Topology<'a> {
    pub url: &'a str,
    pub names: &'a Names,
    pub batch_size: u32,
}

/// The coordinator config's RabbitMQ part: one fanout topic, one
/// subscription of exactly one slot (`min_slots = max_concurrency = 1`),
/// so the run compares one consumer with one consumer.
fn coordinator_settings(t: &Topology<'_>) -> toml::Table {
    let subscription = table([
        ("name", t.names.queue.as_str().into()),
        ("topic", t.names.topic.as_str().into()),
        ("handler", HANDLER.into()),
        ("min_slots", 1.into()),
        ("max_concurrency", 1.into()),
        ("batch_size", i64::from(t.batch_size).into()),
    ]);
    table([
        ("amqp_url", t.url.into()),
        ("scale_interval", SCALE_INTERVAL.into()),
        ("topics", vec![toml::Value::from(table([("name", t.names.topic.as_str().into())]))].into()),
        ("subscriptions", vec![toml::Value::from(subscription)].into()),
    ])
}

/// Starts the coordinator and waits until it has declared the topology.
/// Returns it with the queue type it declared (`quorum` unless the broker
/// has none).
pub async fn start_coordinator(bin: &Path, t: &Topology<'_>) -> anyhow::Result<(Coordinator, String)> {
    let setup = Setup { streams: &[], kafka: None, extra: coordinator_settings(t) };
    let mut coordinator = Coordinator::start_with(bin, setup).await?;
    let channel = coordinator.channels(1).await?.remove(0);
    let mut admin = AdminApiClient::new(channel);
    let deadline = Instant::now() + TOPOLOGY_TIMEOUT;
    loop {
        coordinator.check_alive()?;
        let reply = admin
            .list_subscriptions(v1::ListSubscriptionsRequest {})
            .await
            .context("ListSubscriptions failed")?
            .into_inner();
        let info = reply.subscriptions.into_iter().find(|s| s.name == t.names.queue);
        // The queue type is filled in once every declaration succeeded.
        if let Some(info) = &info
            && !info.queue_type.is_empty()
        {
            return Ok((coordinator, info.queue_type.clone()));
        }
        if Instant::now() > deadline {
            bail!(
                "the coordinator has not declared {} after {TOPOLOGY_TIMEOUT:?} (last error: {}); its log:\n{}",
                t.names.queue,
                info.map_or("not listed".to_owned(), |i| if i.error.is_empty() {
                    "none".to_owned()
                } else {
                    i.error
                }),
                coordinator.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct Settings<'a> {
    pub worker_bin: &'a Path,
    pub url: &'a str,
    pub queue: &'a str,
    /// Messages in the queue when the worker starts.
    pub expected: u64,
    pub stall: Duration,
    pub broker_pid: Option<u32>,
}

/// Starts the worker, waits until it has handled every message, then stops
/// the worker and the coordinator.
pub async fn run(coordinator: Coordinator, s: &Settings<'_>) -> anyhow::Result<SystemFigures> {
    let observer = queue::connect(s.url, "shardline-bench-observer").await?;
    let settings = WorkerSettings {
        coordinator: &coordinator.url(),
        worker_id: WORKER_ID,
        kafka_brokers: KAFKA_BROKERS,
        handlers: &[(HANDLER, Vec::new())],
        fetch_queue_kib: None,
        amqp_url: Some(s.url),
        max_inflight_batches: None,
    };
    let mut handled = 0;
    let figures =
        run_system(coordinator, s.worker_bin, &settings, s.expected, s.stall, s.broker_pid, async |w| {
            // The counter is created at the first batch; before it, and while
            // the endpoint is not bound yet, nothing is handled (a lasting
            // failure shows as a stall, with this error).
            let scrape_error = match w.scrape().await {
                Ok(m) => {
                    handled = m.sum_or_zero(RECORDS) as u64;
                    String::new()
                }
                Err(e) => format!("; metrics: {e:#}"),
            };
            let depth = queue::depth(&observer, s.queue).await?;
            Ok(Sample {
                done: handled,
                complete: handled >= s.expected && depth.ready == 0,
                ready: depth.consumers > 0,
                state: format!("{} still ready in the queue{scrape_error}", depth.ready),
            })
        })
        .await;
    if let Err(e) = observer.close(200, "run done".into()).await {
        eprintln!("warning: cannot close the observer's connection: {e}");
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_config_has_one_single_slot_subscription_on_a_fanout_topic() {
        let names = Names { topic: "b-topic".into(), queue: "b".into() };
        let t =
            coordinator_settings(&Topology { url: "amqp://g:g@h:5672/%2f", names: &names, batch_size: 100 });
        assert_eq!(t["amqp_url"].as_str(), Some("amqp://g:g@h:5672/%2f"));
        assert_eq!(t["scale_interval"].as_str(), Some("500ms"));
        assert_eq!(t["topics"][0]["name"].as_str(), Some("b-topic"));
        let s = &t["subscriptions"][0];
        assert_eq!(
            (s["name"].as_str(), s["topic"].as_str(), s["handler"].as_str()),
            (Some("b"), Some("b-topic"), Some("noop"))
        );
        assert_eq!((s["min_slots"].as_integer(), s["max_concurrency"].as_integer()), (Some(1), Some(1)));
        assert_eq!(s["batch_size"].as_integer(), Some(100));
    }
}
