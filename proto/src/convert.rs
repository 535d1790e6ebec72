//! Conversions between wire messages and domain types, done at the edge so
//! nothing past the gRPC layer handles raw wire structs for identities.

use std::time::Duration;

use crate::domain::{
    FailurePolicy, Filter, FilterTest, LeaseId, LeaseKind, Mapping, Start, StartingPosition, WindowState,
};
use crate::v1;

/// A wire message that does not describe a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("lease kind {0} is not a shard (1) or a queue slot (2)")]
    BadKind(i32),
    #[error("starting position {0} is not latest (1), trim_horizon (2) or at_timestamp (3)")]
    BadStartingPosition(i32),
    #[error("a window must end after it starts (start {start_ms} ms, end {end_ms} ms)")]
    BadWindow { start_ms: i64, end_ms: i64 },
}

impl From<&WindowState> for v1::WindowState {
    fn from(w: &WindowState) -> Self {
        v1::WindowState { start_ms: w.start_ms, end_ms: w.end_ms, state: w.state.clone(), closed: w.closed }
    }
}

impl TryFrom<&v1::WindowState> for WindowState {
    type Error = ConvertError;

    fn try_from(w: &v1::WindowState) -> Result<Self, Self::Error> {
        if w.end_ms <= w.start_ms {
            return Err(ConvertError::BadWindow { start_ms: w.start_ms, end_ms: w.end_ms });
        }
        Ok(WindowState { start_ms: w.start_ms, end_ms: w.end_ms, state: w.state.clone(), closed: w.closed })
    }
}

/// An optional wire window as a domain one; a malformed one is an error.
pub fn window(w: Option<&v1::WindowState>) -> Result<Option<WindowState>, ConvertError> {
    w.map(WindowState::try_from).transpose()
}

impl From<&LeaseId> for v1::LeaseId {
    fn from(id: &LeaseId) -> Self {
        let kind = match id.kind {
            LeaseKind::Shard => v1::LeaseKind::Shard,
            LeaseKind::QueueSlot => v1::LeaseKind::QueueSlot,
        };
        v1::LeaseId { kind: kind as i32, name: id.name.clone(), index: id.index }
    }
}

impl TryFrom<&v1::LeaseId> for LeaseId {
    type Error = ConvertError;

    fn try_from(id: &v1::LeaseId) -> Result<Self, Self::Error> {
        let kind = match v1::LeaseKind::try_from(id.kind) {
            Ok(v1::LeaseKind::Shard) => LeaseKind::Shard,
            Ok(v1::LeaseKind::QueueSlot) => LeaseKind::QueueSlot,
            _ => return Err(ConvertError::BadKind(id.kind)),
        };
        if id.name.is_empty() {
            return Err(ConvertError::Missing("lease.name"));
        }
        Ok(LeaseId { kind, name: id.name.clone(), index: id.index })
    }
}

impl TryFrom<Option<&v1::LeaseId>> for LeaseId {
    type Error = ConvertError;

    fn try_from(id: Option<&v1::LeaseId>) -> Result<Self, Self::Error> {
        id.ok_or(ConvertError::Missing("lease")).and_then(LeaseId::try_from)
    }
}

impl From<&Mapping> for v1::Mapping {
    fn from(m: &Mapping) -> Self {
        let starting_position = match m.starting_position {
            StartingPosition::Latest => v1::StartingPosition::Latest,
            StartingPosition::TrimHorizon => v1::StartingPosition::TrimHorizon,
            StartingPosition::AtTimestamp => v1::StartingPosition::AtTimestamp,
        };
        v1::Mapping {
            handler: m.handler.clone(),
            batch_size: m.batch_size,
            max_batch_bytes: m.max_batch_bytes,
            batch_window_ms: m.batch_window.as_millis() as u64,
            starting_position: starting_position as i32,
            starting_timestamp_ms: m.starting_timestamp_ms,
            max_retries: m.policy.max_retries.map_or(-1, |r| i32::try_from(r).unwrap_or(i32::MAX)),
            retry_initial_ms: m.policy.retry_initial.as_millis() as u64,
            retry_max_ms: m.policy.retry_max.as_millis() as u64,
            retry_multiplier: m.policy.retry_multiplier,
            retry_jitter: m.policy.retry_jitter,
            bisect_on_error: m.policy.bisect_on_error,
            report_item_failures: m.policy.report_item_failures,
            max_record_age_ms: m.policy.max_record_age.map_or(-1, |a| a.as_millis() as i64),
            on_failure: m.policy.on_failure.clone().unwrap_or_default(),
            parallelization_factor: m.parallelization_factor,
            handler_timeout_ms: m.policy.handler_timeout.as_millis() as u64,
            tumbling_window_ms: m.tumbling_window.as_millis() as u64,
            window_grace_ms: m.window_grace.as_millis() as u64,
            filter: m.filter.as_ref().map(|f| v1::Filter {
                field: f.field.clone(),
                test: Some(match &f.test {
                    FilterTest::Equals(json) => v1::filter::Test::EqualsJson(json.clone()),
                    FilterTest::Exists => v1::filter::Test::Exists(true),
                    FilterTest::Prefix(p) => v1::filter::Test::Prefix(p.clone()),
                }),
            }),
        }
    }
}

impl TryFrom<&v1::Mapping> for Mapping {
    type Error = ConvertError;

    fn try_from(m: &v1::Mapping) -> Result<Self, Self::Error> {
        let starting_position = match v1::StartingPosition::try_from(m.starting_position) {
            Ok(v1::StartingPosition::Latest) => StartingPosition::Latest,
            Ok(v1::StartingPosition::TrimHorizon) => StartingPosition::TrimHorizon,
            Ok(v1::StartingPosition::AtTimestamp) => StartingPosition::AtTimestamp,
            _ => return Err(ConvertError::BadStartingPosition(m.starting_position)),
        };
        if m.handler.is_empty() {
            return Err(ConvertError::Missing("mapping.handler"));
        }
        if m.batch_size == 0 {
            return Err(ConvertError::Missing("mapping.batch_size"));
        }
        Ok(Mapping {
            handler: m.handler.clone(),
            batch_size: m.batch_size,
            max_batch_bytes: m.max_batch_bytes.max(1),
            batch_window: std::time::Duration::from_millis(m.batch_window_ms),
            starting_position,
            starting_timestamp_ms: m.starting_timestamp_ms,
            policy: FailurePolicy {
                max_retries: u32::try_from(m.max_retries).ok(),
                retry_initial: Duration::from_millis(m.retry_initial_ms.max(1)),
                retry_max: Duration::from_millis(m.retry_max_ms.max(m.retry_initial_ms).max(1)),
                retry_multiplier: if m.retry_multiplier >= 1.0 { m.retry_multiplier } else { 2.0 },
                retry_jitter: m.retry_jitter,
                bisect_on_error: m.bisect_on_error,
                report_item_failures: m.report_item_failures,
                max_record_age: u64::try_from(m.max_record_age_ms).ok().map(Duration::from_millis),
                on_failure: Some(m.on_failure.clone()).filter(|t| !t.is_empty()),
                handler_timeout: Duration::from_millis(m.handler_timeout_ms.max(1)),
            },
            parallelization_factor: m.parallelization_factor.clamp(1, 10),
            tumbling_window: Duration::from_millis(m.tumbling_window_ms),
            window_grace: Duration::from_millis(m.window_grace_ms),
            filter: match &m.filter {
                None => None,
                Some(f) => Some(Filter {
                    field: f.field.clone(),
                    test: match &f.test {
                        Some(v1::filter::Test::EqualsJson(j)) => FilterTest::Equals(j.clone()),
                        Some(v1::filter::Test::Exists(_)) => FilterTest::Exists,
                        Some(v1::filter::Test::Prefix(p)) => FilterTest::Prefix(p.clone()),
                        None => return Err(ConvertError::Missing("mapping.filter.test")),
                    },
                }),
            },
        })
    }
}

impl From<Start> for v1::StartPosition {
    fn from(start: Start) -> Self {
        use v1::start_position::Position;
        let position = match start {
            Start::Checkpoint(offset) => Position::Offset(offset),
            Start::MappingDefault => Position::MappingDefault(true),
            Start::Earliest => Position::Earliest(true),
        };
        v1::StartPosition { position: Some(position) }
    }
}

impl v1::StartPosition {
    /// Where to start; an unset position means the mapping's default.
    pub fn start(&self) -> Start {
        use v1::start_position::Position;
        match self.position {
            Some(Position::Offset(offset)) => Start::Checkpoint(offset),
            Some(Position::Earliest(true)) => Start::Earliest,
            _ => Start::MappingDefault,
        }
    }

    /// The checkpoint to start from; `None` when the lease has none.
    pub fn checkpoint(&self) -> Option<i64> {
        self.start().checkpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_id_round_trips_and_rejects_garbage() {
        let id = LeaseId::slot("emails", 2);
        let wire = v1::LeaseId::from(&id);
        assert_eq!(LeaseId::try_from(&wire), Ok(id));
        let bad = v1::LeaseId { kind: 9, name: "x".into(), index: 0 };
        assert_eq!(LeaseId::try_from(&bad), Err(ConvertError::BadKind(9)));
        assert_eq!(LeaseId::try_from(None), Err(ConvertError::Missing("lease")));
    }

    #[test]
    fn mapping_round_trips() {
        let mut m = Mapping::new("log");
        m.starting_position = StartingPosition::AtTimestamp;
        m.starting_timestamp_ms = 1_700_000_000_000;
        m.batch_window = std::time::Duration::from_millis(250);
        m.policy.max_retries = Some(3);
        m.policy.bisect_on_error = true;
        m.policy.max_record_age = Some(Duration::from_secs(60));
        m.policy.on_failure = Some("dlq".into());
        m.parallelization_factor = 4;
        m.filter = Some(Filter { field: "a.b".into(), test: FilterTest::Prefix("x".into()) });
        m.tumbling_window = Duration::from_secs(60);
        m.window_grace = Duration::from_secs(2);
        assert_eq!(Mapping::try_from(&v1::Mapping::from(&m)), Ok(m));
        assert!(Mapping::try_from(&v1::Mapping::default()).is_err());
    }

    #[test]
    fn start_position_round_trips() {
        for start in [Start::Checkpoint(5), Start::MappingDefault, Start::Earliest] {
            assert_eq!(v1::StartPosition::from(start).start(), start);
        }
        assert_eq!(v1::StartPosition::default().start(), Start::MappingDefault);
    }

    #[test]
    fn windows_round_trip_and_one_that_ends_before_it_starts_is_refused() {
        let w = WindowState { state: Some(b"{}".to_vec()), ..WindowState::open(0, 60_000) };
        assert_eq!(window(Some(&v1::WindowState::from(&w))), Ok(Some(w)));
        assert_eq!(window(None), Ok(None));
        let bad = v1::WindowState { start_ms: 5, end_ms: 5, ..Default::default() };
        assert_eq!(window(Some(&bad)), Err(ConvertError::BadWindow { start_ms: 5, end_ms: 5 }));
    }
}
