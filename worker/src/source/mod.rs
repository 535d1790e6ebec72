//! Where records come from. Each source hands out one reader per lease;
//! the batcher cuts batches from any reader that implements [`RecordReader`].

pub mod kafka;

use crate::handler::Record;

/// A lease's stream of records, in order.
pub trait RecordReader: Send + Sync {
    /// The next record, waiting as long as it takes.
    fn next(&self) -> impl std::future::Future<Output = Record> + Send;
    /// A record if one is already buffered; never waits.
    fn try_next(&self) -> Option<Record>;
}

impl RecordReader for kafka::PartitionReader {
    fn next(&self) -> impl std::future::Future<Output = Record> + Send {
        kafka::PartitionReader::next(self)
    }

    fn try_next(&self) -> Option<Record> {
        kafka::PartitionReader::try_next(self)
    }
}
