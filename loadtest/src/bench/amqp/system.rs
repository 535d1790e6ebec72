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
use shardline_testkit::config::{
    CoordinatorConfig, SubscriptionConfig, TopicConfig, TopicKind, WorkerConfig,
};
use tokio::time::Instant;

use super::queue::{self, Names};
use crate::bench::compare::{Sample, SystemFigures, WORKER_ID, run_system};
use crate::child::Coordinator;

/// The only handler run: the figures are the machinery's, not a handler's.
const HANDLER: &str = "noop";
/// How often the coordinator reads the queues: often enough that the
/// topology's status is known soon after it is declared.
const SCALE_INTERVAL: Duration = Duration::from_millis(500);
/// How long the coordinator gets to connect and declare the topology.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(30);
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
fn coordinator_config(t: &Topology<'_>) -> CoordinatorConfig {
    let mut subscription = SubscriptionConfig {
        min_slots: 1,
        max_concurrency: 1,
        ..SubscriptionConfig::new(t.names.queue.as_str(), t.names.topic.as_str(), HANDLER)
    };
    subscription.settings.batch_size = t.batch_size;
    CoordinatorConfig {
        amqp_url: t.url.to_owned(),
        scale_interval: SCALE_INTERVAL,
        topics: vec![TopicConfig { name: t.names.topic.clone(), kind: TopicKind::Fanout }],
        subscriptions: vec![subscription],
        ..CoordinatorConfig::default()
    }
}

/// Starts the coordinator and waits until it has declared the topology.
/// Returns it with the queue type it declared (`quorum` unless the broker
/// has none).
pub async fn start_coordinator(bin: &Path, t: &Topology<'_>) -> anyhow::Result<(Coordinator, String)> {
    let mut coordinator = Coordinator::start_with(bin, coordinator_config(t)).await?;
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
    let settings = WorkerConfig {
        coordinator: coordinator.url(),
        worker_id: Some(WORKER_ID.to_owned()),
        amqp_url: s.url.to_owned(),
        ..WorkerConfig::hosting([HANDLER])
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
        let c =
            coordinator_config(&Topology { url: "amqp://g:g@h:5672/%2f", names: &names, batch_size: 100 });
        assert_eq!(c.amqp_url, "amqp://g:g@h:5672/%2f");
        assert_eq!(c.scale_interval, Duration::from_millis(500));
        assert_eq!((c.topics[0].name.as_str(), c.topics[0].kind), ("b-topic", TopicKind::Fanout));
        let s = &c.subscriptions[0];
        assert_eq!((s.name.as_str(), s.topic.as_str(), s.handler.as_str()), ("b", "b-topic", "noop"));
        assert_eq!((s.min_slots, s.max_concurrency, s.settings.batch_size), (1, 1, 100));
    }
}
