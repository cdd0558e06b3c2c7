//! Run mode: the one place where every thread is started and joined. [`run`] calls one function per stage, in
//! order: `load`, `open`, `drop_privileges`, `start_pipeline`, `start_modules` (the enabled [`module::MODULES`]),
//! `start_commands`, `supervise`, `shut_down`. Threads, staged shutdown, why a worker's end is fatal: ARCHITECTURE.md.

use std::collections::HashSet;
use std::io;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, select};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::batcher::{self, Policy};
use crate::commands::Command;
use crate::config::{Config, Verify};
use crate::credentials::{Credentials, CredentialsError};
use crate::event::{self, Event};
use crate::executor::{self, Ctx, Executor};
use crate::groups;
use crate::host::HostInfo;
use crate::http::{self, HttpError};
use crate::ingest::{self, Ingest, IngestError};
use crate::live::Live;
use crate::memory;
use crate::module::{self, DurableSink, EventSink};
use crate::pidfile::{PidError, PidFile};
use crate::poll;
use crate::queue::{self, Ack, Append, BatchLimits, QueueBatch, QueueError, QueueStore};
use crate::session::{Role, Session, Stop};
use crate::status::{self, Stats};
use crate::token::{self, Authenticator, TokenCell};
use crate::uploader::{self, Uploader};

/// How long the pipeline gets to deliver what it holds after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long ingest connections get to answer their producers at shutdown.
const INGEST_STOP: Duration = Duration::from_secs(2);
/// Worker stacks: the agent's threads do no deep recursion (serde_json caps nesting at 128).
const STACK_SIZE: usize = 512 * 1024;

/// Why run mode stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Credentials(#[source] CredentialsError),
    #[error("{0}")]
    Http(#[source] HttpError),
    #[error("cannot open the durable queue: {0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Ingest(#[source] IngestError),
    #[error("{0}")]
    Pid(#[source] PidError),
    #[error("{0}")]
    Privileges(#[source] crate::privileges::PrivilegesError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("cannot start the {thread} thread: {source}")]
    Spawn { thread: &'static str, source: io::Error },
    #[error("the {thread} thread {}", if *.panicked { "panicked" } else { "stopped unexpectedly" })]
    WorkerDied { thread: &'static str, panicked: bool },
}

/// Sent by every worker as it ends, whatever the reason: its name, and whether it panicked.
type Exit = (&'static str, bool);

/// The thread's name, and where its [`Exit`] goes.
struct ExitGuard(&'static str, Sender<Exit>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        // The supervisor outlives its workers (it joins them), so this only fails if the
        // supervisor itself is gone, and then nobody needs the message.
        let _ = self.1.send((self.0, thread::panicking()));
    }
}

struct Workers {
    exit_tx: Sender<Exit>,
    exit_rx: Receiver<Exit>,
    running: Vec<(&'static str, JoinHandle<()>)>,
    exited: HashSet<&'static str>,
}

impl Workers {
    fn new() -> Workers {
        // Unbounded is safe here: at most one message per thread, ever.
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        Workers { exit_tx, exit_rx, running: Vec::new(), exited: HashSet::new() }
    }

    fn spawn(&mut self, thread: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
        let guard = ExitGuard(thread, self.exit_tx.clone());
        let spawned = thread::Builder::new().name(thread.to_string()).stack_size(STACK_SIZE).spawn(move || {
            let _guard = guard;
            f()
        });
        self.running.push((thread, spawned.map_err(|source| RunError::Spawn { thread, source })?));
        Ok(())
    }

    /// Waits until every thread in `names` exited (or `grace` passed), joins them; returns the rest.
    fn join(&mut self, names: &[&'static str], grace: Duration) -> Vec<&'static str> {
        let deadline = Instant::now() + grace;
        while !names.iter().all(|n| self.exited.contains(n)) {
            let Ok((thread, _)) = self.exit_rx.recv_deadline(deadline) else { break };
            self.exited.insert(thread);
        }
        let (done, running): (Vec<_>, _) =
            self.running.drain(..).partition(|(name, _)| names.contains(name) && self.exited.contains(name));
        self.running = running;
        for (_, handle) in done {
            let _ = handle.join();
        }
        // Still running: kept, so a later join (after a cut) can name them again.
        self.running.iter().map(|(name, _)| *name).filter(|name| names.contains(name)).collect()
    }

    /// As `join`; if some still run after `grace`, shuts `pools` down (cutting requests in flight), waits 2 s more.
    fn join_or_cut(&mut self, names: &[&'static str], grace: Duration, pools: &[&ureq::Agent]) -> Vec<&'static str> {
        if self.join(names, grace).is_empty() {
            return Vec::new();
        }
        // `Agent::shutdown` takes the agent; a clone shares its pool, so shutting one down cuts the thread's.
        pools.iter().for_each(|&agent| agent.clone().shutdown());
        self.join(names, Duration::from_secs(2))
    }
}

/// How run mode ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM/SIGINT: exit 0.
    Signal,
    /// A `restart` command: start again in this process (see `main`).
    Restart,
}

/// Runs the agent until SIGTERM/SIGINT or a restart command. `local` is the configuration
/// from the local file; the server's group files are applied over it here.
pub fn run(local: &Config) -> Result<Stopped, RunError> {
    // Blocked before the pid file exists, until the handlers do, and in every worker (masks are
    // inherited): a `reload` that finds the pid file must not kill the agent (HUP's default
    // action), and only `main` takes signals.
    crate::sys::block_signals(true);
    let (config, credentials) = load(local)?;
    let (agents, pid_file, stats, store, listener) = open(&config)?;
    if let Some(user) = &config.agent.user {
        drop_privileges(&config, user)?;
    }
    let host = crate::host::gather(&config.inventory.root);
    let agent_line =
        event::agent_line(&credentials.uuid, &credentials.name, &groups::current(&config.agent.data_dir), &host);
    let live = Live::new(config.clone(), agent_line);
    let (name, uuid, urls) = (&credentials.name, &credentials.uuid, config.server.urls.join(", "));
    log::info!("wazuh-agent {} starting as {name} ({uuid}), server {urls}", crate::VERSION);
    let (cell, wake_rx) = TokenCell::new();
    let (workers, deadline, local) = (Workers::new(), Arc::default(), local.clone());
    let mut s = Supervisor { local, config, credentials, stats, live, cell, deadline, workers, agents };
    let pipeline = start_pipeline(&mut s, store, listener, wake_rx)?;
    let modules = start_modules(&mut s, &pipeline)?;
    let (restart_rx, commands_stop) = start_commands(&mut s, &pipeline, host)?;
    crate::sys::block_signals(false); // a signal pending since the previous image's exec comes now
    let result = supervise(&mut s, &pipeline, &restart_rx);
    // From here on signals stay pending: a restart looks for one after the shutdown; one that
    // comes later stays pending across the exec, and the new image stops on it once it can.
    crate::sys::block_signals(true);
    let signalled = shut_down(s, pipeline, modules, commands_stop) || crate::sys::block_signals(true);
    drop(pid_file);
    if signalled && matches!(result, Ok(Stopped::Restart)) {
        log::info!("a stop signal came during the restart; stopping instead");
    }
    result.map(|stopped| if signalled { Stopped::Signal } else { stopped }).inspect(|_| log::info!("stopped"))
}

/// What every stage wires its threads from, and the threads.
struct Supervisor {
    /// The configuration as loaded from the local file (re-read on SIGHUP and by commands).
    local: Config,
    /// The effective configuration: the local file with the server's group files over it.
    config: Config,
    credentials: Credentials,
    stats: Arc<Stats>,
    live: Arc<Live>,
    cell: Arc<TokenCell>,
    /// When the pipeline's delivery grace ends (set at shutdown).
    deadline: Arc<OnceLock<Instant>>,
    workers: Workers,
    agents: Agents,
}

impl Supervisor {
    /// A session for a thread that talks to the comms API with a token, on `agent`'s pool.
    fn session(&self, agent: &ureq::Agent, stop: Stop, role: Role) -> Session {
        let (cell, live, stats) = (self.cell.clone(), self.live.clone(), self.stats.clone());
        Session { agent: agent.clone(), cell, live, stats, stop, role }
    }
}

/// One connection pool per thread that talks to the server, named after the thread.
struct Agents {
    token: ureq::Agent,
    upload_queue: ureq::Agent,
    upload_stateless: ureq::Agent,
    poll: ureq::Agent,
    files: ureq::Agent,
}

/// What the later stages need of the pipeline.
struct Pipeline {
    /// Stateless events in (to the batcher) and stateful ones (to the queue), for modules.
    readers_tx: Sender<Vec<Event>>,
    append_tx: Sender<Append>,
    ingest: Arc<Ingest>,
    sig_rx: Receiver<i32>,
    sig_handle: signal_hook::iterator::Handle,
    /// Dropped at shutdown, in this order: batcher and uploaders, queue, token.
    pipeline_stop_tx: Sender<()>,
    queue_stop_tx: Sender<()>,
    token_stop_tx: Sender<()>,
}

/// Stage 1: credentials and the effective configuration.
fn load(local: &Config) -> Result<(Config, Credentials), RunError> {
    let credentials = Credentials::load(&local.agent.data_dir).map_err(RunError::Credentials)?;
    let config = groups::effective_config(local, &local.agent.data_dir).unwrap_or_else(|e| {
        log::error!("the server's group configuration cannot be applied ({e}); running with the local file only");
        local.clone()
    });
    if config.server.verify == Verify::None {
        log::warn!(
            "server.verify = \"none\": the server's certificate is NOT checked; anyone on the network path can \
             impersonate the server and read the agent's key. Use this only for testing."
        );
    }
    Ok((config, credentials))
}

/// Stage 2: everything that can fail before a thread exists (HTTP clients, pid file,
/// queue, ingest socket), opened while the agent may still be root.
fn open(config: &Config) -> Result<(Agents, PidFile, Arc<Stats>, QueueStore, UnixListener), RunError> {
    // One connection pool per thread that talks to the server; one TLS configuration.
    let (request, commands) = (config.server.request_timeout, config.server.commands_timeout);
    let [token, upload_queue, upload_stateless, poll, files] =
        http::build_agents(&config.server, [request, request, request, commands, request]).map_err(RunError::Http)?;
    // Before anything else that a second agent would fight over.
    let pid_file = PidFile::acquire(&config.agent.run_dir, config.agent.user.as_deref()).map_err(RunError::Pid)?;
    let stats = Arc::new(Stats::default());
    let store = QueueStore::open(&config.agent.data_dir.join("queue"), config.events.queue_max_bytes, stats.clone())?;
    let listener = ingest::bind(&config.agent.run_dir).map_err(RunError::Ingest)?;
    let agents = Agents { token, upload_queue, upload_stateless, poll, files };
    Ok((agents, pid_file, stats, store, listener))
}

/// Stage 4: the threads every event passes through (signals, token, queue, ingest, batcher, uploaders).
fn start_pipeline(
    s: &mut Supervisor,
    store: QueueStore,
    listener: UnixListener,
    wake_rx: Receiver<()>,
) -> Result<Pipeline, RunError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(RunError::Signals)?;
    let sig_handle = signals.handle();
    // Capacity 4: signals are rare; if the supervisor lags, a repeat of the same signal adds nothing.
    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(4);
    // Chunks of up to 512 events; 2 in flight keep the batcher busy, and under
    // overflow = "block" producers wait as soon as the ring buffer and these are full.
    let (events_tx, events_rx) = crossbeam_channel::bounded::<Vec<Event>>(2);
    // The modules' chunks, handed over (rendezvous): the batcher holds at most one it has no
    // room for, and a module's read waits in its own thread.
    let (readers_tx, readers_rx) = crossbeam_channel::bounded::<Vec<Event>>(0);
    // Rendezvous: each uploader takes one batch at a time; the rest waits in the ring buffer.
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<Event>>(0);
    // Append requests wait here while the queue fsyncs; they are then committed as one group.
    let (append_tx, append_rx) = crossbeam_channel::bounded::<Append>(256);
    let (qbatch_tx, qbatch_rx) = crossbeam_channel::bounded::<QueueBatch>(0);
    // At most one queue batch is in flight, so at most one ack is ever pending.
    let (ack_tx, ack_rx) = crossbeam_channel::bounded::<Ack>(1);
    let (pipeline_stop_tx, pipeline_stop_rx) = crossbeam_channel::bounded::<()>(0);
    let (queue_stop_tx, queue_stop_rx) = crossbeam_channel::bounded::<()>(0);
    let (token_stop_tx, token_stop_rx) = crossbeam_channel::bounded::<()>(0);

    s.workers.spawn("signals", move || {
        // Ends when the supervisor closes the handle at shutdown.
        for sig in signals.forever() {
            // Full: the supervisor already has signals to act on; a repeat adds nothing.
            let _ = sig_tx.try_send(sig);
        }
    })?;

    let (cell, live) = (s.cell.clone(), s.live.clone());
    let auth = Authenticator::new(s.agents.token.clone(), &s.config.server.urls, s.credentials.clone());
    s.workers.spawn("token", move || token::run(cell, wake_rx, token_stop_rx, auth, live))?;

    let live = s.live.clone();
    let limits = move || {
        let v = live.view();
        let (e, overhead) = (&v.config.events, v.agent_line.len());
        BatchLimits { max_events: e.batch_max_events, max_bytes: e.batch_max_bytes as usize, overhead }
    };
    s.workers.spawn("queue", move || queue::run(store, append_rx, ack_rx, qbatch_tx, queue_stop_rx, limits))?;

    let ingest = Arc::new(Ingest::new(events_tx, append_tx.clone(), s.stats.clone()));
    let acceptor = ingest.clone();
    s.workers.spawn("ingest", move || ingest::run(listener, acceptor))?;

    let view = s.live.view();
    let policy = Policy::from_config(&view.config, view.agent_line.len());
    let (spill, shutdown, deadline) = (append_tx.clone(), pipeline_stop_rx.clone(), s.deadline.clone());
    let wiring = batcher::Wiring { input: events_rx, readers: readers_rx, out: batch_tx, spill, shutdown, deadline };
    let (live, stats) = (s.live.clone(), s.stats.clone());
    s.workers.spawn("batcher", move || batcher::run(wiring, policy, live, stats))?;

    // Two uploaders: `upload-queue` takes queue batches (one at a time, in order) and
    // stateless ones, `upload-stateless` stateless ones only. With two requests in flight,
    // one body is sent while the server works on the other (with one, that was dead time).
    let [queue_up, stateless_up] = [&s.agents.upload_queue, &s.agents.upload_stateless].map(|agent| {
        let drain = Stop::Drain { shutdown: pipeline_stop_rx.clone(), deadline: s.deadline.clone() };
        let (shutdown, deadline) = (pipeline_stop_rx.clone(), s.deadline.clone());
        let (rejected, spill) = (s.config.agent.data_dir.join("rejected.ndjson"), append_tx.clone());
        Uploader { session: s.session(agent, drain, Role::Events), rejected, shutdown, deadline, spill }
    });
    let batches = batch_rx.clone();
    s.workers.spawn("upload-queue", move || uploader::run_queue(queue_up, qbatch_rx, ack_tx, batches))?;
    s.workers.spawn("upload-stateless", move || uploader::run_stateless(stateless_up, batch_rx))?;
    // The uploaders hold the only receivers now: the batcher's send fails once both are gone.
    drop(pipeline_stop_rx);
    Ok(Pipeline { readers_tx, append_tx, ingest, sig_rx, sig_handle, pipeline_stop_tx, queue_stop_tx, token_stop_tx })
}

/// Stage 5: every enabled [`module::MODULES`] on its own thread; their names, and the stopping sender.
fn start_modules(s: &mut Supervisor, p: &Pipeline) -> Result<(Vec<&'static str>, Sender<()>), RunError> {
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
    let mut names = Vec::new();
    for m in module::MODULES.iter().filter(|m| (m.enabled)(&s.config)) {
        let events = EventSink::new(p.readers_tx.clone(), stop.clone());
        let durable = DurableSink::new(p.append_tx.clone(), stop.clone());
        let (state, uuid, stats) = (s.config.agent.data_dir.join(m.state), s.credentials.uuid.clone(), s.stats.clone());
        let ctx = module::Context { events, durable, state, uuid, stats, stop: stop.clone() };
        let (run, config) = (m.run, s.config.clone());
        s.workers.spawn(m.name, move || run(config, ctx))?;
        names.push(m.name);
    }
    Ok((names, stop_tx))
}

/// Stage 6: the command round trip (long-poll, executor): the restart requests, and the sender whose drop stops both.
fn start_commands(s: &mut Supervisor, p: &Pipeline, host: HostInfo) -> Result<(Receiver<()>, Sender<()>), RunError> {
    let (commands_stop_tx, commands_stop_rx) = crossbeam_channel::bounded::<()>(0);
    // Commands are few; 64 waiting for the executor is far more than a server sends at once.
    let (command_tx, command_rx) = crossbeam_channel::bounded::<Command>(64);
    let (restart_tx, restart_rx) = crossbeam_channel::bounded::<()>(1);
    let session = s.session(&s.agents.poll, Stop::Now(commands_stop_rx.clone()), Role::Commands);
    let (uuid, stop) = (s.credentials.uuid.clone(), commands_stop_rx.clone());
    s.workers.spawn("poll", move || poll::run(session, &uuid, command_tx, stop))?;

    let session = s.session(&s.agents.files, Stop::Now(commands_stop_rx.clone()), Role::Files);
    let (local, data_dir) = (s.local.clone(), s.config.agent.data_dir.clone());
    let (uuid, name) = (s.credentials.uuid.clone(), s.credentials.name.clone());
    let ctx = Arc::new(Ctx { session, local, data_dir, uuid, name, host });
    let exec = Executor { ctx, queue: p.append_tx.clone(), restart: restart_tx, last_groups: Default::default() };
    s.workers.spawn("executor", move || executor::run(exec, command_rx, commands_stop_rx))?;
    Ok((restart_rx, commands_stop_tx))
}

/// Stage 7: waits for a signal, a restart command or a worker's end; writes state, frees heap.
fn supervise(s: &mut Supervisor, p: &Pipeline, restart: &Receiver<()>) -> Result<Stopped, RunError> {
    write_state(s);
    // Free heap goes back to the system once each burst is over (checked with the state).
    let mut trim = memory::Trim::default();
    loop {
        select! {
            recv(p.sig_rx) -> sig => match sig {
                Ok(SIGHUP) => reload(&s.local, &s.live),
                Ok(sig) => {
                    log::info!("{} received, shutting down", if sig == SIGINT { "SIGINT" } else { "SIGTERM" });
                    return Ok(Stopped::Signal);
                }
                Err(_) => return Err(RunError::WorkerDied { thread: "signals", panicked: false }),
            },
            recv(restart) -> msg => {
                msg.map_err(|_| RunError::WorkerDied { thread: "executor", panicked: false })?;
                log::info!("restart command received, restarting");
                return Ok(Stopped::Restart);
            }
            recv(s.workers.exit_rx) -> exit => {
                let (thread, panicked) = exit.unwrap_or(("unknown", false));
                s.workers.exited.insert(thread);
                log::error!("the {thread} thread ended while the agent was running; stopping so the init system can restart it");
                return Err(RunError::WorkerDied { thread, panicked });
            }
            default(status::STATE_INTERVAL) => {
                write_state(s);
                let activity = s.stats.received.load(Relaxed) + s.stats.sent.load(Relaxed);
                if trim.due(activity, s.stats.buffered.load(Relaxed) == 0) {
                    memory::release_free();
                }
            }
        }
    }
}

/// Stage 8: the staged shutdown (ARCHITECTURE.md, Invariants), each stage with its own grace.
/// Returns whether SIGTERM or SIGINT came just before it began.
fn shut_down(
    mut s: Supervisor,
    p: Pipeline,
    (modules, modules_stop): (Vec<&'static str>, Sender<()>),
    commands_stop: Sender<()>,
) -> bool {
    let workers = &mut s.workers;
    // (0) Commands first: a running command finishes or is cut, no new one starts.
    drop(commands_stop);
    s.agents.poll.clone().shutdown();
    let mut stuck = workers.join_or_cut(&["poll", "executor"], Duration::from_secs(2), &[&s.agents.files]);
    // (1) No more input; producers get their answers.
    let _ = s.deadline.set(Instant::now() + SHUTDOWN_GRACE);
    p.ingest.stop(&s.config.agent.run_dir, INGEST_STOP);
    stuck.extend(workers.join(&["ingest"], INGEST_STOP));
    // Modules stop reading with ingest; they save their state once the pipeline has
    // delivered (or dropped) what they handed over, so they are joined after it.
    drop(modules_stop);
    // (2) Deliver within the grace, spill the rest.
    drop(p.pipeline_stop_tx);
    let until_deadline = s.deadline.get().map_or(SHUTDOWN_GRACE, |d| d.saturating_duration_since(Instant::now()));
    const PIPELINE: [&str; 3] = ["batcher", "upload-queue", "upload-stateless"];
    // Requests still in flight are cut only when the pipeline itself is stuck; the threads
    // stuck in earlier stages stay in the list for the final warning.
    let pools = [&s.agents.upload_queue, &s.agents.upload_stateless];
    stuck.extend(workers.join_or_cut(&PIPELINE, until_deadline + Duration::from_secs(2), &pools));
    stuck.extend(workers.join(&modules, Duration::from_secs(2)));
    // (3) The queue after everyone who writes to it.
    drop(p.queue_stop_tx);
    stuck.extend(workers.join(&["queue"], Duration::from_secs(5)));
    // (4) Token and signals.
    drop(p.token_stop_tx);
    s.cell.close();
    p.sig_handle.close();
    // An authentication request in flight is cut (it holds a socket, no data).
    stuck.extend(workers.join_or_cut(&["token"], Duration::from_secs(1), &[&s.agents.token]));
    stuck.extend(workers.join(&["signals"], Duration::from_secs(1)));
    if !stuck.is_empty() {
        log::warn!("threads still busy at exit: {}", stuck.join(", "));
    }
    write_state(&s);
    let _ = std::fs::remove_file(ingest::socket_path(&s.config.agent.run_dir));
    p.sig_rx.try_iter().any(|sig| sig != SIGHUP)
}

/// Writes `state.json` (for `--status`) from the counters and the token cell.
fn write_state(s: &Supervisor) {
    let token = s.cell.current();
    s.stats.token_expires_at.store(token.as_ref().map_or(0, |t| status::unix(t.expires_at)), Relaxed);
    let server = token.as_ref().map_or_else(|| s.config.server.urls[0].clone(), |t| t.server.clone());
    let mut state = status::State::capture(&s.stats, &s.credentials.uuid, &server, SystemTime::now());
    // A current authentication problem (cleared on success) outranks older errors.
    state.last_error = s.cell.last_error().or(state.last_error);
    let run_dir = &s.config.agent.run_dir;
    if let Err(e) = status::write_state(run_dir, &state) {
        log::warn!("cannot write {}: {e}", status::state_path(run_dir).display());
    }
}

/// Stage 3 (before any worker thread): hands the agent's directories and log file to `agent.user`, becomes it.
fn drop_privileges(config: &Config, user: &str) -> Result<(), RunError> {
    let account = crate::privileges::resolve(user, config.agent.group.as_deref()).map_err(RunError::Privileges)?;
    let dirs = [config.agent.data_dir.as_path(), config.agent.run_dir.as_path()];
    for p in dirs.into_iter().chain(crate::logging::file_path()) {
        crate::privileges::hand_over(p, account).map_err(RunError::Privileges)?;
    }
    crate::privileges::drop_to(account).map_err(RunError::Privileges)?;
    log::info!("running as {user} (uid {}, gid {})", account.uid, account.gid);
    Ok(())
}

/// SIGHUP: reopen the log file, re-read the local and group files, apply what can change live.
fn reload(local: &Config, live: &Live) {
    if let Err(e) = crate::logging::reopen() {
        log::error!("SIGHUP: cannot reopen the log file: {e}");
    }
    let _guard = live.reload_guard();
    let fresh = local.source.as_deref().map_or_else(|| Ok(Config::defaults()), |p| Config::load(Some(p)));
    let fresh = fresh.map_err(|e| e.to_string());
    match fresh.and_then(|l| groups::effective_config(&l, &l.agent.data_dir).map_err(|e| e.to_string())) {
        Ok(c) => log::info!("SIGHUP: configuration reloaded; {}", live.apply(c).describe()),
        Err(e) => log::error!("SIGHUP: {e}; keeping the running configuration"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_exit_is_reported_including_panics() {
        let mut w = Workers::new();
        w.spawn("returns", || {}).unwrap();
        w.spawn("panics", || panic!("boom")).unwrap();
        let mut exits: Vec<Exit> = (0..2).map(|_| w.exit_rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        exits.sort();
        assert_eq!(exits, vec![("panics", true), ("returns", false)]);
        w.exited.extend(["panics", "returns"]);
        assert!(w.join(&["panics", "returns"], Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_dead_worker_is_named_with_how_it_ended() {
        let died = |panicked| RunError::WorkerDied { thread: "queue", panicked }.to_string();
        assert_eq!(
            (died(true).as_str(), died(false).as_str()),
            ("the queue thread panicked", "the queue thread stopped unexpectedly")
        );
    }

    #[test]
    fn join_names_threads_still_running_after_the_grace() {
        let mut w = Workers::new();
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        w.spawn("stuck", move || {
            let _ = rx.recv();
        })
        .unwrap();
        w.spawn("quick", || {}).unwrap();
        assert!(w.join(&["quick"], Duration::from_secs(5)).is_empty());
        assert_eq!(w.join(&["stuck"], Duration::from_millis(100)), vec!["stuck"]);
        drop(tx);
    }
}
