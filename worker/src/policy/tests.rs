//! Unit tests of the batch policy: the finished prefix across gaps, bisect
//! trees, item failures, record age, timeouts, filters.

use std::sync::Mutex;
use std::time::Duration;

use shardline_proto::{FailurePolicy, Filter, FilterTest, LeaseId};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::handler::{Batch, BatchResponse, BoxFuture, DynHandler, HandlerError, Origin, Record};
use crate::sink::Sent;

impl Hooks for () {}

type Script = dyn Fn(&Batch) -> Result<BatchResponse, HandlerError> + Send + Sync;

/// A handler driven by a closure that records every batch it was given.
struct Scripted {
    script: Box<Script>,
    delay: Duration,
    calls: Mutex<Vec<Vec<i64>>>,
}

impl Scripted {
    fn new(script: impl Fn(&Batch) -> Result<BatchResponse, HandlerError> + Send + Sync + 'static) -> Self {
        Self { script: Box::new(script), delay: Duration::ZERO, calls: Mutex::new(Vec::new()) }
    }

    fn calls(&self) -> Vec<Vec<i64>> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// How often each offset reached the handler.
    fn seen(&self, offset: i64) -> usize {
        self.calls().iter().flatten().filter(|o| **o == offset).count()
    }
}

impl DynHandler for Scripted {
    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<BatchResponse, HandlerError>> {
        Box::pin(async move {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(batch.records.iter().map(|r| r.position()).collect());
            }
            tokio::time::sleep(self.delay).await;
            (self.script)(batch)
        })
    }
}

#[derive(Default)]
struct Recording(Mutex<Vec<(Vec<i64>, GaveUp)>>);

impl FailureSink for Recording {
    fn send<'a>(&'a self, _lease: &'a LeaseId, records: &'a [Arc<Record>], why: &'a GaveUp) -> Sent<'a> {
        Box::pin(async move {
            if let Ok(mut got) = self.0.lock() {
                got.push((records.iter().map(|r| r.position()).collect(), why.clone()));
            }
            Ok(())
        })
    }
}

impl Recording {
    fn got(&self) -> Vec<(Vec<i64>, GaveUp)> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

fn record(offset: i64, timestamp_ms: Option<i64>) -> Arc<Record> {
    Arc::new(Record {
        key: None,
        value: format!("{{\"n\":{offset},\"kind\":\"k{}\"}}", offset % 2).into_bytes(),
        tombstone: false,
        headers: vec![],
        timestamp_ms,
        origin: Origin::Kafka { partition: 0, offset },
        reply_to: None,
    })
}

fn records(offsets: impl IntoIterator<Item = i64>) -> Vec<Arc<Record>> {
    offsets.into_iter().map(|offset| record(offset, None)).collect()
}

fn policy() -> FailurePolicy {
    FailurePolicy { retry_initial: Duration::from_millis(1), retry_jitter: false, ..FailurePolicy::default() }
}

/// Runs a lane over `input` and returns its stats and final checkpoint.
async fn run(
    handler: &Scripted,
    policy: &FailurePolicy,
    filter: Option<&CompiledFilter>,
    sink: &Recording,
    input: Vec<Arc<Record>>,
) -> (Result<LaneStats, Stopped>, i64) {
    run_with_hooks(handler, policy, filter, sink, &(), input).await
}

async fn run_with_hooks(
    handler: &Scripted,
    policy: &FailurePolicy,
    filter: Option<&CompiledFilter>,
    sink: &Recording,
    hooks: &dyn Hooks,
    input: Vec<Arc<Record>>,
) -> (Result<LaneStats, Stopped>, i64) {
    run_lane(Setup { handler, policy, filter, sink, hooks, drain: &CancellationToken::new() }, input).await
}

/// What a test lane runs with.
struct Setup<'a> {
    handler: &'a Scripted,
    policy: &'a FailurePolicy,
    filter: Option<&'a CompiledFilter>,
    sink: &'a Recording,
    hooks: &'a dyn Hooks,
    drain: &'a CancellationToken,
}

async fn run_lane(setup: Setup<'_>, input: Vec<Arc<Record>>) -> (Result<LaneStats, Stopped>, i64) {
    let Setup { handler, policy, filter, sink, hooks, drain } = setup;
    let kill = CancellationToken::new();
    let lease = LeaseId::shard("s", 0);
    // Every advance the lease would finalize, in order.
    let advances = Mutex::new(Vec::new());
    let advanced = |p: i64| advances.lock().unwrap_or_else(|e| panic!("{e}")).push(p);
    let tracker = Tracker::new(input.first().map_or(0, |r| r.position()), &kill, &advanced);
    tracker.add(&input);
    let lane = Lane {
        handler,
        name: "test",
        policy,
        filter,
        sink,
        replies: None,
        window: None,
        hooks,
        drain,
        lease: &lease,
        epoch: 1,
        tracker: &tracker,
    };
    let stats = lane.process(input, 0).await;
    assert!(!tracker.broken().is_cancelled(), "every record was finished or left");
    let position = tracker.position();
    let advances = advances.into_inner().unwrap_or_else(|e| panic!("{e}"));
    assert!(advances.windows(2).all(|w| w[0] < w[1]), "the prefix only grows: {advances:?}");
    assert_eq!(advances.last().copied().unwrap_or(position), position, "the last advance is the prefix");
    (stats, position)
}

#[test]
fn the_checkpoint_is_the_first_unfinished_record_across_gaps() {
    let kill = CancellationToken::new();
    let advances = Mutex::new(Vec::new());
    let advanced = |p: i64| advances.lock().unwrap_or_else(|e| panic!("{e}")).push(p);
    let tracker = Tracker::new(0, &kill, &advanced);
    tracker.add(&records([0, 1, 2, 5, 6]));
    // Finishes `offsets`; the prefix it moved to, if it moved.
    let finish = |offsets: &[i64]| {
        let before = advances.lock().unwrap_or_else(|e| panic!("{e}")).len();
        tracker.finish(&records(offsets.iter().copied()));
        let after = advances.lock().unwrap_or_else(|e| panic!("{e}")).clone();
        assert!(after.len() <= before + 1, "one advance per call at most: {after:?}");
        (after.len() > before).then(|| after[before])
    };
    assert_eq!(finish(&[1]), None, "0 is not finished yet");
    assert_eq!(finish(&[0]), Some(2));
    assert_eq!(tracker.position(), 2);
    assert_eq!(finish(&[5]), None, "2 still blocks");
    assert_eq!(finish(&[2]), Some(6), "the offset gap 3..5 is skipped");
    assert_eq!(finish(&[6]), Some(7));
    assert_eq!(finish(&[6]), None);
    assert_eq!(finish(&[9]), None, "a record never cut moves nothing");
    assert_eq!(tracker.position(), 7);
}

/// A lease released while its batch keeps failing: the lane starts no new
/// attempt once the drain begins, leaves the records unfinished (the
/// checkpoint stays before them) and returns, so the release can finish.
#[tokio::test(start_paused = true)]
async fn a_draining_lane_starts_no_retry_and_leaves_failing_records_to_the_next_owner() {
    let handler = Scripted::new(|_| Err("down".into()));
    let policy = FailurePolicy { retry_initial: Duration::from_secs(1), ..policy() };
    let sink = Recording::default();
    let drain = CancellationToken::new();
    let later = drain.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        later.cancel();
    });
    let setup =
        Setup { handler: &handler, policy: &policy, filter: None, sink: &sink, hooks: &(), drain: &drain };
    let run = run_lane(setup, records(10..14));
    let (stats, position) = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .unwrap_or_else(|_| panic!("the lane still retries 10 minutes after the drain began"));
    let stats = stats.unwrap_or_else(|_| panic!("the lane was not stopped"));
    assert_eq!(stats.abandoned, 4);
    assert_eq!((stats.handled, stats.gave_up), (0, 0));
    assert_eq!(position, 10, "nothing checkpointed past the failing records");
    let attempts = handler.calls().len();
    assert!((2..=3).contains(&attempts), "attempts before the drain only: {attempts}");
    assert!(sink.got().is_empty(), "nothing given up");
}

#[tokio::test(start_paused = true)]
async fn bisect_isolates_one_poison_record_and_handles_the_rest_once() {
    let handler = Scripted::new(|b| {
        if b.records.iter().any(|r| r.position() == 11) {
            Err("poison".into())
        } else {
            Ok(BatchResponse::default())
        }
    });
    let policy = FailurePolicy { bisect_on_error: true, max_retries: Some(3), ..policy() };
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy, None, &sink, records(0..16)).await;
    let got = sink.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, vec![11]);
    assert_eq!((got[0].1.reason, got[0].1.attempts), (Reason::RetriesExhausted, 4));
    assert_eq!(position, 16);
    assert_eq!(stats.map(|s| (s.handled, s.gave_up)), Ok((15, 1)));
    // The bisect tree: 16 → 8+8 → (8..16) 4+4 → (8..12) 2+2 → (10..12) 1+1.
    for healthy in (0..16).filter(|o| *o != 11) {
        let succeeded = handler.calls().iter().filter(|c| c.contains(&healthy) && !c.contains(&11)).count();
        assert_eq!(succeeded, 1, "record {healthy} handled once in a successful batch");
    }
    assert_eq!(handler.calls().iter().filter(|c| c.as_slice() == [11]).count(), 4, "1 try + 3 retries alone");
}

#[tokio::test(start_paused = true)]
async fn without_bisect_the_whole_batch_gives_up_after_max_retries() {
    let handler = Scripted::new(|_| Err("down".into()));
    let policy = FailurePolicy { max_retries: Some(2), ..policy() };
    let sink = Recording::default();
    let (_, position) = run(&handler, &policy, None, &sink, records(0..4)).await;
    assert_eq!(handler.calls().len(), 3);
    assert_eq!(sink.got().first().map(|g| g.0.clone()), Some(vec![0, 1, 2, 3]));
    assert_eq!(position, 4);
}

#[tokio::test(start_paused = true)]
async fn reported_item_failures_retry_from_the_first_failed_record_only() {
    let first = std::sync::atomic::AtomicBool::new(true);
    let handler = Scripted::new(move |_| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Ok(BatchResponse::failed(vec![7, 4]))
        } else {
            Ok(BatchResponse::default())
        }
    });
    let policy = FailurePolicy { report_item_failures: true, ..policy() };
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy, None, &sink, records(0..10)).await;
    assert_eq!(handler.calls(), vec![(0..10).collect::<Vec<_>>(), (4..10).collect()]);
    assert!((0..4).all(|o| handler.seen(o) == 1), "records before the first failure are not reprocessed");
    assert_eq!(position, 10);
    assert_eq!(stats.map(|s| s.handled), Ok(10));
}

/// Counts pause/resume calls.
#[derive(Default)]
struct Pauses(std::sync::atomic::AtomicI32);

impl Hooks for Pauses {
    fn failing(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn recovered(&self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn the_source_is_resumed_however_failing_records_end() {
    for (bisect, max_retries) in [(false, Some(0)), (true, Some(1)), (false, None)] {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let handler = Scripted::new(move |b| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if b.records.iter().any(|r| r.position() == 2) && n < 3 {
                Err("poison".into())
            } else {
                Ok(BatchResponse::default())
            }
        });
        let policy = FailurePolicy { bisect_on_error: bisect, max_retries, ..policy() };
        let pauses = Pauses::default();
        let sink = Recording::default();
        let (stats, position) = run_with_hooks(&handler, &policy, None, &sink, &pauses, records(0..4)).await;
        assert!(stats.is_ok());
        assert_eq!(
            pauses.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "paused and resumed: {bisect} {max_retries:?}"
        );
        assert_eq!(position, 4);
    }
}

#[tokio::test(start_paused = true)]
async fn after_exhausted_item_failures_only_the_named_records_give_up() {
    let handler = Scripted::new(|_| Ok(BatchResponse::failed(vec![5])));
    let policy = FailurePolicy { report_item_failures: true, max_retries: Some(1), ..policy() };
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy, None, &sink, records(0..8)).await;
    assert_eq!(sink.got().iter().map(|g| g.0.clone()).collect::<Vec<_>>(), vec![vec![5]]);
    assert_eq!(stats.map(|s| (s.handled, s.gave_up)), Ok((7, 1)));
    assert_eq!(position, 8);
}

/// A record named with its own error gives up with that error (grouped
/// by error: one sink call per distinct message); one named without an
/// error gets the generic message.
#[tokio::test(start_paused = true)]
async fn records_that_give_up_carry_the_error_the_handler_gave_them() {
    let handler = Scripted::new(|_| {
        let mut response = BatchResponse::default();
        response.fail(1, "not an image: unknown format");
        response.fail(3, "truncated: unexpected end of file");
        response.fail(5, "not an image: unknown format");
        response.failed.push(6);
        Ok(response)
    });
    let policy = FailurePolicy { report_item_failures: true, max_retries: Some(0), ..policy() };
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy, None, &sink, records(0..8)).await;
    let got: Vec<(Vec<i64>, String)> = sink.got().into_iter().map(|(p, why)| (p, why.error)).collect();
    assert_eq!(
        got,
        vec![
            (vec![1, 5], "not an image: unknown format".to_owned()),
            (vec![3], "truncated: unexpected end of file".to_owned()),
            (vec![6], "the handler reported failed records".to_owned()),
        ]
    );
    assert_eq!(stats.map(|s| (s.handled, s.gave_up)), Ok((4, 4)));
    assert_eq!(position, 8);
}

#[tokio::test(start_paused = true)]
async fn naming_a_record_outside_the_batch_fails_the_whole_batch() {
    let handler = Scripted::new(|_| Ok(BatchResponse::failed(vec![99])));
    let policy = FailurePolicy { report_item_failures: true, max_retries: Some(0), ..policy() };
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy, None, &sink, records(0..3)).await;
    assert_eq!(sink.got().first().map(|g| g.0.clone()), Some(vec![0, 1, 2]));
    assert_eq!((stats.map(|s| s.gave_up), position), (Ok(3), 3));
}

#[tokio::test(start_paused = true)]
async fn records_older_than_max_record_age_skip_the_handler() {
    let handler = Scripted::new(|_| Ok(BatchResponse::default()));
    let policy = FailurePolicy { max_record_age: Some(Duration::from_secs(60)), ..policy() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut input = records(0..4);
    input[1] = record(1, Some(now as i64 - 3_600_000));
    input[2] = record(2, Some(now as i64));
    let sink = Recording::default();
    let (_, position) = run(&handler, &policy, None, &sink, input).await;
    assert_eq!(sink.got().first().map(|g| (g.0.clone(), g.1.reason)), Some((vec![1], Reason::TooOld)));
    assert_eq!(handler.calls(), vec![vec![0, 2, 3]]);
    assert_eq!(position, 4);
}

#[tokio::test(start_paused = true)]
async fn a_batch_running_past_the_timeout_fails_and_gives_up_as_timed_out() {
    let mut handler = Scripted::new(|_| Ok(BatchResponse::default()));
    handler.delay = Duration::from_secs(10);
    let policy = FailurePolicy { handler_timeout: Duration::from_secs(1), max_retries: Some(1), ..policy() };
    let sink = Recording::default();
    let (_, position) = run(&handler, &policy, None, &sink, records(0..2)).await;
    assert_eq!(handler.calls().len(), 2);
    assert_eq!(sink.got().first().map(|g| g.1.reason), Some(Reason::HandlerTimeout));
    assert_eq!(position, 2);
}

#[tokio::test(start_paused = true)]
async fn filtered_records_are_finished_without_the_handler() {
    let handler = Scripted::new(|_| Ok(BatchResponse::default()));
    let filter =
        CompiledFilter::new(&Filter { field: "kind".into(), test: FilterTest::Equals("\"k0\"".into()) });
    let filter = filter.unwrap_or_else(|e| panic!("{e}"));
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy(), Some(&filter), &sink, records(0..6)).await;
    assert_eq!(handler.calls(), vec![vec![0, 2, 4]]);
    assert_eq!(stats.map(|s| s.filtered), Ok(3));
    assert_eq!(position, 6);
}

#[test]
fn filters_test_one_field_of_the_json_value() {
    let f = |field: &str, test: FilterTest| {
        CompiledFilter::new(&Filter { field: field.into(), test }).unwrap_or_else(|e| panic!("{e}"))
    };
    let v = br#"{"order":{"type":"refund","id":"A-17"},"n":3}"#;
    assert!(f("order.type", FilterTest::Equals("\"refund\"".into())).matches(v));
    assert!(!f("order.type", FilterTest::Equals("\"sale\"".into())).matches(v));
    assert!(f("n", FilterTest::Equals("3".into())).matches(v));
    assert!(f("order.id", FilterTest::Exists).matches(v));
    assert!(!f("order.missing", FilterTest::Exists).matches(v));
    assert!(f("order.id", FilterTest::Prefix("A-".into())).matches(v));
    assert!(!f("n", FilterTest::Prefix("3".into())).matches(v), "prefix only matches strings");
    assert!(!f("n", FilterTest::Exists).matches(b"not json"));
    assert!(
        CompiledFilter::new(&Filter { field: "a".into(), test: FilterTest::Equals("{".into()) }).is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn errors_and_panics_are_retried_until_success_when_retries_are_unlimited() {
    let calls = std::sync::atomic::AtomicU32::new(0);
    let handler = Scripted::new(move |_| match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => Err("boom".into()),
        1 => panic!("kaboom"),
        _ => Ok(BatchResponse::default()),
    });
    let sink = Recording::default();
    let (stats, position) = run(&handler, &policy(), None, &sink, records(0..2)).await;
    assert_eq!(stats.map(|s| s.attempts), Ok(3));
    assert!(sink.got().is_empty());
    assert_eq!(position, 2);
}

/// A killed lease finishes nothing: the attempt in flight is dropped, the
/// prefix stays where it was, and dropping the undecided records is no
/// error.
#[tokio::test(start_paused = true)]
async fn a_killed_lane_finishes_nothing_and_is_not_an_error() {
    let mut handler = Scripted::new(|_| Ok(BatchResponse::default()));
    handler.delay = Duration::from_secs(10);
    let (kill, drain) = (CancellationToken::new(), CancellationToken::new());
    let lease = LeaseId::shard("s", 0);
    let advanced = |p: i64| panic!("advanced to {p} after a kill");
    let tracker = Tracker::new(0, &kill, &advanced);
    let input = records(0..4);
    tracker.add(&input);
    let (policy, sink) = (policy(), Recording::default());
    let lane = Lane {
        handler: &handler,
        name: "test",
        policy: &policy,
        filter: None,
        sink: &sink,
        replies: None,
        window: None,
        hooks: &(),
        drain: &drain,
        lease: &lease,
        epoch: 1,
        tracker: &tracker,
    };
    let later = kill.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        later.cancel();
    });
    assert_eq!(lane.process(input, 0).await, Err(Stopped));
    assert_eq!(tracker.position(), 0);
    assert!(!tracker.broken().is_cancelled());
}

/// Records dropped undecided while the lease runs are a bug: the tracker
/// breaks (the driver stops the lease) and nothing is finished.
#[test]
fn records_dropped_undecided_break_the_lease() {
    let kill = CancellationToken::new();
    let advanced = |p: i64| panic!("advanced to {p} by a drop");
    let tracker = Tracker::new(0, &kill, &advanced);
    let input = records(0..2);
    tracker.add(&input);
    drop(tracker.claim(input));
    assert!(tracker.broken().is_cancelled());
    assert_eq!(tracker.position(), 0);
    drop(tracker.claim(Vec::new()));
}

/// Positions come in order from every source, but one added twice or out
/// of order is tracked once, in its place: the prefix never passes an
/// unfinished record.
#[test]
fn the_tracker_keeps_positions_added_twice_or_out_of_order_once_in_order() {
    let kill = CancellationToken::new();
    let advances = Mutex::new(Vec::new());
    let advanced = |p: i64| advances.lock().unwrap_or_else(|e| panic!("{e}")).push(p);
    let tracker = Tracker::new(0, &kill, &advanced);
    tracker.add(&records([0, 2, 4]));
    tracker.add(&records([2, 3]));
    tracker.finish(&records([0, 2]));
    assert_eq!(tracker.position(), 3, "3 came late but blocks the prefix");
    tracker.finish(&records([3]));
    assert_eq!(tracker.position(), 4);
    tracker.finish(&records([4]));
    assert_eq!(tracker.position(), 5);
    assert_eq!(*advances.lock().unwrap_or_else(|e| panic!("{e}")), vec![3, 4, 5]);
}

/// A lane over `input` with a tumbling window `slot`; the window's state
/// as every checkpoint would carry it is recorded with the position.
async fn run_windowed(
    handler: &Scripted,
    policy: &FailurePolicy,
    sink: &Recording,
    slot: &crate::window::Slot,
    input: Vec<Arc<Record>>,
) -> (Result<LaneStats, Stopped>, Vec<(i64, Option<String>)>) {
    let (kill, drain) = (CancellationToken::new(), CancellationToken::new());
    let lease = LeaseId::shard("s", 0);
    let checkpoints = Mutex::new(Vec::new());
    let state = || slot.snapshot().and_then(|w| w.state).map(|s| String::from_utf8_lossy(&s).into_owned());
    let advanced = |p: i64| checkpoints.lock().unwrap_or_else(|e| panic!("{e}")).push((p, state()));
    let tracker = Tracker::new(input.first().map_or(0, |r| r.position()), &kill, &advanced);
    tracker.add(&input);
    let lane = Lane {
        handler,
        name: "test",
        policy,
        filter: None,
        sink,
        replies: None,
        window: Some(slot),
        hooks: &(),
        drain: &drain,
        lease: &lease,
        epoch: 1,
        tracker: &tracker,
    };
    let stats = lane.process(input, 0).await;
    (stats, checkpoints.into_inner().unwrap_or_else(|e| panic!("{e}")))
}

/// Counts records into the window state (decimal text); with `poison`, names
/// that record as failed and counts only the ones before it (the rule for
/// item failures in a window).
fn counting(poison: Option<i64>) -> impl Fn(&Batch) -> Result<BatchResponse, HandlerError> + Send + Sync {
    move |batch: &Batch| {
        let window = batch.window.as_ref().ok_or("no window")?;
        let before: usize = window
            .state
            .as_deref()
            .map_or(Ok(0), |s| String::from_utf8_lossy(s).parse())
            .map_err(|e| HandlerError::new(format!("state: {e}")))?;
        let first_bad = batch.records.iter().position(|r| Some(r.position()) == poison);
        let counted = first_bad.unwrap_or(batch.records.len());
        let mut response =
            BatchResponse { state: Some((before + counted).to_string().into_bytes()), ..Default::default() };
        if let Some(i) = first_bad {
            response.failed = vec![batch.records[i].position()];
        }
        Ok(response)
    }
}

#[tokio::test]
async fn a_window_state_follows_successes_and_each_checkpoint_carries_it() {
    let slot = crate::window::Slot::default();
    slot.enter((0, 60_000), None);
    let handler = Scripted::new(counting(None));
    let sink = Recording::default();
    let (stats, checkpoints) = run_windowed(&handler, &policy(), &sink, &slot, records(0..10)).await;
    assert!(stats.is_ok());
    assert_eq!(checkpoints.last(), Some(&(10, Some("10".into()))), "offset 10 goes with state 10");
    let (_, checkpoints) = run_windowed(&handler, &policy(), &sink, &slot, records(10..15)).await;
    assert_eq!(checkpoints.last(), Some(&(15, Some("15".into()))), "the next batch got the state and added");
}

#[tokio::test]
async fn a_retried_batch_gets_the_state_from_before_its_failed_attempt() {
    let slot = crate::window::Slot::default();
    slot.enter((0, 60_000), None);
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let count = counting(None);
    let handler = Scripted::new(move |b| {
        if !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err("flaky".into());
        }
        count(b)
    });
    let sink = Recording::default();
    let (_, checkpoints) = run_windowed(&handler, &policy(), &sink, &slot, records(0..8)).await;
    assert_eq!(handler.calls().len(), 2);
    assert_eq!(checkpoints.last(), Some(&(8, Some("8".into()))), "counted once, not twice");
}

#[tokio::test]
async fn bisected_halves_thread_the_state_and_given_up_records_are_not_counted() {
    let slot = crate::window::Slot::default();
    slot.enter((0, 60_000), None);
    let count = counting(None);
    let handler = Scripted::new(move |b| {
        if b.records.iter().any(|r| r.position() == 7) { Err("poison".into()) } else { count(b) }
    });
    let policy = FailurePolicy { bisect_on_error: true, max_retries: Some(0), ..policy() };
    let sink = Recording::default();
    let (_, checkpoints) = run_windowed(&handler, &policy, &sink, &slot, records(0..10)).await;
    assert_eq!(sink.got().iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), vec![vec![7]]);
    assert_eq!(checkpoints.last(), Some(&(10, Some("9".into()))), "nine counted, the poison not");
}

#[tokio::test]
async fn with_item_failures_the_records_after_a_given_up_one_are_offered_again_and_counted() {
    let slot = crate::window::Slot::default();
    slot.enter((0, 60_000), None);
    let handler = Scripted::new(counting(Some(7)));
    let policy = FailurePolicy { report_item_failures: true, max_retries: Some(1), ..policy() };
    let sink = Recording::default();
    let (_, checkpoints) = run_windowed(&handler, &policy, &sink, &slot, records(0..10)).await;
    assert_eq!(sink.got().iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), vec![vec![7]]);
    // 0..7 counted in the first answer; 8 and 9 after 7 gave up.
    assert_eq!(checkpoints.last(), Some(&(10, Some("9".into()))));
    assert_eq!(handler.calls().last(), Some(&vec![8, 9]), "offered again, not finished uncounted");
}

#[tokio::test]
async fn a_state_over_one_mebibyte_fails_its_batch_naming_the_limit() {
    let slot = crate::window::Slot::default();
    slot.enter((0, 60_000), None);
    let handler = Scripted::new(|_| {
        Ok(BatchResponse {
            state: Some(vec![b'x'; crate::window::MAX_STATE_BYTES + 1]),
            ..Default::default()
        })
    });
    let policy = FailurePolicy { max_retries: Some(0), ..policy() };
    let sink = Recording::default();
    let (_, checkpoints) = run_windowed(&handler, &policy, &sink, &slot, records(0..3)).await;
    let got = sink.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1.error.contains("1048577") && got[0].1.error.contains("1 MiB"), "{}", got[0].1.error);
    assert_eq!(checkpoints.last(), Some(&(3, None)), "the window kept no oversized state");
}

#[tokio::test]
async fn an_empty_final_invocation_gets_the_state_retries_and_closes_the_window() {
    let open = shardline_proto::WindowState {
        state: Some(b"5".to_vec()),
        ..shardline_proto::WindowState::open(0, 60_000)
    };
    let slot = crate::window::Slot::resume(Some(open));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let saw = seen.clone();
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let handler = Scripted::new(move |b| {
        let w = b.window.clone().ok_or("no window")?;
        saw.lock().unwrap_or_else(|e| panic!("{e}")).push((b.records.len(), w.is_final, w.state.clone()));
        if tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Err("not yet".into())
        } else {
            Ok(BatchResponse::default())
        }
    });
    let (kill, drain) = (CancellationToken::new(), CancellationToken::new());
    let lease = LeaseId::shard("s", 0);
    let advanced = |_: i64| {};
    let tracker = Tracker::new(0, &kill, &advanced);
    let sink = Recording::default();
    let policy = FailurePolicy { max_retries: Some(0), ..policy() };
    let lane = Lane {
        handler: &handler,
        name: "test",
        policy: &policy,
        filter: None,
        sink: &sink,
        replies: None,
        window: Some(&slot),
        hooks: &(),
        drain: &drain,
        lease: &lease,
        epoch: 1,
        tracker: &tracker,
    };
    assert_eq!(lane.close_window(0).await.ok(), Some(true));
    assert_eq!(handler.calls(), vec![Vec::<i64>::new(), vec![]], "retried past max_retries: the shard waits");
    let seen = seen.lock().unwrap_or_else(|e| panic!("{e}")).clone();
    assert!(seen.iter().all(|s| *s == (0, true, Some(b"5".to_vec()))), "final, with the state: {seen:?}");
    let closed = slot.snapshot().unwrap_or_else(|| panic!("a window"));
    assert!(closed.closed && closed.state.is_none(), "{closed:?}");
}
