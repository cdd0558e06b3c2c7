//! Shared fixtures: a mock server and a temp dir per test, a config file pointing the
//! agent at them, and helpers to run the binary.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wazuh_mock_server::{MockServer, Options};

pub const PASSWORD: &str = "Sup3r-S3cret-Pw";

/// The agent under test; `WAZUH_AGENT_TEST_BIN` runs the suite against another build (to
/// show that a new test fails on an older binary).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("WAZUH_AGENT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wazuh-agent").into())
    })
}

/// One test's world: temp dir, mock server, config file.
pub struct Env {
    pub dir: TempDir,
    pub mock: MockServer,
    pub config: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        Env::with(|_| {})
    }

    /// Starts the mock with options adjusted by `tweak`, and writes a default config.
    pub fn with(tweak: impl FnOnce(&mut Options)) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut opts = Options::new(&dir.path().join("mock"));
        opts.password = PASSWORD.into();
        tweak(&mut opts);
        let mock = MockServer::start(opts).expect("mock server starts");
        let config = dir.path().join("agent.toml");
        let env = Env { dir, mock, config };
        env.write_config("");
        env
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes the config file: the test's sections first (`extra`), then defaults for
    /// whatever it did not set. `extra` uses dotted keys at the top (`server.verify = …`).
    pub fn write_config(&self, extra: &str) {
        let mut keys: Vec<(String, String)> = vec![
            ("agent.data_dir".into(), format!("{:?}", self.data_dir().display().to_string())),
            ("agent.run_dir".into(), format!("{:?}", self.dir.path().join("run").display().to_string())),
            ("server.url".into(), format!("{:?}", self.mock.comms_url())),
            ("server.registration_url".into(), format!("{:?}", self.mock.mgmt_url())),
            ("server.ca_file".into(), format!("{:?}", self.mock.ca_file().display().to_string())),
            ("server.request_timeout".into(), "\"5s\"".into()),
            ("retry.initial".into(), "\"100ms\"".into()),
            ("retry.max".into(), "\"1s\"".into()),
            ("log.level".into(), "\"debug\"".into()),
            // The inventory of the test machine would add events to every test; the
            // inventory tests switch it on with a fixture root.
            ("inventory.enabled".into(), "false".into()),
        ];
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').expect("extra config lines are key = value");
            let k = k.trim().to_string();
            keys.retain(|(existing, _)| *existing != k);
            keys.push((k, v.trim().to_string()));
        }
        let mut text = String::new();
        let mut sections: Vec<&str> = keys.iter().map(|(k, _)| k.split_once('.').unwrap().0).collect();
        sections.dedup();
        sections.sort();
        sections.dedup();
        for s in sections {
            text.push_str(&format!("[{s}]\n"));
            for (k, v) in &keys {
                let (sec, name) = k.split_once('.').unwrap();
                if sec == s {
                    text.push_str(&format!("{name} = {v}\n"));
                }
            }
        }
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config").arg(&self.config).env_remove("WAZUH_REGISTRATION_PASSWORD").env_remove("WAZUH_AGENT_CONFIG");
        c.env_remove("WAZUH_REGISTRATION_KEY");
        c
    }

    pub fn password_file(&self) -> PathBuf {
        let p = self.dir.path().join("password");
        std::fs::write(&p, format!("{PASSWORD}\n")).unwrap();
        p
    }

    /// `--register --user wazuh --password-file …` plus `args`.
    pub fn register(&self, args: &[&str]) -> Output {
        self.register_cmd(args).output().expect("run wazuh-agent")
    }

    /// As [`register`](Self::register), with extra environment variables.
    pub fn register_with_env(&self, vars: &[(&str, &str)]) -> Output {
        self.register_with_env_args(vars, &[])
    }

    /// As [`register_with_env`](Self::register_with_env), with extra arguments.
    pub fn register_with_env_args(&self, vars: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = self.register_cmd(args);
        for (k, v) in vars {
            c.env(k, v);
        }
        c.output().expect("run wazuh-agent")
    }

    fn register_cmd(&self, args: &[&str]) -> Command {
        let pw = self.password_file();
        let mut c = self.cmd();
        c.args(["--register", "--user", "wazuh", "--password-file"]).arg(pw).args(args);
        c
    }

    /// Registers successfully and returns the UUID.
    pub fn registered(&self) -> String {
        let out = self.register(&[]);
        assert!(out.status.success(), "registration failed: {}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts the agent in run mode, stderr captured to a file in the temp dir.
    pub fn spawn_agent(&self) -> Agent {
        let log = self.dir.path().join("agent.log");
        let child =
            self.cmd().stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("spawn agent");
        Agent { child, log }
    }
}

/// A running agent process; killed on drop if still running.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit up to `timeout`; returns the exit code (None: still running or killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Polls `check` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A TCP port on 127.0.0.1 with nothing listening (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A minimal HTTP CONNECT proxy on 127.0.0.1 that tunnels to any 127.0.0.1 port and counts
/// the tunnels it opened. It requires `Proxy-Authorization` when `basic` is given.
pub struct ConnectProxy {
    pub port: u16,
    pub tunnels: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnectProxy {
    pub fn start(basic: Option<&str>) -> ConnectProxy {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tunnels = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = tunnels.clone();
        let expected = basic.map(|b| format!("Basic {b}"));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let count = count.clone();
                let expected = expected.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(client.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut auth = None;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("proxy-authorization") {
                                auth = Some(v.trim().to_string());
                            }
                        }
                    }
                    let mut client = client;
                    if expected.is_some() && auth != expected {
                        let _ = client
                            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n");
                        return;
                    }
                    let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
                    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    let (mut c1, mut u1) = (client, upstream);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut u2);
                        let _ = u2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut u1, &mut c1);
                    let _ = c1.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        ConnectProxy { port, tunnels }
    }
}

/// A stateless event line whose `event.original` is `msg-<i>`.
pub fn stateless(i: usize) -> String {
    format!(
        r#"{{"header":{{"module":"logcollector","collector":"file"}},"data":{{"event":{{"original":"msg-{i}"}},"log":{{"file":{{"path":"/var/log/test.log"}}}}}}}}"#
    )
}

/// A stateful inventory create whose id is `pkg-<i>`.
pub fn stateful(i: usize) -> String {
    format!(
        r#"{{"header":{{"module":"inventory","collector":"packages","operation":"create","id":"pkg-{i}"}},"data":{{"package":{{"name":"p{i}","version":"1.0"}}}}}}"#
    )
}

pub fn lines(items: impl IntoIterator<Item = String>) -> String {
    let mut s = items.into_iter().collect::<Vec<_>>().join("\n");
    s.push('\n');
    s
}

/// `event.original` of every stateless event the mock received.
pub fn originals(mock: &MockServer) -> Vec<String> {
    mock.stateless_events()
        .iter()
        .filter_map(|e| e.data.as_ref()?.pointer("/event/original")?.as_str().map(str::to_string))
        .collect()
}

/// `id` of every stateful event the mock received.
pub fn stateful_ids(mock: &MockServer) -> Vec<String> {
    mock.stateful_events().iter().filter_map(|e| e.header.get("id")?.as_str().map(str::to_string)).collect()
}

/// Sorted and checked for duplicates.
pub fn unique(mut v: Vec<String>) -> (usize, usize) {
    let total = v.len();
    v.sort();
    v.dedup();
    (v.len(), total - v.len())
}

impl Env {
    /// Runs `--send` with `input` on stdin; returns its output.
    pub fn send(&self, input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .arg("--send")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn --send");
        let mut stdin = child.stdin.take().unwrap();
        let data = input.as_bytes().to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().expect("--send output");
        writer.join().unwrap();
        out
    }

    /// Parsed reply of `--send`.
    pub fn send_ok(&self, input: &str) -> serde_json::Value {
        let out = self.send(input);
        assert!(out.status.success(), "--send failed: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("reply is JSON")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("ingest.sock")
    }

    /// Registers, starts the agent and waits until it listens and has a token.
    pub fn running_agent(&self) -> Agent {
        if !self.data_dir().join("credentials.json").exists() {
            self.registered();
        }
        let before = self.mock.auth_calls().iter().filter(|c| c.status == 200).count();
        let agent = self.spawn_agent();
        assert!(
            wait_for(Duration::from_secs(15), || self.socket().exists()
                && self.mock.auth_calls().iter().filter(|c| c.status == 200).count() > before),
            "agent did not come up: {}",
            agent.log()
        );
        agent
    }
}

/// The agent's UUID, from the credentials it stored.
pub fn uuid(env: &Env) -> String {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.data_dir().join("credentials.json")).unwrap()).unwrap();
    c["uuid"].as_str().unwrap().to_string()
}

/// A command as the server sends it (`timeout` in seconds, or none: the default).
pub fn command(id: &str, name: &str, args: serde_json::Value, timeout: Option<u64>) -> serde_json::Value {
    let mut c = serde_json::json!({"document_id": id, "source": "Users/Services", "user": "Management API",
        "action": {"name": name, "version": "5.0.0", "args": args}, "status": "pending"});
    if let Some(t) = timeout {
        c["timeout"] = serde_json::json!(t);
    }
    c
}

/// The result (code, message) the agent reported for command `id`, once it arrives.
pub fn try_result_of(mock: &MockServer, id: &str, within: Duration) -> Option<(i64, String)> {
    mock.wait_until(within, |m| m.command_results().iter().any(|(i, _, _)| i == id));
    mock.command_results().into_iter().find(|(i, _, _)| i == id).map(|(_, c, m)| (c, m))
}

/// As [`try_result_of`]; no result within `within` fails the test.
pub fn result_of(mock: &MockServer, id: &str, within: Duration) -> (i64, String) {
    try_result_of(mock, id, within).unwrap_or_else(|| panic!("no result for command {id}"))
}

/// A registered, running agent with `config` (dotted keys) over the test defaults, its
/// mock holding polls for 300 ms; returns the environment, the agent and its UUID.
pub fn running_with(config: &str) -> (Env, Agent, String) {
    let env = Env::with(|o| o.command_hold = Duration::from_millis(300));
    env.write_config(&format!("events.batch_interval = \"100ms\"\n{config}"));
    let agent = env.running_agent();
    let id = uuid(&env);
    (env, agent, id)
}

// Followed files: shared by the logcollector and red-team modules.

pub fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

pub fn lines_of(prefix: &str, range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("{prefix}-{i}\n")).collect()
}

/// Lines of about `width` bytes: `prefix-i-xxxx…`.
pub fn wide_lines(prefix: &str, range: std::ops::Range<usize>, width: usize) -> String {
    range.map(|i| format!("{prefix}-{i}-{}\n", "x".repeat(width))).collect()
}

/// Logcollector originals received so far, in order.
pub fn received(env: &Env) -> Vec<String> {
    env.mock
        .stateless_events()
        .iter()
        .filter(|e| e.header["module"] == "logcollector")
        .map(|e| e.data.as_ref().unwrap()["event"]["original"].as_str().unwrap().to_string())
        .collect()
}

/// The distinct `i` of received lines `prefix-i[-…]`.
pub fn indices(env: &Env, prefix: &str) -> BTreeSet<usize> {
    let p = format!("{prefix}-");
    received(env)
        .iter()
        .filter_map(|l| l.strip_prefix(&p))
        .filter_map(|rest| rest.split('-').next().and_then(|n| n.parse().ok()))
        .collect()
}

/// Waits until every `prefix-i` of `0..n` arrived (or `within` passed); returns the missing count.
pub fn missing(env: &Env, prefix: &str, n: usize, within: Duration) -> usize {
    env.mock.wait_until(within, |_| indices(env, prefix).len() >= n);
    n - indices(env, prefix).range(0..n).count()
}

/// Distinct and duplicate counts of received lines starting with `prefix-`.
pub fn dup_count(env: &Env, prefix: &str) -> (usize, usize) {
    let p = format!("{prefix}-");
    unique(received(env).into_iter().filter(|l| l.starts_with(&p)).collect())
}

pub fn setup(files: &[&str], extra: &str) -> (Env, PathBuf) {
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let list: Vec<String> = files.iter().map(|f| format!("{:?}", logs.join(f).display().to_string())).collect();
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.start = \"beginning\"\nlogcollector.files = [{}]\n{extra}",
        list.join(", ")
    ));
    (env, logs)
}

/// `field` of /proc/<pid>/status in kB.
pub fn proc_kb(pid: u32, field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// Whether the agent holds `path` open.
pub fn follows(agent: &Agent, path: &Path) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|p| p == path)
}

/// Whether the agent holds a deleted or renamed file open whose link names `name`.
pub fn follows_named(agent: &Agent, name: &str) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|p| p.to_string_lossy().contains(name))
}

/// The SysV script (`scripts/init.d/wazuh-agent`) run by `sh` with `action` for `env`'s agent;
/// no defaults file is read.
pub fn sysv_script(env: &Env, action: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/init.d/wazuh-agent"))
        .arg(action)
        .env("WAZUH_AGENT_BIN", bin())
        .env("WAZUH_AGENT_CONFIG", &env.config)
        .env("WAZUH_AGENT_DEFAULTS", env.dir.path().join("no-defaults"));
    c
}
