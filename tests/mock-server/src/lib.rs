//! A mock of the Wazuh server's Agent comms API and Server management API (docs/protocol.md),
//! strict like the real server, with an admin interface for tests and demos.
//!
//! * Two TLS listeners on 127.0.0.1 (comms, management) with a CA made at start-up and
//!   written to `<dir>/ca.pem`; an optional plain-HTTP admin listener for scripts.
//! * One thread per connection; keep-alive; HTTP/1.1 parsed with httparse.
//! * Everything it saw is kept in [`State`] and readable through [`MockServer`]'s
//!   methods (in-process tests) or `GET /admin/state` (the binary).
//!
//! This crate is a dev-dependency of the agent only: none of it links into the agent.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jwt_simple::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

/// The audience and issuer the comms API puts in its tokens.
pub const TOKEN_ISSUER: &str = "wazuh";
pub const TOKEN_AUDIENCE: &str = "Wazuh Agent comms API";

/// Start-up options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `ca.pem` is written.
    pub dir: PathBuf,
    pub comms_port: u16,
    pub mgmt_port: u16,
    /// Plain-HTTP admin port; `None`: no admin listener (in-process tests use methods).
    pub admin_port: Option<u16>,
    /// Management API user and password.
    pub user: String,
    pub password: String,
    /// Comms API token lifetime in seconds.
    pub token_lifetime: u64,
    /// How long `GET /api/v1/commands` is held before the 408.
    pub command_hold: Duration,
    /// Names in the server certificate.
    pub cert_names: Vec<String>,
    /// Accept only v4 UUIDs at registration, like the Wazuh 6.0-era server.
    pub uuid_v4_only: bool,
    /// Largest request body accepted before a 413.
    pub max_body: usize,
    /// Keep every received event (tests); `false` only counts them (benchmarks).
    pub keep_events: bool,
    /// Keep the stateful documents by id and answer per item like the real server: an update
    /// of a missing id is 404 "document missing", a delete 404 "not_found", a create of an
    /// existing id 409. Off: every item succeeds.
    pub documents: bool,
    /// Answer 500 to every events body sent with `Content-Encoding: gzip` and take plain ones,
    /// like the Wazuh 6.0 comms API (its logging middleware decodes every body as UTF-8 JSON).
    pub refuse_gzip: bool,
    /// Also with `keep_events` off, keep the stateless events of this module (`header.module`)
    /// with their data, each with when its body was handled ([`MockServer::timed_events`]):
    /// what `make bench` times FIM notifications with.
    pub timed_module: Option<String>,
}

impl Options {
    pub fn new(dir: &Path) -> Options {
        Options {
            dir: dir.to_path_buf(),
            comms_port: 0,
            mgmt_port: 0,
            admin_port: None,
            user: "wazuh".into(),
            password: "wazuh".into(),
            token_lifetime: 900,
            command_hold: Duration::from_secs(30),
            cert_names: vec!["localhost".into(), "127.0.0.1".into()],
            uuid_v4_only: false,
            max_body: 10 << 20,
            keep_events: true,
            documents: false,
            refuse_gzip: false,
            timed_module: None,
        }
    }
}

/// A fault to inject into the next `times` requests whose path starts with `path`.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub path: String,
    #[serde(default = "one")]
    pub times: u32,
    pub action: FaultAction,
}

fn one() -> u32 {
    1
}

/// What an injected fault does.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer with this status (and optional Retry-After and body) instead of handling.
    Status {
        code: u16,
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        body: Option<String>,
    },
    /// Close the connection without answering.
    Reset,
    /// Wait, then handle normally.
    Delay { ms: u64 },
    /// Answer 200 with a body that is not JSON.
    Garbage,
}

/// A registered agent.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: String,
    pub key: String,
    pub name: String,
    /// The whole registration body as received.
    pub registration: Value,
}

/// One call to `POST /api/v1/authentication`.
#[derive(Debug, Clone)]
pub struct AuthCall {
    pub uuid: String,
    pub status: u16,
    pub at: Instant,
}

/// One request as the mock saw it (method, path, status, headers of interest).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub api: &'static str,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub user_agent: String,
    pub content_type: String,
    /// The `Content-Encoding` header (`gzip`), empty without one.
    pub content_encoding: String,
    pub at: Instant,
}

/// One request as it arrived (before it was handled): what the fleet bench bins per second.
/// `RequestRecord` is written when the answer leaves, which for a held poll is the end of
/// its hold; this one is written when the request has been read.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub api: &'static str,
    pub method: String,
    pub path: String,
    /// The agent's UUID: from the bearer token's payload (not verified) or, for
    /// `POST /api/v1/authentication`, the body. `None` when neither names one.
    pub agent: Option<String>,
    pub at: Instant,
}

/// Connection-level counters of the comms and management listeners (`MockServer::traffic`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Connections served (each one TLS handshake); refused-while-down ones are not counted.
    pub connections: u64,
    /// Connections open now.
    pub open: i64,
    /// Connections closed at once because the server was down (`set_down`): reconnect attempts.
    pub refused: u64,
    /// Bytes read from and written to the TCP sockets, TLS records and handshakes included.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A received event: its header line and data line (absent for a stateful delete).
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// The body's agent line, shared by the events of one request.
    pub agent: Arc<Value>,
    pub header: Value,
    pub data: Option<Value>,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, AgentRecord>,
    auth_calls: Vec<AuthCall>,
    logins: u32,
    token_lifetime: u64,
    /// Tokens with a lower sequence number are treated as expired (admin "expire tokens").
    min_seq: u64,
    next_seq: u64,
    commands: HashMap<String, VecDeque<Value>>,
    stateless: Vec<ReceivedEvent>,
    /// See [`Options::timed_module`].
    timed: Vec<(Instant, ReceivedEvent)>,
    stateful: Vec<ReceivedEvent>,
    /// With `Options::documents`: the stateful documents by id (data line, or null).
    documents: HashMap<String, Value>,
    requests: Vec<RequestRecord>,
    faults: Vec<Fault>,
    down: bool,
    files: HashMap<String, Vec<u8>>,
    command_hold: Duration,
    /// Seconds added to the server's clock for token iat/exp (clock-skew tests).
    clock_offset: i64,
    /// Hostile tokens: claims put as they are into the payload of every token issued.
    token_claims: Option<Value>,
    /// Tokens issued with `token_claims` (unsigned, accepted by exact match) → agent uuid.
    raw_tokens: HashMap<String, String>,
    /// An events body containing this text is refused with 400 (a "poison" event).
    poison: Option<String>,
    /// See [`Options::refuse_gzip`].
    refuse_gzip: bool,
    /// Events accepted so far, kept or not.
    stateless_count: u64,
    stateful_count: u64,
    /// When each command was enqueued and when a poll took it (by document_id).
    command_enqueued: HashMap<String, Instant>,
    command_delivered: Vec<(String, Instant)>,
    /// Command results, whether or not events are kept: (document_id, code, message).
    command_results: Vec<(String, i64, String)>,
    command_result_at: HashMap<String, Instant>,
    /// Every comms/management request as it arrived (see [`Arrival`]).
    arrivals: Vec<Arrival>,
    /// While set, every comms/management request is answered 503 (see `set_unavailable`).
    unavailable: bool,
    /// Bumped by `end_holds`: a held poll that saw an older value ends.
    hold_epoch: u64,
    /// How `end_holds` ends them: answered 408 (false) or the connection dropped (true).
    hold_drop: bool,
}

/// Shared state of the mock.
pub struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
    key: HS256Key,
    mgmt_key: HS256Key,
    opts: Options,
    /// Set at shutdown: held long-polls end at once.
    stopping: AtomicBool,
    /// `Traffic` counters, kept outside the lock: every read and write adds to them.
    connections: AtomicU64,
    open: AtomicI64,
    refused: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running mock server. Dropping it stops the listeners.
pub struct MockServer {
    pub comms_addr: SocketAddr,
    pub mgmt_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    ca_file: PathBuf,
    ca_pem: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Serialize, Deserialize)]
struct AgentClaims {
    uuid: String,
    seq: u64,
}

fn tls_server_config(opts: &Options) -> io::Result<(Arc<rustls::ServerConfig>, String)> {
    let err = |e: rcgen::Error| io::Error::other(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "wazuh-mock-server test CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut leaf_params = rcgen::CertificateParams::new(opts.cert_names.clone()).map_err(err)?;
    leaf_params.distinguished_name.push(rcgen::DnType::CommonName, "wazuh-mock-server");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(err)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key_der)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok((Arc::new(config), ca_cert.pem()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Comms,
    Mgmt,
    Admin,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Comms => "comms",
            Api::Mgmt => "management",
            Api::Admin => "admin",
        }
    }
}

impl MockServer {
    /// Starts the listeners and returns once they accept connections.
    pub fn start(opts: Options) -> io::Result<MockServer> {
        std::fs::create_dir_all(&opts.dir)?;
        let (tls, ca_pem) = tls_server_config(&opts)?;
        let ca_file = opts.dir.join("ca.pem");
        std::fs::write(&ca_file, &ca_pem)?;
        let inner = Inner {
            token_lifetime: opts.token_lifetime,
            command_hold: opts.command_hold,
            refuse_gzip: opts.refuse_gzip,
            next_seq: 1,
            ..Inner::default()
        };
        let state = Arc::new(State {
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            key: HS256Key::generate(),
            mgmt_key: HS256Key::generate(),
            opts: opts.clone(),
            stopping: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            open: AtomicI64::new(0),
            refused: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let comms = TcpListener::bind(("127.0.0.1", opts.comms_port))?;
        let mgmt = TcpListener::bind(("127.0.0.1", opts.mgmt_port))?;
        let admin = match opts.admin_port {
            Some(p) => Some(TcpListener::bind(("127.0.0.1", p))?),
            None => None,
        };
        let mut server = MockServer {
            comms_addr: comms.local_addr()?,
            mgmt_addr: mgmt.local_addr()?,
            admin_addr: admin.as_ref().map(|a| a.local_addr()).transpose()?,
            ca_file,
            ca_pem,
            state,
            stop,
            threads: Vec::new(),
        };
        for (listener, api) in [(Some(comms), Api::Comms), (Some(mgmt), Api::Mgmt), (admin, Api::Admin)] {
            let Some(listener) = listener else { continue };
            let state = server.state.clone();
            let stop = server.stop.clone();
            let tls = (api != Api::Admin).then(|| tls.clone());
            server.threads.push(std::thread::spawn(move || accept_loop(listener, tls, state, stop, api)));
        }
        Ok(server)
    }

    pub fn comms_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.comms_addr.port())
    }

    pub fn mgmt_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.mgmt_addr.port())
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The ports and CA as one JSON object (what the binary prints).
    pub fn describe(&self) -> Value {
        json!({
            "comms": self.comms_addr.port(),
            "management": self.mgmt_addr.port(),
            "admin": self.admin_addr.map(|a| a.port()),
            "comms_url": self.comms_url(),
            "management_url": self.mgmt_url(),
            "ca_file": self.ca_file.display().to_string(),
        })
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        self.state.lock().agents.values().cloned().collect()
    }

    /// Creates an agent directly (as if registered), for tests that start from a registered agent.
    pub fn add_agent(&self, id: &str, key: &str, name: &str) {
        self.state.lock().agents.insert(
            id.to_string(),
            AgentRecord { id: id.into(), key: key.into(), name: name.into(), registration: Value::Null },
        );
    }

    pub fn remove_agent(&self, id: &str) {
        self.state.lock().agents.remove(id);
    }

    pub fn auth_calls(&self) -> Vec<AuthCall> {
        self.state.lock().auth_calls.clone()
    }

    pub fn logins(&self) -> u32 {
        self.state.lock().logins
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.lock().requests.clone()
    }

    pub fn set_token_lifetime(&self, secs: u64) {
        self.state.lock().token_lifetime = secs;
    }

    /// Every token issued so far is expired from now on.
    pub fn expire_tokens(&self) {
        let mut st = self.state.lock();
        st.min_seq = st.next_seq;
    }

    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    /// Removes every injected fault that has not run out yet.
    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// While down, every connection is closed as soon as it is accepted, and a kept-alive
    /// one at its next request (without an answer), as when the server process is gone.
    pub fn set_down(&self, down: bool) {
        self.state.lock().down = down;
    }

    /// While on, every comms and management request is answered 503 without `Retry-After`
    /// (a server or load balancer that is up but failing), and held polls end at once with
    /// that 503. The admin listener still answers.
    pub fn set_unavailable(&self, on: bool) {
        self.state.lock().unavailable = on;
        self.state.changed.notify_all();
    }

    /// Ends every poll held now: answered 408 as if its hold had elapsed (`close` false), or
    /// its connection closed without an answer (`close` true; with `set_down`, a server
    /// process that died). Polls that arrive afterwards are held as usual.
    pub fn end_holds(&self, close: bool) {
        let mut st = self.state.lock();
        st.hold_epoch += 1;
        st.hold_drop = close;
        drop(st);
        self.state.changed.notify_all();
    }

    /// Every comms and management request so far, as it arrived.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().arrivals.clone()
    }

    /// Connections and bytes of the comms and management listeners so far.
    pub fn traffic(&self) -> Traffic {
        let s = &self.state;
        Traffic {
            connections: s.connections.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// Refuses (400) every events body that contains `marker`, like a server refusing
    /// one malformed event spoils its whole batch.
    pub fn set_poison(&self, marker: Option<&str>) {
        self.state.lock().poison = marker.map(str::to_string);
    }

    /// Turns [`Options::refuse_gzip`] on or off.
    pub fn set_refuse_gzip(&self, refuse: bool) {
        self.state.lock().refuse_gzip = refuse;
    }

    /// Shifts the server's clock (token `iat`/`exp` and their check) by `secs`.
    pub fn set_clock_offset(&self, secs: i64) {
        self.state.lock().clock_offset = secs;
    }

    /// Issues tokens whose payload holds `claims` as given (any `iat`/`exp`, out of range,
    /// negative, missing …) over the usual ones; the comms API accepts them. `None`: normal tokens.
    pub fn set_token_claims(&self, claims: Option<Value>) {
        self.state.lock().token_claims = claims;
    }

    pub fn set_command_hold(&self, hold: Duration) {
        self.state.lock().command_hold = hold;
    }

    /// Queues a command for an agent; it is delivered on that agent's next poll.
    pub fn enqueue_command(&self, agent: &str, command: Value) {
        enqueue(&self.state, agent, vec![command]);
    }

    /// Queues many commands at once: the agent's next poll takes them all in one answer.
    pub fn enqueue_commands(&self, agent: &str, commands: Vec<Value>) {
        enqueue(&self.state, agent, commands);
    }

    /// `(document_id, enqueued, delivered)` for every command a poll took.
    pub fn command_deliveries(&self) -> Vec<(String, Instant, Instant)> {
        let st = self.state.lock();
        st.command_delivered
            .iter()
            .filter_map(|(id, at)| st.command_enqueued.get(id).map(|e| (id.clone(), *e, *at)))
            .collect()
    }

    /// `(document_id, enqueued, result received)` for every command with a result.
    pub fn command_roundtrips(&self) -> Vec<(String, Instant, Instant)> {
        let st = self.state.lock();
        st.command_result_at
            .iter()
            .filter_map(|(id, at)| st.command_enqueued.get(id).map(|e| (id.clone(), *e, *at)))
            .collect()
    }

    /// `(document_id, code, message)` of every command result received, in order.
    pub fn command_results(&self) -> Vec<(String, i64, String)> {
        self.state.lock().command_results.clone()
    }

    pub fn set_file(&self, name: &str, content: &[u8]) {
        self.state.lock().files.insert(name.to_string(), content.to_vec());
    }

    /// Events accepted so far (also when `keep_events` is off): (stateless, stateful).
    pub fn event_counts(&self) -> (u64, u64) {
        let st = self.state.lock();
        (st.stateless_count, st.stateful_count)
    }

    pub fn stateless_events(&self) -> Vec<ReceivedEvent> {
        self.state.lock().stateless.clone()
    }

    /// The stateless events of `Options::timed_module` from the `from`-th on, each with when
    /// its body was handled.
    pub fn timed_events(&self, from: usize) -> Vec<(Instant, ReceivedEvent)> {
        self.state.lock().timed.get(from..).unwrap_or_default().to_vec()
    }

    pub fn stateful_events(&self) -> Vec<ReceivedEvent> {
        self.state.lock().stateful.clone()
    }

    /// The document store (`Options::documents`): id → data line.
    pub fn documents(&self) -> HashMap<String, Value> {
        self.state.lock().documents.clone()
    }

    /// Puts a document in the store, as if an earlier create had made it.
    pub fn seed_document(&self, id: &str, data: Value) {
        self.state.lock().documents.insert(id.to_string(), data);
    }

    /// Waits until `check` holds for the state or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, check: impl Fn(&MockServer) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if check(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let st = self.state.lock();
            let _ = self.state.changed.wait_timeout(st, Duration::from_millis(50));
        }
    }

    /// A JSON summary of everything received (the admin `GET /admin/state`).
    pub fn summary(&self) -> Value {
        summary(&self.state)
    }

    pub fn shutdown(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        self.state.stopping.store(true, Ordering::SeqCst);
        self.state.changed.notify_all();
        // Wake the blocking accept() calls.
        for addr in [Some(self.comms_addr), Some(self.mgmt_addr), self.admin_addr].into_iter().flatten() {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn enqueue(state: &State, agent: &str, commands: Vec<Value>) {
    let mut st = state.lock();
    for command in commands {
        if let Some(id) = command.get("document_id").and_then(Value::as_str) {
            st.command_enqueued.insert(id.to_string(), Instant::now());
        }
        st.commands.entry(agent.to_string()).or_default().push_back(command);
    }
    drop(st);
    state.changed.notify_all();
}

fn summary(state: &State) -> Value {
    let st = state.lock();
    let ev = |e: &ReceivedEvent| json!({"header": e.header, "data": e.data});
    json!({
        "agents": st.agents.values().map(|a| json!({"id": a.id, "name": a.name})).collect::<Vec<_>>(),
        "logins": st.logins,
        "auth_calls": st.auth_calls.len(),
        "auth_ok": st.auth_calls.iter().filter(|c| c.status == 200).count(),
        "command_results": st.command_results.iter().map(|(id, code, msg)| json!({"id": id, "code": code, "message": msg})).collect::<Vec<_>>(),
        "stateless": st.stateless.iter().map(ev).collect::<Vec<_>>(),
        "stateful": st.stateful.iter().map(ev).collect::<Vec<_>>(),
        "documents": st.documents,
        "requests": st.requests.iter().map(|r| json!({"api": r.api, "method": r.method, "path": r.path, "status": r.status})).collect::<Vec<_>>(),
    })
}

fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    api: Api,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(tcp) = conn else { continue };
        if api != Api::Admin && state.lock().down {
            state.refused.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.shutdown(Shutdown::Both);
            continue;
        }
        let state = state.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = tcp.set_nodelay(true);
            // Idle keep-alive connections are closed after a minute, like a real server.
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(60)));
            match tls {
                Some(cfg) => {
                    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                        return;
                    };
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    state.open.fetch_add(1, Ordering::Relaxed);
                    let counted = Counted { tcp, state: state.clone() };
                    let mut stream = rustls::StreamOwned::new(conn, counted);
                    serve(&mut stream, &state, &stop, api);
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                    state.open.fetch_sub(1, Ordering::Relaxed);
                }
                None => {
                    let mut tcp = tcp;
                    serve(&mut tcp, &state, &stop, api);
                }
            }
        });
    }
}

/// A TLS listener's socket, counting the bytes that cross it for [`Traffic`].
struct Counted {
    tcp: TcpStream,
    state: Arc<State>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tcp.read(buf)?;
        self.state.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf)?;
        self.state.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// The agent a request is from: the `uuid` claim of its bearer token (read, not verified:
/// this only labels the arrival) or the `uuid` of an authentication body.
fn arrival_agent(req: &Request) -> Option<String> {
    let uuid = |v: Value| v.get("uuid").and_then(Value::as_str).map(str::to_string);
    match req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) => {
            let payload = token.trim().split('.').nth(1)?;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
            uuid(serde_json::from_slice(&bytes).ok()?)
        }
        None if req.path == "/api/v1/authentication" => uuid(serde_json::from_slice(&req.body).ok()?),
        None => None,
    }
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A response to write.
struct Response {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    extra: Vec<(String, String)>,
    /// The handler recorded the request itself (see `record_locked`).
    recorded: bool,
}

impl Response {
    fn json(status: u16, v: Value) -> Response {
        Response {
            status,
            body: v.to_string().into_bytes(),
            content_type: "application/json",
            extra: Vec::new(),
            recorded: false,
        }
    }
    fn empty(status: u16) -> Response {
        Response { status, body: Vec::new(), content_type: "application/json", extra: Vec::new(), recorded: false }
    }
    fn error(status: u16, message: &str) -> Response {
        Response::json(status, json!({"message": message, "code": status}))
    }
}

enum ReadOutcome {
    Request(Request),
    Closed,
    TooLarge,
    Bad(String),
}

fn read_request(stream: &mut impl Read, buf: &mut Vec<u8>, max_body: usize) -> ReadOutcome {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let target = req.path.unwrap_or("/").to_string();
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                buf.drain(..head_len);
                let find = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
                let chunked = find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
                let body = if chunked {
                    match read_chunked(stream, buf, max_body) {
                        Ok(b) => b,
                        Err(ReadOutcome::TooLarge) => return ReadOutcome::TooLarge,
                        Err(_) => return ReadOutcome::Closed,
                    }
                } else {
                    let len: usize = match find("content-length").map(|v| v.trim().parse()) {
                        None => 0,
                        Some(Ok(n)) => n,
                        Some(Err(_)) => return ReadOutcome::Bad("bad Content-Length".into()),
                    };
                    if len > max_body {
                        // Read the body anyway (as servers do up to a limit), so the client
                        // sees the 413 instead of a reset while it is still sending.
                        let mut left = len.saturating_sub(buf.len());
                        buf.clear();
                        while left > 0 {
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return ReadOutcome::Closed,
                                Ok(n) => left = left.saturating_sub(n),
                            }
                        }
                        return ReadOutcome::TooLarge;
                    }
                    while buf.len() < len {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return ReadOutcome::Closed,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..len).collect()
                };
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p.to_string(), q.to_string()),
                    None => (target, String::new()),
                };
                return ReadOutcome::Request(Request { method, path, query, headers, body });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > 64 * 1024 {
                    return ReadOutcome::Bad("request head too large".into());
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return ReadOutcome::Closed,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            Err(e) => return ReadOutcome::Bad(format!("malformed request: {e}")),
        }
    }
}

fn read_chunked(stream: &mut impl Read, buf: &mut Vec<u8>, max_body: usize) -> Result<Vec<u8>, ReadOutcome> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> Result<(), ReadOutcome> {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => Err(ReadOutcome::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    };
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(buf)?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16).map_err(|_| ReadOutcome::Closed)?;
        buf.drain(..line_end + 2);
        if body.len() + size > max_body {
            return Err(ReadOutcome::TooLarge);
        }
        while buf.len() < size + 2 {
            fill(buf)?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(stream: &mut impl Write, resp: &Response, close: bool) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    if resp.status != 204 {
        head.push_str(&format!("Content-Type: {}\r\nContent-Length: {}\r\n", resp.content_type, resp.body.len()));
    }
    for (k, v) in &resp.extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if resp.status != 204 {
        out.extend_from_slice(&resp.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

fn serve(stream: &mut (impl Read + Write), state: &Arc<State>, stop: &AtomicBool, api: Api) {
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let req = match read_request(stream, &mut buf, state.opts.max_body) {
            ReadOutcome::Request(r) => r,
            ReadOutcome::Closed => return,
            ReadOutcome::TooLarge => {
                let resp = Response::error(413, "Request body too large");
                let mut st = state.lock();
                st.requests.push(RequestRecord {
                    api: api.name(),
                    method: "POST".into(),
                    path: "(body too large)".into(),
                    status: 413,
                    user_agent: String::new(),
                    content_type: String::new(),
                    content_encoding: String::new(),
                    at: Instant::now(),
                });
                drop(st);
                if write_response(stream, &resp, false).is_err() {
                    return;
                }
                continue;
            }
            ReadOutcome::Bad(m) => {
                let _ = write_response(stream, &Response::error(400, &m), true);
                return;
            }
        };
        if api != Api::Admin {
            let mut st = state.lock();
            if st.down {
                return;
            }
            let arrival = Arrival {
                api: api.name(),
                method: req.method.clone(),
                path: req.path.clone(),
                agent: arrival_agent(&req),
                at: Instant::now(),
            };
            st.arrivals.push(arrival);
        }
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let resp = if api == Api::Admin { Some(admin(state, &req)) } else { handle_with_faults(state, api, &req) };
        let Some(resp) = resp else {
            // Injected reset: drop the connection without a response.
            record(state, api, &req, 0);
            return;
        };
        // The events endpoints record their own successes, together with the events.
        if api != Api::Admin && !resp.recorded {
            record(state, api, &req, resp.status);
        }
        if write_response(stream, &resp, close).is_err() || close {
            return;
        }
    }
}

fn record(state: &State, api: Api, req: &Request, status: u16) {
    record_locked(&mut state.lock(), api, req, status);
    state.changed.notify_all();
}

/// Records a request under a lock the caller holds, so that what the request changed and
/// the record of it become visible together (a test that waits for the events and then
/// reads the request log must find the request there).
fn record_locked(st: &mut Inner, api: Api, req: &Request, status: u16) {
    st.requests.push(RequestRecord {
        api: api.name(),
        method: req.method.clone(),
        path: req.path.clone(),
        status,
        user_agent: req.header("user-agent").unwrap_or("").to_string(),
        content_type: req.header("content-type").unwrap_or("").to_string(),
        content_encoding: req.header("content-encoding").unwrap_or("").to_string(),
        at: Instant::now(),
    });
}

fn handle_with_faults(state: &Arc<State>, api: Api, req: &Request) -> Option<Response> {
    if state.lock().unavailable {
        return Some(Response::error(503, "Service unavailable"));
    }
    let fault = {
        let mut st = state.lock();
        let pos = st.faults.iter().position(|f| req.path.starts_with(&f.path));
        pos.map(|i| {
            let f = st.faults[i].clone();
            st.faults[i].times = st.faults[i].times.saturating_sub(1);
            if st.faults[i].times == 0 {
                st.faults.remove(i);
            }
            f.action
        })
    };
    match fault {
        Some(FaultAction::Status { code, retry_after, body }) => {
            let mut r = match body {
                Some(b) => Response {
                    status: code,
                    body: b.into_bytes(),
                    content_type: "application/json",
                    extra: Vec::new(),
                    recorded: false,
                },
                None => Response::error(code, "injected fault"),
            };
            if let Some(ra) = retry_after {
                r.extra.push(("Retry-After".into(), ra));
            }
            return Some(r);
        }
        Some(FaultAction::Reset) => return None,
        Some(FaultAction::Garbage) => {
            return Some(Response {
                status: 200,
                body: b"\x00garbage{{".to_vec(),
                content_type: "application/json",
                extra: Vec::new(),
                recorded: false,
            });
        }
        Some(FaultAction::Delay { ms }) => std::thread::sleep(Duration::from_millis(ms)),
        None => {}
    }
    let resp = match api {
        Api::Mgmt => mgmt(state, req),
        _ => comms(state, req),
    };
    // Status 0: a held poll whose connection `end_holds` closes without an answer.
    (resp.status != 0).then_some(resp)
}

// ------------------------------------------------------------------------------------
// Management API

fn mgmt(state: &State, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/security/user/authenticate") => {
            let Some(basic) = req.header("authorization").and_then(|v| v.strip_prefix("Basic ")) else {
                return Response::json(
                    401,
                    json!({"title": "Unauthorized", "detail": "No authorization token provided"}),
                );
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let (user, pass) = decoded.split_once(':').unwrap_or(("", ""));
            if user != state.opts.user || pass != state.opts.password {
                return Response::json(401, json!({"title": "Unauthorized", "detail": "Invalid credentials"}));
            }
            state.lock().logins += 1;
            let claims = Claims::create(jwt_simple::prelude::Duration::from_secs(900)).with_issuer("wazuh");
            match state.mgmt_key.authenticate(claims) {
                Ok(token) => Response::json(200, json!({"data": {"token": token}, "error": 0})),
                Err(_) => Response::error(500, "cannot sign token"),
            }
        }
        ("POST", "/agents") => {
            let Some(token) = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")) else {
                return Response::json(
                    401,
                    json!({"title": "Unauthorized", "detail": "No authorization token provided"}),
                );
            };
            if state.mgmt_key.verify_token::<NoCustomClaims>(token.trim(), None).is_err() {
                return Response::json(401, json!({"title": "Unauthorized", "detail": "Invalid token"}));
            }
            match validate_registration(state, &req.body) {
                Ok(record) => {
                    let mut st = state.lock();
                    if st.agents.contains_key(&record.id) {
                        return Response::json(
                            400,
                            json!({"title": "Bad Request", "detail": format!("Agent {} already exists", record.id)}),
                        );
                    }
                    st.agents.insert(record.id.clone(), record);
                    drop(st);
                    state.changed.notify_all();
                    Response::empty(201)
                }
                Err(m) => Response::json(400, json!({"title": "Bad Request", "detail": m})),
            }
        }
        _ => Response::error(404, "Not Found"),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 128
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '%'))
}

/// An agent id must be a UUID, and a v4 one when `v4_only`: refused in the Wazuh 6.0-era server's words.
fn check_id(id: &str, v4_only: bool) -> Result<(), String> {
    let parsed = uuid::Uuid::parse_str(id).map_err(|_| format!("'{id}' is not a valid UUID"))?;
    if v4_only && parsed.get_version_num() != 4 {
        return Err(format!("'{id}' is not a 'uuid4' - 'id'"));
    }
    Ok(())
}

fn validate_registration(state: &State, body: &[u8]) -> Result<AgentRecord, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).ok_or(format!("'{k}' is required and must be a string"));
    let id = s("id")?;
    check_id(id, state.opts.uuid_v4_only)?;
    let key = s("key")?;
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("'key' must be 32 alphanumeric characters".into());
    }
    let name = s("name")?;
    if !valid_name(name) {
        return Err(format!("'{name}' does not match ^[\\w\\-.%]+$ (at most 128)"));
    }
    if s("type")? != "Endpoint" {
        return Err("'type' must be 'Endpoint'".into());
    }
    if s("version")?.is_empty() {
        return Err("'version' must not be empty".into());
    }
    let host = v.get("host").and_then(Value::as_object).ok_or("'host' is required")?;
    for k in ["architecture", "hostname"] {
        if !host.get(k).is_some_and(Value::is_string) {
            return Err(format!("'host.{k}' must be a string"));
        }
    }
    let ips = host.get("ip").and_then(Value::as_array).ok_or("'host.ip' must be a list")?;
    if ips.iter().any(|ip| ip.as_str().and_then(|s| s.parse::<std::net::IpAddr>().ok()).is_none()) {
        return Err("'host.ip' must hold IP addresses".into());
    }
    let os = host.get("os").and_then(Value::as_object).ok_or("'host.os' is required")?;
    for k in ["name", "type", "version"] {
        if !os.get(k).is_some_and(Value::is_string) {
            return Err(format!("'host.os.{k}' must be a string"));
        }
    }
    Ok(AgentRecord { id: id.into(), key: key.into(), name: name.into(), registration: v.clone() })
}

// ------------------------------------------------------------------------------------
// Comms API

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Checks the bearer token; `Ok(uuid)` or the 401/403 response.
fn authorize(state: &State, req: &Request) -> Result<String, Response> {
    let Some(token) = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(Response::json(401, json!({"message": "Missing authorization token", "code": 401})));
    };
    let raw = state.lock().raw_tokens.get(token.trim()).cloned();
    if let Some(uuid) = raw.filter(|u| state.lock().agents.contains_key(u)) {
        return Ok(uuid);
    }
    let opts = VerificationOptions {
        // Expiry is checked below, to tell "expired" from "invalid" like the server does.
        time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(20 * 365 * 86_400)),
        accept_future: true,
        allowed_issuers: Some(HashSet::from([TOKEN_ISSUER.to_string()])),
        allowed_audiences: Some(HashSet::from([TOKEN_AUDIENCE.to_string()])),
        ..VerificationOptions::default()
    };
    let claims = state
        .key
        .verify_token::<AgentClaims>(token.trim(), Some(opts))
        .map_err(|_| Response::json(403, json!({"message": "Invalid token", "code": 2706})))?;
    let st = state.lock();
    let server_now = now_secs().saturating_add_signed(st.clock_offset);
    let expired = claims.expires_at.is_none_or(|exp| exp.as_secs() <= server_now);
    if expired || claims.custom.seq < st.min_seq {
        return Err(Response::json(403, json!({"message": "Token expired", "code": 2707})));
    }
    if !st.agents.contains_key(&claims.custom.uuid) {
        return Err(Response::json(403, json!({"message": "Agent does not exist", "code": 403})));
    }
    Ok(claims.custom.uuid)
}

fn comms(state: &State, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/api/v1/authentication") => authenticate(state, req),
        ("POST", "/api/v1/events/stateless") => events(state, req, false),
        ("POST", "/api/v1/events/stateful") => events(state, req, true),
        ("GET", "/api/v1/commands") => commands(state, req),
        ("GET", "/api/v1/files") => files(state, req),
        (
            _,
            "/api/v1/authentication"
            | "/api/v1/events/stateless"
            | "/api/v1/events/stateful"
            | "/api/v1/commands"
            | "/api/v1/files",
        ) => Response::error(405, "Method Not Allowed"),
        _ => Response::error(404, "Not Found"),
    }
}

fn authenticate(state: &State, req: &Request) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        uuid: String,
        key: String,
    }
    let body: Body = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return Response::error(400, &format!("Invalid body: {e}")),
    };
    let mut st = state.lock();
    let status = match st.agents.get(&body.uuid) {
        None => 403,
        Some(a) if a.key != body.key => 401,
        Some(_) => 200,
    };
    st.auth_calls.push(AuthCall { uuid: body.uuid.clone(), status, at: Instant::now() });
    let resp = match status {
        403 => Response::json(403, json!({"message": "Agent does not exist", "code": 403})),
        401 => Response::json(401, json!({"message": "Invalid key", "code": 401})),
        _ if st.token_claims.is_some() => {
            let seq = st.next_seq;
            st.next_seq += 1;
            let mut payload = json!({"iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "uuid": body.uuid, "seq": seq});
            for (k, v) in st.token_claims.iter().filter_map(Value::as_object).flatten() {
                payload[k] = v.clone();
            }
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let token =
                format!("{}.{}.{}", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&payload.to_string()), b64("mock"));
            st.raw_tokens.insert(token.clone(), body.uuid);
            Response::json(200, json!({"token": token}))
        }
        _ => {
            let seq = st.next_seq;
            st.next_seq += 1;
            let mut claims = Claims::with_custom_claims(
                AgentClaims { uuid: body.uuid, seq },
                jwt_simple::prelude::Duration::from_secs(st.token_lifetime),
            )
            .with_issuer(TOKEN_ISSUER)
            .with_audience(TOKEN_AUDIENCE);
            let iat = now_secs().saturating_add_signed(st.clock_offset);
            claims.issued_at = Some(jwt_simple::prelude::Duration::from_secs(iat));
            claims.invalid_before = None;
            claims.expires_at = Some(jwt_simple::prelude::Duration::from_secs(iat + st.token_lifetime));
            match state.key.authenticate(claims) {
                Ok(token) => Response::json(200, json!({"token": token})),
                Err(_) => Response::error(500, "cannot sign token"),
            }
        }
    };
    drop(st);
    state.changed.notify_all();
    resp
}

fn events(state: &State, req: &Request, stateful: bool) -> Response {
    if let Err(r) = authorize(state, req) {
        return r;
    }
    let inflated;
    let body: &[u8] = match req.header("content-encoding") {
        Some(enc) if enc.eq_ignore_ascii_case("gzip") && state.lock().refuse_gzip => {
            return Response::error(500, "Internal Server Error");
        }
        Some(enc) if enc.eq_ignore_ascii_case("gzip") => {
            let mut out = Vec::new();
            if flate2::read::GzDecoder::new(&req.body[..]).read_to_end(&mut out).is_err() {
                return Response::error(400, "Body is not valid gzip");
            }
            inflated = out;
            &inflated
        }
        Some(enc) if !enc.eq_ignore_ascii_case("identity") => {
            return Response::error(415, "Unsupported Content-Encoding");
        }
        _ => &req.body,
    };
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(_) => return Response::error(400, "Body is not UTF-8"),
    };
    if let Some(p) = state.lock().poison.clone() {
        if text.contains(&p) {
            return Response::error(400, &format!("Invalid event: contains {p}"));
        }
    }
    let timed = state.opts.timed_module.as_deref().filter(|_| !stateful);
    let parsed = match parse_events(text, stateful, state.opts.keep_events || timed.is_some()) {
        Ok(p) => p,
        Err(m) => return Response::error(400, &m),
    };
    let mut st = state.lock();
    let results: Vec<Value> = parsed
        .iter()
        .map(|e| {
            let id = e.header.get("id").and_then(Value::as_str).unwrap_or("").to_string();
            let op = e.header.get("operation").and_then(Value::as_str).unwrap_or("");
            let (result, status) = match op {
                _ if state.opts.documents => apply_document(&mut st.documents, op, &id, e.data.as_ref()),
                "create" => ("created", 201),
                "update" => ("updated", 200),
                _ => ("deleted", 200),
            };
            json!({"index": "wazuh-states", "id": id, "result": result, "status": status})
        })
        .collect();
    for e in parsed.iter().filter(|e| e.header.get("module").and_then(Value::as_str) == Some("command")) {
        let id = e.header.get("id").and_then(Value::as_str).unwrap_or("").to_string();
        let result = e.data.as_ref().and_then(|d| d.pointer("/command/result"));
        let code = result.and_then(|r| r.get("code")).and_then(Value::as_i64).unwrap_or(-1);
        let message = result.and_then(|r| r.get("message")).and_then(Value::as_str).unwrap_or("").to_string();
        st.command_result_at.entry(id.clone()).or_insert_with(Instant::now);
        st.command_results.push((id, code, message));
    }
    let mut resp = if stateful { Response::json(200, json!({"results": results})) } else { Response::empty(204) };
    record_locked(&mut st, Api::Comms, req, resp.status);
    resp.recorded = true;
    if stateful {
        st.stateful_count += parsed.len() as u64;
        if state.opts.keep_events {
            st.stateful.extend(parsed);
        }
    } else {
        st.stateless_count += parsed.len() as u64;
        let now = Instant::now();
        let mine =
            parsed.iter().filter(|e| timed.is_some_and(|m| e.header.get("module").and_then(Value::as_str) == Some(m)));
        st.timed.extend(mine.map(|e| (now, e.clone())));
        if state.opts.keep_events {
            st.stateless.extend(parsed);
        }
    }
    drop(st);
    state.changed.notify_all();
    resp
}

/// One stateful item against the document store, answered like the real server (per item,
/// inside the 200): the result text and status.
fn apply_document(docs: &mut HashMap<String, Value>, op: &str, id: &str, data: Option<&Value>) -> (&'static str, u16) {
    match (op, docs.contains_key(id)) {
        ("create", true) => ("version_conflict_engine_exception: document already exists", 409),
        ("update", false) => ("document missing", 404),
        ("delete", false) => ("not_found", 404),
        ("delete", true) => {
            docs.remove(id);
            ("deleted", 200)
        }
        (op, _) => {
            docs.insert(id.to_string(), data.cloned().unwrap_or(Value::Null));
            if op == "create" { ("created", 201) } else { ("updated", 200) }
        }
    }
}

/// Parses an events body strictly (docs/protocol.md, Events): the agent line, then header/data lines.
/// With `keep_data` false every data line is still validated, but only command results keep
/// theirs: building and freeing a tree per event made the mock slower than the agent on
/// large bodies (`make bench` measures its ceiling).
pub fn parse_events(text: &str, stateful: bool, keep_data: bool) -> Result<Vec<ReceivedEvent>, String> {
    if text.ends_with('\n') {
        return Err("Body must not end with a newline".into());
    }
    let mut lines = text.split('\n').enumerate();
    let (_, first) = lines.next().ok_or("Empty body")?;
    let agent_line: Value = serde_json::from_str(first).map_err(|e| format!("line 1: invalid JSON: {e}"))?;
    let agent = Arc::new(agent_line.get("agent").cloned().ok_or("line 1: missing 'agent'")?);
    for k in ["id", "name", "type", "version"] {
        if !agent.get(k).is_some_and(Value::is_string) {
            return Err(format!("line 1: 'agent.{k}' must be a string"));
        }
    }
    let groups = agent.get("groups").and_then(Value::as_array).ok_or("line 1: 'agent.groups' must be a list")?;
    if groups.iter().any(|g| g.as_str().is_none_or(str::is_empty)) {
        return Err("line 1: 'agent.groups' entries must be non-empty strings".into());
    }
    if !agent.get("host").is_some_and(Value::is_object) {
        return Err("line 1: 'agent.host' must be an object".into());
    }
    let mut out = Vec::new();
    while let Some((i, line)) = lines.next() {
        let n = i + 1;
        let header: Value = serde_json::from_str(line).map_err(|e| format!("line {n}: invalid JSON: {e}"))?;
        if header.get("module").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(format!("line {n}: header needs a non-empty 'module'"));
        }
        let op = header.get("operation").and_then(Value::as_str);
        let needs_data = if stateful {
            let op = op.ok_or(format!("line {n}: stateful header needs 'operation'"))?;
            if !matches!(op, "create" | "update" | "delete") {
                return Err(format!("line {n}: invalid operation '{op}'"));
            }
            if !header.get("id").and_then(Value::as_str).is_some_and(|id| !id.is_empty() && id.len() <= 512) {
                return Err(format!("line {n}: stateful header needs a non-empty 'id'"));
            }
            op != "delete"
        } else {
            if op.is_some() {
                return Err(format!("line {n}: stateless header must not have 'operation'"));
            }
            true
        };
        let data = if needs_data {
            let (j, line) = lines.next().ok_or(format!("line {n}: header without a data line"))?;
            let invalid = |e: serde_json::Error| format!("line {}: invalid JSON: {e}", j + 1);
            let not_object = || format!("line {}: data must be an object", j + 1);
            if keep_data || header.get("module").and_then(Value::as_str) == Some("command") {
                let d: Value = serde_json::from_str(line).map_err(invalid)?;
                if !d.is_object() {
                    return Err(not_object());
                }
                Some(d)
            } else {
                serde_json::from_str::<serde::de::IgnoredAny>(line).map_err(invalid)?;
                if !line.trim_start().starts_with('{') {
                    return Err(not_object());
                }
                None
            }
        } else {
            None
        };
        out.push(ReceivedEvent { agent: agent.clone(), header, data });
    }
    if out.is_empty() {
        return Err("No events in body".into());
    }
    Ok(out)
}

fn commands(state: &State, req: &Request) -> Response {
    let uuid = match authorize(state, req) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let mut st = state.lock();
    let deadline = Instant::now() + st.command_hold;
    let epoch = st.hold_epoch;
    loop {
        if let Some(q) = st.commands.get_mut(&uuid) {
            if !q.is_empty() {
                let cmds: Vec<Value> = q.drain(..).collect();
                let now = Instant::now();
                for c in &cmds {
                    if let Some(id) = c.get("document_id").and_then(Value::as_str) {
                        st.command_delivered.push((id.to_string(), now));
                    }
                }
                return Response::json(200, json!({"commands": cmds}));
            }
        }
        let now = Instant::now();
        if state.stopping.load(Ordering::SeqCst) {
            return Response::error(503, "Server shutting down");
        }
        if st.unavailable {
            return Response::error(503, "Service unavailable");
        }
        if st.hold_epoch != epoch {
            return if st.hold_drop {
                Response::empty(0)
            } else {
                Response::json(408, json!({"message": "Request exceeded the processing time limit", "code": 408}))
            };
        }
        if now >= deadline {
            return Response::json(408, json!({"message": "Request exceeded the processing time limit", "code": 408}));
        }
        st = state.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

fn files(state: &State, req: &Request) -> Response {
    if let Err(r) = authorize(state, req) {
        return r;
    }
    let name = req.query.split('&').find_map(|kv| kv.strip_prefix("file_name=")).unwrap_or("");
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Response::error(400, "Invalid file_name");
    }
    match state.lock().files.get(name) {
        Some(content) => Response {
            status: 200,
            body: content.clone(),
            content_type: "application/octet-stream",
            extra: Vec::new(),
            recorded: false,
        },
        None => Response::error(404, "File not found"),
    }
}

// ------------------------------------------------------------------------------------
// Admin API (plain HTTP, for the binary and scripts)

fn admin(state: &State, req: &Request) -> Response {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let ok = || Response::json(200, json!({"ok": true}));
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/admin/state") => Response::json(200, summary(state)),
        ("POST", "/admin/commands") => {
            let Some(agent) = body.get("agent").and_then(Value::as_str) else {
                return Response::error(400, "need {\"agent\": uuid, \"command\": {...}}");
            };
            // `commands`: a list queued at once (one answer with many commands).
            let list = match body.get("commands").and_then(Value::as_array) {
                Some(list) => list.clone(),
                None => vec![body.get("command").cloned().unwrap_or(Value::Null)],
            };
            enqueue(state, agent, list);
            ok()
        }
        ("POST", "/admin/faults") => match serde_json::from_value::<Fault>(body) {
            Ok(f) => {
                state.lock().faults.push(f);
                ok()
            }
            Err(e) => Response::error(400, &e.to_string()),
        },
        ("POST", "/admin/token-lifetime") => match body.get("seconds").and_then(Value::as_u64) {
            Some(s) => {
                state.lock().token_lifetime = s;
                ok()
            }
            None => Response::error(400, "need {\"seconds\": n}"),
        },
        ("POST", "/admin/token-claims") => {
            state.lock().token_claims = body.get("claims").filter(|c| c.is_object()).cloned();
            ok()
        }
        ("POST", "/admin/expire-tokens") => {
            let mut st = state.lock();
            st.min_seq = st.next_seq;
            ok()
        }
        ("POST", "/admin/down") => {
            state.lock().down = body.get("down").and_then(Value::as_bool).unwrap_or(true);
            ok()
        }
        ("POST", "/admin/files") => {
            match (body.get("name").and_then(Value::as_str), body.get("content").and_then(Value::as_str)) {
                (Some(n), Some(c)) => {
                    state.lock().files.insert(n.to_string(), c.as_bytes().to_vec());
                    ok()
                }
                _ => Response::error(400, "need {\"name\": ..., \"content\": ...}"),
            }
        }
        _ => Response::error(404, "Not Found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = r#"{"agent":{"groups":[],"host":{},"id":"u","name":"n","type":"Endpoint","version":"1"}}"#;

    #[test]
    fn event_bodies() {
        let ok = format!("{AGENT}\n{{\"module\":\"logcollector\"}}\n{{\"event\":{{}}}}");
        assert_eq!(parse_events(&ok, false, true).unwrap().len(), 1);
        let del = format!("{AGENT}\n{{\"module\":\"inventory\",\"operation\":\"delete\",\"id\":\"x\"}}");
        assert_eq!(parse_events(&del, true, true).unwrap().len(), 1);
        for bad in [
            format!("{AGENT}\n"),
            AGENT.to_string(),
            format!("{AGENT}\n{{\"module\":\"m\"}}"),
            format!("{AGENT}\n{{\"module\":\"\"}}\n{{}}"),
            "{}\n{\"module\":\"m\"}\n{}".to_string(),
            format!("{AGENT}\n{{\"module\":\"m\"}}\n[1]"),
            format!("{AGENT}\n{{\"module\":\"m\"}}\n{{\"a\":"),
            format!("{AGENT}\n{{\"module\":\"m\"}}\n{{}} x"),
        ] {
            // Validation is as strict when the data is not kept.
            for keep in [true, false] {
                assert!(parse_events(&bad, false, keep).is_err(), "{bad}");
            }
        }
        let kept = parse_events(&ok, false, false).unwrap();
        assert!(kept[0].data.is_none(), "data only kept when asked");
        let upsert = format!("{AGENT}\n{{\"module\":\"inventory\",\"operation\":\"upsert\",\"id\":\"x\"}}\n{{}}");
        assert!(parse_events(&upsert, true, true).is_err());
    }

    #[test]
    fn a_v4_only_server_refuses_other_ids_in_the_real_servers_words() {
        let v7 = "01a22bde-0000-7000-8000-000000000000";
        assert_eq!(check_id(v7, true), Err(format!("'{v7}' is not a 'uuid4' - 'id'")));
        assert_eq!(check_id(v7, false), Ok(()));
        assert_eq!(check_id("0ac1fa4b-0000-4000-8000-000000000000", true), Ok(()));
        assert_eq!(check_id("x", false), Err("'x' is not a valid UUID".into()));
    }

    #[test]
    fn the_document_store_answers_like_the_real_server() {
        let mut docs = HashMap::new();
        let d = json!({"package": {}});
        assert_eq!(apply_document(&mut docs, "update", "a", Some(&d)), ("document missing", 404));
        assert_eq!(apply_document(&mut docs, "delete", "a", None), ("not_found", 404));
        assert!(docs.is_empty(), "failed items change nothing");
        assert_eq!(apply_document(&mut docs, "create", "a", Some(&d)), ("created", 201));
        assert_eq!(apply_document(&mut docs, "create", "a", Some(&json!({}))).1, 409);
        assert_eq!(docs["a"], d, "a refused create leaves the document");
        assert_eq!(apply_document(&mut docs, "update", "a", Some(&json!({"x": 1}))), ("updated", 200));
        assert_eq!(docs["a"], json!({"x": 1}));
        assert_eq!(apply_document(&mut docs, "delete", "a", None), ("deleted", 200));
        assert!(docs.is_empty());
    }
}
