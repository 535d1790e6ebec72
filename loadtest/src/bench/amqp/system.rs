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
//! [`POLL`], together with the queue's ready count from a passive declare:
//! the run is over when the worker has handled every message and the queue
//! holds none. The coordinator's `ListSubscriptions` is used only to know
//! that the topology exists: its `unacked` comes from heartbeats and lags.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use tokio::time::Instant;

use super::queue::{self, Names};
use crate::child::{Coordinator, Metrics, Setup, Worker, WorkerSettings, quote};
use crate::stats::{ProcCpu, RssSampler, mib, proc_status_kib, round3};

const WORKER_ID: &str = "bench";
/// The only handler run: the figures are the machinery's, not a handler's.
const HANDLER: &str = "noop";
/// How often the coordinator reads the queues: often enough that the
/// topology's status is known soon after it is declared.
const SCALE_INTERVAL: &str = "500ms";
/// How often progress is read: the end of the run is known to within this
/// (plus one scrape and one passive declare).
pub const POLL: Duration = Duration::from_millis(50);
/// How long the coordinator gets to connect and declare the topology.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(30);
/// Progress is kept for the report at this resolution.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
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
fn coordinator_toml(t: &Topology<'_>) -> String {
    format!(
        "amqp_url = {url}\nscale_interval = \"{SCALE_INTERVAL}\"\n\n\
         [[topics]]\nname = {topic}\n\n\
         [[subscriptions]]\nname = {queue}\ntopic = {topic}\nhandler = \"{HANDLER}\"\n\
         min_slots = 1\nmax_concurrency = 1\nbatch_size = {batch_size}\n",
        url = quote(t.url),
        topic = quote(&t.names.topic),
        queue = quote(&t.names.queue),
        batch_size = t.batch_size,
    )
}

/// Starts the coordinator and waits until it has declared the topology.
/// Returns it with the queue type it declared (`quorum` unless the broker
/// has none).
pub async fn start_coordinator(bin: &Path, t: &Topology<'_>) -> anyhow::Result<(Coordinator, String)> {
    let extra = coordinator_toml(t);
    let setup = Setup { streams: &[], kafka: None, extra: Some(&extra) };
    let mut coordinator = Coordinator::start_with(bin, &setup).await?;
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
                coordinator.log_tail(20)
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

/// What the run measured.
pub struct SystemFigures {
    /// From starting the worker to the last message handled.
    pub seconds: f64,
    pub per_s: f64,
    /// When RabbitMQ first counted a consumer on the queue: registration,
    /// the slot grant and the worker's connection.
    pub consuming_s: Option<f64>,
    /// When handled messages were first seen.
    pub first_message_s: f64,
    /// From the first handled messages seen to the last: start-up left out,
    /// the figure compared with the baseline's.
    pub steady_per_s: f64,
    pub sampled_peak_rss_kib: u64,
    pub hwm_kib: Option<u64>,
    pub worker_cores: Option<f64>,
    pub coordinator_cores: Option<f64>,
    pub harness_cores: Option<f64>,
    pub broker_cores: Option<f64>,
    pub worker: WorkerMetrics,
    /// `(seconds since the worker started, messages handled)`.
    pub progress: Vec<(f64, u64)>,
}

impl SystemFigures {
    pub fn peak_rss_mib(&self) -> f64 {
        mib(self.sampled_peak_rss_kib.max(self.hwm_kib.unwrap_or(0)))
    }
}

/// The worker's own view, from its metrics endpoint at the end of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerMetrics {
    pub records: f64,
    pub batches: f64,
    /// A count: an integer, so an absent metric (an empty sum, -0.0) prints
    /// as 0.
    pub redeliveries: u64,
    pub mean_handler_ms: f64,
}

impl WorkerMetrics {
    fn from(m: &Metrics) -> Self {
        let count = m.sum("shardline_handler_duration_seconds_count");
        Self {
            records: m.sum(RECORDS),
            batches: m.sum("shardline_batches_total"),
            redeliveries: m.sum("shardline_redeliveries_total") as u64,
            mean_handler_ms: if count > 0.0 {
                m.sum("shardline_handler_duration_seconds_sum") * 1000.0 / count
            } else {
                0.0
            },
        }
    }

    pub fn mean_batch(&self) -> f64 {
        if self.batches > 0.0 { self.records / self.batches } else { 0.0 }
    }
}

/// Starts the worker, waits until it has handled every message, then stops
/// the worker and the coordinator.
pub async fn run(mut coordinator: Coordinator, s: &Settings<'_>) -> anyhow::Result<SystemFigures> {
    let observer = queue::connect(s.url, "shardline-bench-observer").await?;
    let coordinator_cpu = ProcCpu::start(coordinator.pid());
    let harness_cpu = ProcCpu::start(std::process::id());
    let broker_cpu = s.broker_pid.map(ProcCpu::start);
    let started = Instant::now();
    let settings = WorkerSettings {
        coordinator: &coordinator.url(),
        worker_id: WORKER_ID,
        kafka_brokers: KAFKA_BROKERS,
        handlers: &[(HANDLER, Vec::new())],
        fetch_queue_kib: None,
        amqp_url: Some(s.url),
        max_inflight_batches: None,
    };
    let mut worker = Worker::start(s.worker_bin, &settings)?;
    let rss = RssSampler::start(worker.pid());
    let worker_cpu = ProcCpu::start(worker.pid());

    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consuming_s = None;
    let mut first = None;
    let mut progress = Vec::new();
    let (mut last_handled, mut last_progress) = (0, Instant::now());
    let seconds = loop {
        every.tick().await;
        worker.check_alive()?;
        coordinator.check_alive()?;
        let (handled, scrape_error) = match worker.scrape().await {
            Ok(m) => (m.sum(RECORDS) as u64, None),
            // The endpoint is bound a moment after the process starts; a
            // lasting failure shows as a stall below, with this error.
            Err(e) => (last_handled, Some(format!("{e:#}"))),
        };
        let now = started.elapsed();
        let depth = queue::depth(&observer, s.queue).await?;
        if depth.consumers > 0 && consuming_s.is_none() {
            consuming_s = Some(now.as_secs_f64());
        }
        if handled > 0 && first.is_none() {
            first = Some((now, handled));
        }
        if progress.last().is_none_or(|(t, _)| now.as_secs_f64() - t >= PROGRESS_EVERY.as_secs_f64()) {
            progress.push((round3(now.as_secs_f64()), handled));
        }
        if handled >= s.expected && depth.ready == 0 {
            progress.push((round3(now.as_secs_f64()), handled));
            break now;
        }
        if handled > last_handled {
            (last_handled, last_progress) = (handled, Instant::now());
        } else if last_progress.elapsed() > s.stall {
            bail!(
                "the worker handled {handled} of {} messages ({} still ready in the queue) and nothing more for \
                 {:?}{}; the worker's log:\n{}",
                s.expected,
                depth.ready,
                s.stall,
                scrape_error.map_or(String::new(), |e| format!(" (metrics: {e})")),
                worker.log_tail(20)
            );
        }
    };

    let hwm_kib = worker.peak_rss_kib();
    let worker_cores = worker_cpu.cores();
    let coordinator_cores = coordinator_cpu.cores();
    let harness_cores = harness_cpu.cores();
    let broker_cores = broker_cpu.and_then(|c| c.cores());
    let sampled_peak_rss_kib = rss.peak_kib().max(proc_status_kib(worker.pid(), "VmRSS").unwrap_or(0));
    // Figures that explain the rate, not the rate itself: a failed scrape is
    // reported as zeros rather than failing a finished measurement.
    let worker_metrics = match worker.scrape().await {
        Ok(m) => WorkerMetrics::from(&m),
        Err(e) => {
            eprintln!("warning: cannot read the worker's metrics: {e:#}");
            WorkerMetrics::default()
        }
    };
    worker.stop().await?;
    coordinator.stop().await?;
    if let Err(e) = observer.close(200, "run done".into()).await {
        eprintln!("warning: cannot close the observer's connection: {e}");
    }

    let (first_at, first_handled) = first.unwrap_or((seconds, s.expected));
    let steady = seconds.saturating_sub(first_at).as_secs_f64();
    Ok(SystemFigures {
        seconds: seconds.as_secs_f64(),
        per_s: s.expected as f64 / seconds.as_secs_f64().max(1e-9),
        consuming_s,
        first_message_s: first_at.as_secs_f64(),
        steady_per_s: if steady > 0.0 {
            s.expected.saturating_sub(first_handled) as f64 / steady
        } else {
            0.0
        },
        sampled_peak_rss_kib,
        hwm_kib,
        worker_cores,
        coordinator_cores,
        harness_cores,
        broker_cores,
        worker: worker_metrics,
        progress,
    })
}

impl SystemFigures {
    pub fn json(&self) -> serde_json::Value {
        let w = &self.worker;
        json!({
            "seconds": round3(self.seconds),
            "messages_per_s": round3(self.per_s),
            "consuming_s": self.consuming_s.map(round3),
            "first_message_s": round3(self.first_message_s),
            "steady_messages_per_s": round3(self.steady_per_s),
            "worker_peak_rss_mib": round3(self.peak_rss_mib()),
            "worker_sampled_peak_rss_mib": round3(mib(self.sampled_peak_rss_kib)),
            "worker_vm_hwm_mib": self.hwm_kib.map(|k| round3(mib(k))),
            "cores": {
                "worker": self.worker_cores.map(round3),
                "coordinator": self.coordinator_cores.map(round3),
                "harness": self.harness_cores.map(round3),
                "broker": self.broker_cores.map(round3),
            },
            "worker_metrics": {
                "records": w.records,
                "batches": w.batches,
                "mean_batch_records": round3(w.mean_batch()),
                "redeliveries": w.redeliveries,
                "mean_handler_ms": round3(w.mean_handler_ms),
            },
            "progress": self.progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_config_has_one_single_slot_subscription_on_a_fanout_topic() {
        let names = Names { topic: "b-topic".into(), queue: "b".into() };
        let toml =
            coordinator_toml(&Topology { url: "amqp://g:g@h:5672/%2f", names: &names, batch_size: 100 });
        assert!(
            toml.starts_with("amqp_url = \"amqp://g:g@h:5672/%2f\"\nscale_interval = \"500ms\"\n"),
            "{toml}"
        );
        assert!(toml.contains("[[topics]]\nname = \"b-topic\"\n"), "{toml}");
        assert!(
            toml.ends_with(
                "[[subscriptions]]\nname = \"b\"\ntopic = \"b-topic\"\nhandler = \"noop\"\nmin_slots = 1\n\
                 max_concurrency = 1\nbatch_size = 100\n"
            ),
            "{toml}"
        );
    }
}
