//! Following one request: its id (echoed, sent upstream, recorded) and its access log line.

pub mod access_log;
pub mod request_id;

pub use access_log::{AccessLog, Entry};
pub use request_id::{RequestId, HEADER_REQUEST_ID};
