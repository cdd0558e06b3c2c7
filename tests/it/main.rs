//! Integration tests: the real binary and the real modules against the real mock over TLS.
//! One binary, one module per area; `support` holds the shared fixtures.

mod adversarial;
mod cli;
mod commands;
mod fim;
mod groups;
mod inventory;
mod local_account;
mod logcollector;
mod ops;
mod pipeline;
mod red_delivery;
mod red_rotation;
mod register;
mod robustness;
mod run;
mod stateful;
mod support;
mod token;
