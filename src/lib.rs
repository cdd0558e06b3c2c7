//! wazuh-agent: a small, synchronous, thread-based Wazuh endpoint agent.
//!
//! The binary (`src/main.rs`) is a thin shell over this library so the integration
//! tests can drive the same modules the agent runs. See ARCHITECTURE.md for the map.

// Every libc call goes through `sys`, the one module allowed `unsafe`.
#![deny(unsafe_code)]

pub mod backoff;
pub mod batcher;
pub mod cli;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod event;
pub mod executor;
#[cfg(feature = "fim")]
pub mod fim;
pub mod fsutil;
pub mod groups;
pub mod host;
pub mod http;
pub mod ingest;
#[cfg(feature = "inventory")]
pub mod inventory;
pub mod live;
#[cfg(feature = "logcollector")]
pub mod logcollector;
pub mod logging;
pub mod memory;
pub mod module;
pub mod pidfile;
pub mod poll;
pub mod privileges;
pub mod queue;
pub mod register;
pub mod session;
pub mod status;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
pub mod token;
pub mod uploader;

/// The agent's version, as sent to the server and printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
