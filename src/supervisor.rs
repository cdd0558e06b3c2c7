//! Run mode: the one place where every thread of the agent is started and joined, so a
//! reader sees the whole process here.
//!
//! Threads today:
//!
//! | thread    | owns                                   | loop                                     |
//! |-----------|----------------------------------------|------------------------------------------|
//! | `main`    | this supervisor                        | select! over signals and worker exits    |
//! | `signals` | the signal-hook iterator               | forwards SIGTERM/SIGINT/SIGHUP           |
//! | `token`   | the auth HTTP agent, renewal schedule  | [`token::run`]: renew on time / on demand |
//!
//! Shutdown is a broadcast: dropping `shutdown_tx` disconnects every `shutdown` receiver,
//! which each worker's `select!` sees at once. A worker that returns (or panics, in a
//! build that unwinds) before shutdown is a fatal error: the supervisor stops the others
//! and returns an error so the process exits non-zero and the init system restarts it.
//! (Release builds abort on panic, which also ends the process non-zero.)

use std::fmt;
use std::io;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::config::{Config, Verify};
use crate::credentials::{Credentials, CredentialsError};
use crate::http::{self, HttpError};
use crate::token::{self, Authenticator, TokenCell};

/// How long threads get to finish after a shutdown request before in-flight HTTP
/// requests are cut off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Worker stacks: the agent's threads do no deep recursion (serde_json caps nesting at 128).
const STACK_SIZE: usize = 512 * 1024;

/// Why run mode stopped with an error.
#[derive(Debug)]
pub enum RunError {
    /// Credentials are missing or unreadable.
    Credentials(CredentialsError),
    /// The HTTPS client could not be set up.
    Http(HttpError),
    /// Signal handlers could not be installed.
    Signals(io::Error),
    /// A thread could not be started.
    Spawn { thread: &'static str, source: io::Error },
    /// A worker thread ended while the agent was running.
    WorkerDied { thread: &'static str, panicked: bool },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Credentials(e) => e.fmt(f),
            RunError::Http(e) => e.fmt(f),
            RunError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            RunError::Spawn { thread, source } => write!(f, "cannot start the {thread} thread: {source}"),
            RunError::WorkerDied { thread, panicked: true } => write!(f, "the {thread} thread panicked"),
            RunError::WorkerDied {
                thread,
                panicked: false,
            } => write!(f, "the {thread} thread stopped unexpectedly"),
        }
    }
}

impl std::error::Error for RunError {}

/// Sent by every worker as it ends, whatever the reason.
struct Exit {
    thread: &'static str,
    panicked: bool,
}

struct ExitGuard {
    thread: &'static str,
    tx: Sender<Exit>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        // The supervisor outlives its workers (it joins them), so this only fails if the
        // supervisor itself is gone, and then nobody needs the message.
        let _ = self.tx.send(Exit {
            thread: self.thread,
            panicked: thread::panicking(),
        });
    }
}

struct Workers {
    exit_tx: Sender<Exit>,
    exit_rx: Receiver<Exit>,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Workers {
    fn new() -> Workers {
        // Unbounded is safe here: at most one message per thread, ever.
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        Workers {
            exit_tx,
            exit_rx,
            running: Vec::new(),
        }
    }

    fn spawn(&mut self, thread: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
        let guard = ExitGuard {
            thread,
            tx: self.exit_tx.clone(),
        };
        let handle = thread::Builder::new()
            .name(thread.to_string())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let _guard = guard;
                f()
            })
            .map_err(|source| RunError::Spawn { thread, source })?;
        self.running.push((thread, handle));
        Ok(())
    }

    /// Waits up to `grace` for every worker to report its exit, then joins those that
    /// did. Returns the names of the ones still running.
    fn join_all(mut self, grace: Duration, already_exited: &[&'static str]) -> Vec<&'static str> {
        let deadline = Instant::now() + grace;
        let mut done: Vec<&'static str> = already_exited.to_vec();
        while done.len() < self.running.len() {
            match self.exit_rx.recv_deadline(deadline) {
                Ok(exit) => done.push(exit.thread),
                Err(_) => break,
            }
        }
        let mut stuck = Vec::new();
        for (name, handle) in self.running.drain(..) {
            if done.contains(&name) {
                let _ = handle.join();
            } else {
                stuck.push(name);
            }
        }
        stuck
    }
}

/// Runs the agent until SIGTERM/SIGINT. Returns `Ok` after a clean shutdown.
pub fn run(config: &Config) -> Result<(), RunError> {
    let credentials = Credentials::load(&config.agent.data_dir).map_err(RunError::Credentials)?;
    if config.server.verify == Verify::None {
        log::warn!(
            "server.verify = \"none\": the server's certificate is NOT checked; anyone on the network path can \
             impersonate the server and read the agent's key. Use this only for testing."
        );
    }
    let auth_agent = http::build_agent(&config.server, config.server.request_timeout).map_err(RunError::Http)?;
    log::info!(
        "wazuh-agent {} starting as {} ({}), server {}",
        crate::VERSION,
        credentials.name,
        credentials.uuid,
        config.server.urls.join(", ")
    );

    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(RunError::Signals)?;
    let signals_handle = signals.handle();
    // Capacity 4: signals are rare; if the supervisor lags, a repeat of the same signal adds nothing.
    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(4);
    let (shutdown_tx, shutdown_rx) = crossbeam_channel::bounded::<()>(0);
    let mut workers = Workers::new();

    workers.spawn("signals", move || {
        // Ends when the supervisor closes the handle at shutdown.
        for sig in signals.forever() {
            // Full: the supervisor already has signals to act on; a repeat adds nothing.
            let _ = sig_tx.try_send(sig);
        }
    })?;

    let (cell, wake_rx) = TokenCell::new();
    let token_cell = cell.clone();
    let token_shutdown = shutdown_rx.clone();
    let retry = config.retry.clone();
    let authenticator = Authenticator::new(auth_agent.clone(), &config.server.urls, credentials, config.retry.max);
    workers.spawn("token", move || {
        token::run(token_cell, wake_rx, token_shutdown, authenticator, &retry)
    })?;

    let result = loop {
        select! {
            recv(sig_rx) -> sig => match sig {
                Ok(SIGHUP) => log::info!("SIGHUP received; configuration reload is not available in this version, restart the agent to apply changes"),
                Ok(sig) => {
                    log::info!("{} received, shutting down", if sig == SIGINT { "SIGINT" } else { "SIGTERM" });
                    break Ok(());
                }
                Err(_) => break Err(RunError::WorkerDied { thread: "signals", panicked: false }),
            },
            recv(workers.exit_rx) -> exit => {
                let (thread, panicked) = exit.map(|e| (e.thread, e.panicked)).unwrap_or(("unknown", false));
                log::error!("the {thread} thread ended while the agent was running; stopping so the init system can restart it");
                break Err(RunError::WorkerDied { thread, panicked });
            }
        }
    };

    // Broadcast shutdown: every `recv(shutdown)` now returns Disconnected.
    drop(shutdown_tx);
    cell.close();
    signals_handle.close();
    let exited: Vec<&'static str> = match &result {
        Err(RunError::WorkerDied { thread, .. }) => vec![*thread],
        _ => Vec::new(),
    };
    let stuck = workers.join_all(SHUTDOWN_GRACE, &exited);
    if !stuck.is_empty() {
        // Interrupt blocked requests (they hold sockets, not data) and give them a moment.
        auth_agent.shutdown();
        log::warn!(
            "threads still busy after {}s: {}; their requests were cut off",
            SHUTDOWN_GRACE.as_secs(),
            stuck.join(", ")
        );
    }
    if result.is_ok() {
        log::info!("stopped");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_exit_is_reported_including_panics() {
        let mut w = Workers::new();
        w.spawn("returns", || {}).unwrap();
        w.spawn("panics", || panic!("boom")).unwrap();
        let mut exits: Vec<(&str, bool)> = (0..2)
            .map(|_| {
                let e = w.exit_rx.recv_timeout(Duration::from_secs(10)).unwrap();
                (e.thread, e.panicked)
            })
            .collect();
        exits.sort();
        assert_eq!(exits, vec![("panics", true), ("returns", false)]);
        assert!(w.join_all(Duration::from_secs(1), &["panics", "returns"]).is_empty());
    }

    #[test]
    fn join_all_names_threads_still_running_after_the_grace() {
        let mut w = Workers::new();
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        w.spawn("stuck", move || {
            let _ = rx.recv();
        })
        .unwrap();
        assert_eq!(w.join_all(Duration::from_millis(100), &[]), vec!["stuck"]);
        drop(tx);
    }
}
