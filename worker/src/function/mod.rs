//! The `function` handler kind (issue 16): users' existing AWS Lambda
//! functions, in any language, run unchanged through the Lambda Runtime
//! API. Built so far: the event shapes Lambda gives such functions and the
//! partial-failure reply they return ([`event`]). The process pool and the
//! Runtime API server come next.

pub mod event;
