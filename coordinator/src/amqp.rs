//! The coordinator's side of RabbitMQ: it declares the topology from the
//! config (idempotently, at start and after every reconnect), reads each
//! subscription's queues every `scale_interval`, and sets the number of
//! queue slots with [`crate::scale`]. It never consumes a message.
//!
//! A declaration RabbitMQ refuses (a queue that exists with other
//! arguments, say) is logged, shown by `ListSubscriptions` and counted in
//! `shardline_topology_errors_total`; it is never retried with other
//! arguments. Slots keep being leased: workers consume the queue as it is.
//!
//! Retry queues are quorum queues with at-least-once dead-lettering
//! (`x-dead-letter-strategy = at-least-once`, which RabbitMQ honours only
//! with `x-overflow = reject-publish`): an expired message stays in its
//! retry queue until `S` has confirmed the copy, so a broker crash during
//! the hop back duplicates at worst and never loses (DESIGN.md rule 6).
//! Where the subscription is classic, or the broker refuses such a quorum
//! queue (before 3.10), they are classic, and then that hop is at most
//! once, which is logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use shardline_proto::{LeaseKind, topology};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, QueueType, SubscriptionConfig, TopicKind};
use crate::core::LeaseState;
use crate::scale::{Bounds, Reading, Scaler};
use crate::service::{Command, Handle};

/// What the admin API shows of a subscription.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionStatus {
    pub name: String,
    pub topic: String,
    pub handler: String,
    pub slots: u32,
    pub min_slots: u32,
    pub max_concurrency: u32,
    pub depth: u64,
    pub consumers: u32,
    pub retrying: u64,
    pub dead_lettered: u64,
    pub unacked: u64,
    pub drain_rate: f64,
    pub read_at: Option<Instant>,
    pub error: Option<String>,
    pub queue_type: String,
}

/// Shared with the admin API; written only by [`run`].
pub type StatusTable = Arc<Mutex<BTreeMap<String, SubscriptionStatus>>>;

/// What was declared for one subscription.
#[derive(Debug, Clone, Default)]
struct Declared {
    /// Classic retry queues of an earlier release still on the broker: they
    /// keep sending what they hold back to `S`, so they count as retrying
    /// until the operator deletes them.
    legacy: Vec<String>,
}

/// The queues of one subscription as RabbitMQ counts them.
#[derive(Debug, Clone, Copy, Default)]
struct Depths {
    depth: u64,
    consumers: u32,
    retrying: u64,
    dead_lettered: u64,
}

/// Declares topology, reads depths and scales slots until `shutdown`.
pub async fn run(config: Arc<Config>, handle: Handle, status: StatusTable, shutdown: CancellationToken) {
    if config.subscriptions.is_empty() {
        return;
    }
    // Exported at 0 from the start, so an alert can tell "no errors" from
    // "no such series".
    metrics::counter!("shardline_topology_errors_total").increment(0);
    let owned = owned_slots(&handle).await;
    let mut scalers: BTreeMap<String, Scaler> = BTreeMap::new();
    for s in &config.subscriptions {
        let scaler = Scaler::new(bounds(s), owned.get(&s.name).copied().unwrap_or(0));
        if let Ok(mut table) = status.lock() {
            table.insert(
                s.name.clone(),
                SubscriptionStatus {
                    name: s.name.clone(),
                    topic: s.topic.clone(),
                    handler: s.handler.clone(),
                    slots: scaler.slots(),
                    min_slots: s.min_slots,
                    max_concurrency: s.max_concurrency,
                    ..SubscriptionStatus::default()
                },
            );
        }
        scalers.insert(s.name.clone(), scaler);
    }
    // Slots are leased after the first declaration attempt (so workers do
    // not consume queues that are about to be declared), but whether or not
    // RabbitMQ answered: workers wait for the broker themselves.
    let mut slots_set = false;
    // Old retry queues are looked for once per process: each absent one
    // costs a refused passive declare, which lapin logs as an error.
    let mut look_for_legacy = true;
    let mut wait = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let connection = tokio::select! {
            () = shutdown.cancelled() => return,
            c = shardline_config::amqp::connect(&config.amqp_url, config.amqp_tls.as_ref(), "shardline-coordinator") => c,
        };
        let connection = match connection {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, ?wait, "cannot connect to RabbitMQ; retrying");
                mark_all(&status, &format!("RabbitMQ unreachable: {e}"));
                if !slots_set {
                    slots_set = true;
                    set_all_slots(&handle, &config, &scalers).await;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        wait = Duration::from_millis(200);
        tracing::info!("connected to RabbitMQ; declaring topology");
        let mut declared = declare_all(&connection, &config, &status, look_for_legacy).await;
        look_for_legacy = false;
        if !slots_set {
            slots_set = true;
            set_all_slots(&handle, &config, &scalers).await;
        }
        // Read and scale until the connection breaks.
        let mut ticker = tokio::time::interval(config.scale_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while connection.status().connected() {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = connection.close(200, "coordinator stopping".into()).await;
                    return;
                }
                _ = ticker.tick() => {}
            }
            let loads = slot_loads(&handle).await;
            for s in &config.subscriptions {
                let depths = match read_depths(&connection, s, &mut declared).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(subscription = %s.name, error = %e, "cannot read queue depths");
                        mark(&status, &s.name, |st| st.error = Some(e.clone()));
                        continue;
                    }
                };
                let load = loads.get(&s.name).copied().unwrap_or_default();
                let Some(scaler) = scalers.get_mut(&s.name) else { continue };
                let before = scaler.slots();
                let reading = Reading { depth: depths.depth, drain_rate: load.rate, busy: load.busy };
                let slots = scaler.next(Instant::now(), reading);
                if slots != before {
                    tracing::info!(
                        subscription = %s.name, from = before, to = slots, depth = depths.depth,
                        drain_rate = load.rate, "scaling queue slots"
                    );
                    set_slots(&handle, s, slots).await;
                }
                publish_metrics(&s.name, &depths, slots);
                mark(&status, &s.name, |st| {
                    st.slots = slots;
                    st.depth = depths.depth;
                    st.consumers = depths.consumers;
                    st.retrying = depths.retrying;
                    st.dead_lettered = depths.dead_lettered;
                    st.unacked = load.unacked;
                    st.drain_rate = load.rate;
                    st.read_at = Some(Instant::now());
                    if st.error.as_deref().is_some_and(|e| e.starts_with("RabbitMQ unreachable")) {
                        st.error = None;
                    }
                });
            }
        }
        tracing::warn!("lost the RabbitMQ connection; reconnecting");
        mark_all(&status, "RabbitMQ connection lost; reconnecting");
    }
}

fn bounds(s: &SubscriptionConfig) -> Bounds {
    Bounds {
        min: s.min_slots,
        max: s.max_concurrency,
        drain_target: s.drain_target,
        scale_down_after: s.scale_down_after,
    }
}

async fn set_all_slots(handle: &Handle, config: &Config, scalers: &BTreeMap<String, Scaler>) {
    for s in &config.subscriptions {
        if let Some(scaler) = scalers.get(&s.name) {
            set_slots(handle, s, scaler.slots()).await;
        }
    }
}

async fn set_slots(handle: &Handle, s: &SubscriptionConfig, count: u32) {
    let command = Command::SetSlots { name: s.name.clone(), handler: s.handler.clone(), count };
    let _ = handle.send(command).await;
}

fn mark(status: &StatusTable, name: &str, f: impl FnOnce(&mut SubscriptionStatus)) {
    if let Ok(mut table) = status.lock()
        && let Some(st) = table.get_mut(name)
    {
        f(st);
    }
}

fn mark_all(status: &StatusTable, error: &str) {
    if let Ok(mut table) = status.lock() {
        for st in table.values_mut() {
            st.error = Some(error.to_owned());
        }
    }
}

fn publish_metrics(name: &str, d: &Depths, slots: u32) {
    let sub = name.to_owned();
    metrics::gauge!("shardline_subscription_depth", "subscription" => sub.clone()).set(d.depth as f64);
    metrics::gauge!("shardline_subscription_retrying", "subscription" => sub.clone()).set(d.retrying as f64);
    metrics::gauge!("shardline_subscription_dead_lettered", "subscription" => sub.clone())
        .set(d.dead_lettered as f64);
    metrics::gauge!("shardline_subscription_slots", "subscription" => sub).set(f64::from(slots));
}

/// Slot leases with an owner, per subscription (after a restart, the
/// scaler starts from what was running rather than from `min_slots`).
async fn owned_slots(handle: &Handle) -> BTreeMap<String, u32> {
    let mut owned = BTreeMap::new();
    if let Ok(snapshot) = handle.call(Command::Snapshot).await {
        for l in snapshot.leases {
            if l.record.lease.kind == LeaseKind::QueueSlot && l.record.owner.is_some() {
                *owned.entry(l.record.lease.name.clone()).or_insert(0) += 1;
            }
        }
    }
    owned
}

/// What the workers report of a subscription's slots.
#[derive(Debug, Clone, Copy, Default)]
struct SlotLoad {
    rate: f64,
    busy: f64,
    unacked: u64,
}

async fn slot_loads(handle: &Handle) -> BTreeMap<String, SlotLoad> {
    let mut loads: BTreeMap<String, SlotLoad> = BTreeMap::new();
    let Ok(snapshot) = handle.call(Command::Snapshot).await else { return loads };
    let live: BTreeMap<_, _> = snapshot
        .leases
        .iter()
        .filter(|l| l.record.lease.kind == LeaseKind::QueueSlot && l.state != LeaseState::Parked)
        .map(|l| ((l.record.lease.clone(), l.record.owner.clone()), ()))
        .collect();
    for w in &snapshot.workers {
        for (lease, load) in &w.load.leases {
            if !live.contains_key(&(lease.clone(), Some(w.id.clone()))) {
                continue;
            }
            let entry = loads.entry(lease.name.clone()).or_default();
            entry.rate += load.records_out_per_s;
            entry.busy += load.busy_ratio;
            // For a queue slot, `lag` is what it holds unacknowledged.
            entry.unacked += u64::try_from(load.lag).unwrap_or(0);
        }
    }
    loads
}

/// The `x-queue-type` a subscription's queues get.
fn queue_type_arg(t: QueueType) -> &'static str {
    match t {
        QueueType::Classic => "classic",
        QueueType::Auto | QueueType::Quorum => "quorum",
    }
}

fn queue_args(queue_type: &str, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.into()));
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    args
}

/// Declares every topic and subscription; returns what was declared for
/// each subscription. Errors are recorded per subscription.
async fn declare_all(
    connection: &Connection,
    config: &Config,
    status: &StatusTable,
    look_for_legacy: bool,
) -> BTreeMap<String, Declared> {
    let mut types = BTreeMap::new();
    for t in &config.topics {
        let kind = match t.kind {
            TopicKind::Fanout => ExchangeKind::Fanout,
            TopicKind::Topic => ExchangeKind::Topic,
        };
        let result = with_channel(connection, async |ch| {
            ch.exchange_declare(t.name.as_str().into(), kind, durable_exchange(), FieldTable::default()).await
        })
        .await;
        if let Err(e) = result {
            topology_error(
                status,
                config,
                &t.name,
                format!("cannot declare topic exchange `{}`: {e}", t.name),
            );
        }
    }
    for s in &config.subscriptions {
        let kind = config.topics.iter().find(|t| t.name == s.topic).map_or(TopicKind::Fanout, |t| t.kind);
        let mut queue_type = queue_type_arg(s.queue_type);
        let mut result = declare_subscription(connection, s, kind, queue_type).await;
        if s.queue_type == QueueType::Auto
            && let Err(e) = &result
            && !e.contains("inequivalent")
            && !e.contains("unreachable")
        {
            // Not a conflict: the broker does not do quorum queues.
            tracing::info!(subscription = %s.name, error = %e, "quorum queues refused; using classic queues");
            queue_type = "classic";
            result = declare_subscription(connection, s, kind, queue_type).await;
        }
        match result {
            Ok(()) => {
                let legacy =
                    if look_for_legacy { legacy_retry_queues(connection, s).await } else { Vec::new() };
                types.insert(s.name.clone(), Declared { legacy });
                mark(status, &s.name, |st| {
                    st.error = None;
                    st.queue_type = queue_type.to_owned();
                });
            }
            Err(e) => topology_error(status, config, &s.name, e),
        }
    }
    types
}

fn topology_error(status: &StatusTable, config: &Config, name: &str, message: String) {
    tracing::error!(%name, error = %message, "RabbitMQ refused a declaration; fix the broker or the config");
    metrics::counter!("shardline_topology_errors_total").increment(1);
    // A topic's error belongs to each subscription bound to it.
    for s in config.subscriptions.iter().filter(|s| s.name == name || s.topic == name) {
        mark(status, &s.name, |st| st.error = Some(message.clone()));
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

/// The subscription queue bound to its topic, its dead-letter exchange and
/// queue, and one retry queue per delay (see [`topology`]).
async fn declare_subscription(
    connection: &Connection,
    s: &SubscriptionConfig,
    topic_kind: TopicKind,
    queue_type: &str,
) -> Result<(), String> {
    let dlx = topology::dead_letter_exchange(&s.name);
    let dlq = topology::dead_letter_queue(&s.name);
    let binding = match topic_kind {
        TopicKind::Fanout => String::new(),
        TopicKind::Topic => s.binding_key.clone().unwrap_or_else(|| "#".into()),
    };
    let what = |thing: &str, e: lapin::Error| {
        let hint = if e.to_string().contains("inequivalent") {
            " — it exists with other arguments; delete it (after draining) or change the config to match"
        } else {
            ""
        };
        format!("subscription `{}`: cannot declare {thing} as {queue_type}: {e}{hint}", s.name)
    };
    with_channel(connection, async |ch| {
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
    })
    .await
    .map_err(|e| what(&format!("dead-letter exchange `{dlx}`"), e))?;
    with_channel(connection, async |ch| {
        ch.queue_declare(dlq.as_str().into(), durable_queue(), queue_args(queue_type, &[])).await?;
        ch.queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
    .map_err(|e| what(&format!("dead-letter queue `{dlq}`"), e))?;
    // What the broker itself dead-letters (a quorum queue's delivery limit,
    // a rejected message) lands in the DLQ instead of vanishing.
    let main_args =
        queue_args(queue_type, &[("x-dead-letter-exchange", AMQPValue::LongString(dlx.as_str().into()))]);
    with_channel(connection, async |ch| {
        ch.queue_declare(s.name.as_str().into(), durable_queue(), main_args.clone()).await?;
        ch.queue_bind(
            s.name.as_str().into(),
            s.topic.as_str().into(),
            binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
    .map_err(|e| what(&format!("queue `{}`", s.name), e))?;
    let policy = s.settings.mapping(&s.handler).policy;
    if queue_type == "classic" {
        tracing::warn!(
            subscription = %s.name,
            "retry queues are classic (the broker refuses quorum queues): RabbitMQ moves an expired \
             retry back to the queue at most once, so a broker crash during that hop can lose it"
        );
    }
    for delay in topology::retry_delays(&policy) {
        let name = topology::retry_queue(&s.name, delay);
        let declare = async |queue_type: &str| {
            let args = retry_queue_args(queue_type, &s.name, delay);
            with_channel(connection, async |ch| {
                ch.queue_declare(name.as_str().into(), durable_queue(), args.clone()).await.map(|_| ())
            })
            .await
        };
        let mut result = declare(queue_type).await;
        if queue_type == "quorum"
            && let Err(e) = &result
            && !is_conflict_or_down(e)
        {
            // RabbitMQ before 3.10 has quorum queues but neither message
            // TTL nor at-least-once dead-lettering on them. Retries still
            // work there through a classic queue, only less safely.
            tracing::warn!(
                subscription = %s.name, queue = %name, error = %e,
                "the broker refuses an at-least-once quorum retry queue (RabbitMQ 3.10 or later needed); \
                 declaring it classic: a broker crash while a retry moves back can lose it"
            );
            result = declare("classic").await;
        }
        result.map_err(|e| what(&format!("retry queue `{name}`"), e))?;
    }
    Ok(())
}

/// A refusal that another queue type would not cure: the queue exists with
/// other arguments, or the broker went away.
fn is_conflict_or_down(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("inequivalent") || !matches!(e.kind(), lapin::ErrorKind::ProtocolError(_))
}

/// The arguments of a retry queue: a queue-wide TTL of `delay` that
/// dead-letters back to the subscription through the default exchange.
///
/// On quorum queues the dead-lettering is at least once: RabbitMQ keeps an
/// expired message in the retry queue until the subscription queue has
/// confirmed it. That strategy requires `x-overflow = reject-publish`
/// (with `drop-head` RabbitMQ silently falls back to at most once); there is
/// no length limit, so nothing is ever rejected for length.
fn retry_queue_args(queue_type: &str, subscription: &str, delay: Duration) -> FieldTable {
    let mut extra = vec![
        ("x-message-ttl", AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))),
        ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString(subscription.into())),
    ];
    if queue_type == "quorum" {
        extra.push(("x-dead-letter-strategy", AMQPValue::LongString("at-least-once".into())));
        extra.push(("x-overflow", AMQPValue::LongString("reject-publish".into())));
    }
    queue_args(queue_type, &extra)
}

/// Classic retry queues of an earlier release (`S.retry.<ms>`) still on
/// the broker, found with passive declares of the names the current policy
/// would have used (RabbitMQ refuses one for each that is absent, which
/// lapin logs as an error). Each is reported once per declaration: it keeps sending
/// what it holds back to `S`, and can be deleted once empty and no worker
/// of that release publishes to it any more.
async fn legacy_retry_queues(connection: &Connection, s: &SubscriptionConfig) -> Vec<String> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let policy = s.settings.mapping(&s.handler).policy;
    let mut found = Vec::new();
    tracing::info!(
        subscription = %s.name,
        "looking for classic retry queues of an earlier release (NOT_FOUND errors that follow are expected)"
    );
    for delay in topology::retry_delays(&policy) {
        let name = topology::legacy_retry_queue(&s.name, delay);
        let result = with_channel(connection, async |ch| {
            ch.queue_declare(name.as_str().into(), passive, FieldTable::default()).await
        })
        .await;
        match result {
            Ok(q) => {
                tracing::warn!(
                    subscription = %s.name, queue = %name, messages = q.message_count(),
                    "a classic retry queue of an earlier release is still there; it keeps returning \
                     its messages to the subscription (at most once): delete it once it is empty"
                );
                found.push(name);
            }
            // NOT_FOUND is the normal case: nothing left from before.
            Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("no queue") => {}
            Err(e) => {
                tracing::warn!(subscription = %s.name, queue = %name, error = %e, "cannot look for an old retry queue");
            }
        }
    }
    found
}

/// Runs `f` on a fresh channel and closes it: a refused declaration closes
/// its channel, so one channel per step keeps errors apart.
async fn with_channel<T>(
    connection: &Connection,
    f: impl AsyncFnOnce(&Channel) -> Result<T, lapin::Error>,
) -> Result<T, lapin::Error> {
    let channel = connection.create_channel().await?;
    let result = f(&channel).await;
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
    result
}

/// Passive declares (which never create anything) of the subscription's
/// queues: ready messages and consumers of the queue, plus what waits in
/// its retry and dead-letter queues.
async fn read_depths(
    connection: &Connection,
    s: &SubscriptionConfig,
    declared: &mut BTreeMap<String, Declared>,
) -> Result<Depths, String> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let count = async |queue: String| {
        with_channel(connection, async |ch| {
            ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await
        })
        .await
        .map_err(|e| format!("queue `{queue}`: {e}"))
    };
    let main = count(s.name.clone()).await?;
    let mut depths = Depths {
        depth: u64::from(main.message_count()),
        consumers: main.consumer_count(),
        ..Depths::default()
    };
    if let Some(d) = declared.get_mut(&s.name) {
        depths.dead_lettered = u64::from(count(topology::dead_letter_queue(&s.name)).await?.message_count());
        let policy = s.settings.mapping(&s.handler).policy;
        for delay in topology::retry_delays(&policy) {
            depths.retrying += u64::from(count(topology::retry_queue(&s.name, delay)).await?.message_count());
        }
        let mut gone = Vec::new();
        for queue in &d.legacy {
            match count(queue.clone()).await {
                Ok(q) => depths.retrying += u64::from(q.message_count()),
                // Deleted by the operator, as the warning asked.
                Err(e) => {
                    tracing::info!(subscription = %s.name, %queue, error = %e, "old retry queue no longer counted");
                    gone.push(queue.clone());
                }
            }
        }
        d.legacy.retain(|q| !gone.contains(q));
    }
    Ok(depths)
}
