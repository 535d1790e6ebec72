//! shardline's wire contract: the gRPC services and messages of package
//! `shardline.v1` (generated from `proto/shardline.proto`), plus the few
//! domain types that cross the wire and their conversions.
//!
//! Invariant: no runtime logic lives here, only types, conversions and
//! pure rules both sides must agree on (which coordinator to call next:
//! [`endpoints`]; how a client dials and signs its calls: [`credentials`]), so the coordinator and the worker can change their
//! internals freely.

mod convert;
pub mod credentials;
mod domain;
pub mod endpoints;
pub mod timing;
pub mod topology;

pub use convert::{ConvertError, window};
pub use credentials::{Credentials, TlsPem};
pub use domain::{
    FailurePolicy, Filter, FilterTest, LeaseId, LeaseKind, Mapping, Start, StartingPosition, WindowState,
};
pub use endpoints::{Endpoints, EndpointsError, LEADER_HEADER};

/// The generated code of package `shardline.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("shardline.v1");
}
