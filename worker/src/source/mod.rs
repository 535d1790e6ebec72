//! Where records come from: a [`Source`] opens a lease as a
//! [`RecordReader`] plus the [`Finalizer`] that makes finished records
//! final at the broker (a checkpoint, an ack); the driver does the rest.
//! Sources use the sinks and clients below them, never the driver or the
//! runtime above.

pub mod amqp;
pub mod kafka;

use std::future::Future;

use shardline_proto::{FailurePolicy, LeaseId, Mapping, Start};
use tokio_util::sync::CancellationToken;

use crate::handler::Record;
use crate::policy::Hooks;
use crate::sink::FailureSink;

/// The lease a task runs: what it is, and the signals that end it.
pub struct Lease {
    pub id: LeaseId,
    pub epoch: u64,
    pub mapping: Mapping,
    /// Where to start: the checkpoint, or the mapping's starting position,
    /// or (a partition that appeared after the mapping) the earliest offset.
    pub start: Start,
    /// Release or shutdown (and `kill`, its parent): finish the batch.
    pub drain: CancellationToken,
    /// Lost or revoked: stop at once, finish nothing more.
    pub kill: CancellationToken,
}

/// How a lease task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained, or failed (given back like a dead task's): what the release
    /// reports (the final checkpoint; `None`: the last acknowledged stands).
    Released(Option<i64>),
    /// Lost or revoked: nothing more may be checkpointed.
    Killed,
}

/// How one reading session of a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Drained,
    /// The source broke (a channel closed, an ack failed): open it again.
    Broken,
    Killed,
    Failed,
}

/// A lease's stream of records, in order.
pub trait RecordReader: Send {
    /// The next record, waiting as long as it takes; `None`: the reader
    /// ended (its channel broke) and the source is opened again.
    fn next(&mut self) -> impl Future<Output = Option<Record>> + Send;
    /// A record if one is already buffered; never waits.
    fn try_next(&mut self) -> Option<Record>;
    /// Records behind the end of the source (-1: not known), given where
    /// the batches cut so far end (`cut_to`) and the `finished` prefix.
    fn lag(&self, cut_to: i64, finished: i64) -> i64;
}

/// Makes finished records final at the source (a checkpoint, an ack).
pub trait Finalizer: Send + Sync {
    /// Every record before `next` is finished. Called on every advance,
    /// from inside the policy: it must not wait (Kafka submits the
    /// checkpoint here).
    fn advanced(&self, _next: i64) {}

    /// A batch ended with every record before `next` finished (a queue
    /// acks here: one multiple-ack per batch). `false`: the source broke.
    fn settle(&self, _next: i64) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// The session ended (`how`) with every record before `next`
    /// finished; what a release reports.
    fn close(self, how: End, next: i64) -> impl Future<Output = Option<i64>> + Send;
}

pub struct Opened<R, F> {
    pub reader: R,
    pub finalizer: F,
    /// The position of the first record to come.
    pub position: i64,
}

/// A kind of lease's records: how to open it, and how its failures go.
pub trait Source: Hooks + Send + Sync {
    type Reader: RecordReader;
    type Finalizer: Finalizer;

    /// Opens `lease`, retrying as long as it takes; `Err`: the lease ended
    /// first, this way.
    fn open(
        &self,
        lease: &Lease,
    ) -> impl Future<Output = Result<Opened<Self::Reader, Self::Finalizer>, Exit>> + Send;

    fn lanes(&self, _mapping: &Mapping) -> usize {
        1
    }

    fn policy<'a>(&'a self, mapping: &'a Mapping) -> &'a FailurePolicy {
        &mapping.policy
    }

    fn sink(&self) -> &dyn FailureSink;

    /// Where replies to synchronous invocations are published; `None`: the
    /// source's records never carry `reply_to` (Kafka).
    fn replies(&self) -> Option<&crate::amqp::Publisher> {
        None
    }
}
