//! Tollgate: a cost-aware, OpenAI-compatible gateway for LLM serving.
//!
//! The request's way from `main.rs` down: [`cli`] → [`server`] → [`app`] (router and state) →
//! [`http`] handlers → [`auth`] → [`request`] (parse) → [`dispatch`] ([`policy`] decides,
//! [`upstream`] sends) → [`metering`] (usage, however the body ends) → [`metrics`].

pub mod apis;
pub mod app;
pub mod auth;
pub mod background;
pub mod body;
pub mod cache;
pub mod cascade;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cost;
pub mod dispatch;
pub mod error;
mod http;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod ratelimit;
pub mod reload;
pub mod report;
pub mod request;
pub mod secret;
pub mod server;
pub mod simulate;
pub mod snapshot;
pub mod telemetry;
pub mod tenancy;
pub mod upstream;
mod wake;
