//! `make bench`: starts the mock server in-process and a real `wazuh-agent` process, drives
//! load through the agent's ingest socket and prints one table plus
//! `target/bench/latest.json`. Numbers, not pass/fail: read them, compare them.
//!
//! Phases: `core` (idle, command latency, stateless, logcollector, stateful, backlog; one
//! agent), then `fim` (file integrity monitoring: first scan and rescan of 100 000 files,
//! realtime latency, a write storm under `fim.max_eps`; fim.rs). `--only PHASE` runs one.
//!
//! Usage: wazuh-bench [--agent PATH] [--events N] [--quick] [--only core|fim]

mod fim;
mod ingest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wazuh_mock_server::{MockServer, Options};

const USAGE: &str = "usage: wazuh-bench [--agent PATH] [--events N] [--quick] [--only core|fim]";

struct Args {
    agent: PathBuf,
    events: usize,
    quick: bool,
    /// `--only`: one phase, `core` or `fim`; `None`: both.
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args { agent: PathBuf::from("target/release/wazuh-agent"), events: 200_000, quick: false, only: None };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--agent" => a.agent = PathBuf::from(it.next().expect("--agent PATH")),
            "--events" => a.events = it.next().and_then(|v| v.parse().ok()).expect("--events N"),
            "--quick" => a.quick = true,
            "--only" => a.only = Some(it.next().filter(|p| p == "core" || p == "fim").expect(USAGE)),
            other => panic!("unknown argument {other}; {USAGE}"),
        }
    }
    a
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS, so the next peak is measured from here.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn wakeups(pid: u32) -> u64 {
    // Voluntary + involuntary context switches of every thread: each is a wakeup.
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in text.lines() {
                if l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches") {
                    total += l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                }
            }
        }
    }
    total
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

fn stateless_line(i: usize) -> String {
    // About 200 bytes, like a syslog line with its header.
    format!(
        r#"{{"header":{{"module":"logcollector","collector":"file"}},"data":{{"event":{{"original":"Nov 26 15:00:00 web-01 sshd[811]: Accepted publickey for root from 10.0.0.1 port 52211 ssh2 #{i:08}"}}}}}}"#
    )
}

fn stateful_line(i: usize) -> String {
    format!(
        r#"{{"header":{{"module":"inventory","collector":"packages","operation":"create","id":"{i:040}"}},"data":{{"package":{{"architecture":"amd64","name":"pkg{i}","size":1234,"type":"deb","version":"1.0.{i}","description":"benchmark package {i:08}"}}}}}}"#
    )
}

/// The load, built before the clock starts so the generator's own formatting does not
/// compete with the agent and the mock for the CPU: per producer, one buffer per connection.
struct Load(Vec<Vec<Vec<u8>>>);

fn prepare(n: usize, producers: usize, per_conn: usize, line: fn(usize) -> String, base: usize) -> Load {
    Load(
        (0..producers)
            .map(|p| {
                let mine: Vec<usize> = (p..n).step_by(producers).collect();
                mine.chunks(per_conn)
                    .map(|chunk| {
                        let mut buf = Vec::with_capacity(chunk.len() * 260);
                        for i in chunk {
                            buf.extend_from_slice(line(base + i).as_bytes());
                            buf.push(b'\n');
                        }
                        buf
                    })
                    .collect()
            })
            .collect(),
    )
}

/// Sends the load through its producers' parallel connections; returns when every reply
/// arrived, with the total accepted.
fn send(socket: &Path, load: Load) -> u64 {
    let threads: Vec<_> = load
        .0
        .into_iter()
        .map(|conns| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || conns.iter().map(|buf| ingest::send_one(&socket, buf)).sum::<u64>())
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

fn produce(socket: &Path, n: usize, producers: usize, per_conn: usize, line: fn(usize) -> String, base: usize) -> u64 {
    send(socket, prepare(n, producers, per_conn, line, base))
}

fn events_requests(mock: &MockServer, prefix: &str) -> usize {
    mock.requests().iter().filter(|r| r.path.starts_with(prefix)).count()
}

/// The mock's own ceiling: one keep-alive TLS client (like the agent's uploader) posting
/// pre-built bodies of `per` events (the agent's own average batch in the burst, so both
/// pay the same per-body costs).
fn mock_ceiling(mock: &MockServer, creds: &Value, per: usize, seconds: f64) -> f64 {
    let ca = std::fs::read(mock.ca_file()).unwrap();
    let cert = ureq::tls::Certificate::from_pem(&ca).unwrap();
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&[cert])).build();
    let agent: ureq::Agent = ureq::Agent::config_builder().tls_config(tls).proxy(None).build().into();
    let auth = json!({"uuid": creds["uuid"], "key": creds["key"]}).to_string();
    let mut r = agent.post(format!("{}/api/v1/authentication", mock.comms_url())).send(auth.as_bytes()).unwrap();
    let token: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let mut body = format!(
        r#"{{"agent":{{"groups":[],"host":{{"architecture":"x86_64","hostname":"b","ip":["127.0.0.1"],"os":{{"name":"Linux","type":"Linux","version":"1"}}}},"id":{},"name":"b","type":"Endpoint","version":"0"}}}}"#,
        creds["uuid"]
    );
    for i in 0..per {
        let v: Value = serde_json::from_str(&stateless_line(i)).unwrap();
        body.push('\n');
        body.push_str(&v["header"].to_string());
        body.push('\n');
        body.push_str(&v["data"].to_string());
    }
    let url = format!("{}/api/v1/events/stateless", mock.comms_url());
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        let mut resp = agent
            .post(&url)
            .header("Authorization", &bearer)
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
        let _ = resp.body_mut().read_to_vec();
        sent += per;
    }
    sent as f64 / start.elapsed().as_secs_f64()
}

/// Enqueues `n` commands one after another (each after the previous result arrived) and
/// returns, sorted, enqueue → delivery (poll answered) and enqueue → result received, in ms.
fn command_latencies(mock: &MockServer, uuid: &str, tag: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    for i in 0..n {
        let id = format!("{tag}-{i}");
        mock.enqueue_command(uuid, json!({"document_id": id, "action": {"name": "bench-noop"}, "status": "pending"}));
        wait_for(Duration::from_secs(10), || mock.command_results().iter().any(|r| r.0 == id));
    }
    let ms = |v: Vec<(String, Instant, Instant)>| {
        let mut out: Vec<f64> = v
            .iter()
            .filter(|d| d.0.starts_with(&format!("{tag}-")))
            .map(|(_, e, d)| d.duration_since(*e).as_secs_f64() * 1000.0)
            .collect();
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    };
    (ms(mock.command_deliveries()), ms(mock.command_roundtrips()))
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits until the mock counted `target` events of one kind (0 stateless, 1 stateful); panics
/// with both counters and the agent's state.json if delivery stops progressing for 60 s.
fn await_delivery(mock: &MockServer, stateful: bool, target: u64, what: &str, run_dir: &Path) {
    let count = || if stateful { mock.event_counts().1 } else { mock.event_counts().0 };
    let (mut last, mut progress) = (count(), Instant::now());
    while count() < target {
        let now = count();
        if now != last {
            (last, progress) = (now, Instant::now());
        } else if progress.elapsed() > Duration::from_secs(60) {
            panic!(
                "{what}: stalled at {now} of {target} events (mock counts {:?}); agent state: {}",
                mock.event_counts(),
                std::fs::read_to_string(run_dir.join("state.json")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pids of the agents running now. Release builds abort on panic, so `Agent`'s Drop would
/// not run: the panic hook set in `main` kills these, and a failed run leaves none behind.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

struct Agent {
    child: Child,
}

impl Agent {
    fn spawn(bin: &Path, config: &Path) -> Agent {
        let child = Command::new(bin).arg("--config").arg(config).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let child = child.expect("spawn wazuh-agent");
        RUNNING.lock().unwrap().push(child.id());
        Agent { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 30 s).
    fn stop(mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        wait_for(Duration::from_secs(30), || self.child.try_wait().is_ok_and(|s| s.is_some()));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        RUNNING.lock().unwrap().retain(|p| *p != self.child.id());
    }
}

/// `<home>/agent.toml`: data and run dirs and the log file in `home`, the mock's URLs, quick
/// retries, events batched every 100 ms, inventory off, logging at `level`, then `extra` (tables).
fn agent_config(home: &Path, mock: &MockServer, level: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(home).unwrap();
    let config = home.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndata_dir = {:?}\nrun_dir = {:?}\n[server]\nurl = {:?}\nregistration_url = {:?}\nca_file = {:?}\n[events]\noverflow = \"block\"\nbatch_interval = \"100ms\"\n[retry]\ninitial = \"100ms\"\nmax = \"500ms\"\n[inventory]\nenabled = false\n[log]\nlevel = {level:?}\nfile = {:?}\n{extra}",
            home.join("data").display().to_string(),
            home.join("run").display().to_string(),
            mock.comms_url(),
            mock.mgmt_url(),
            mock.ca_file().display().to_string(),
            home.join("agent.log").display().to_string(),
        ),
    )
    .unwrap();
    config
}

/// `--register` with `config`; returns the credentials it wrote.
fn register(bin: &Path, config: &Path, home: &Path) -> Value {
    let reg = Command::new(bin)
        .args(["--config"])
        .arg(config)
        .args(["--register", "--user", "wazuh"])
        .env("WAZUH_REGISTRATION_PASSWORD", "wazuh")
        .output()
        .unwrap();
    assert!(reg.status.success(), "registration: {}", String::from_utf8_lossy(&reg.stderr));
    serde_json::from_str(&std::fs::read_to_string(home.join("data/credentials.json")).unwrap()).unwrap()
}

fn main() {
    let a = args();
    let agent_bin =
        std::fs::canonicalize(&a.agent).unwrap_or_else(|_| panic!("{} not found: run `make bench`", a.agent.display()));
    let dir = std::env::temp_dir().join(format!("wazuh-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for pid in RUNNING.try_lock().map(|r| r.clone()).unwrap_or_default() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        default_hook(info);
    }));
    let mut out = serde_json::Map::new();
    if a.only.as_deref() != Some("fim") {
        core(&a, &agent_bin, &dir, &mut out);
    }
    if a.only.as_deref() != Some("core") {
        eprintln!("bench: FIM …");
        fim::run(&agent_bin, &dir.join("fim"), a.quick, &mut out);
    }

    let report = Value::Object(out);
    println!("{:<34} {:>14}", "metric", "value");
    if let Value::Object(m) = &report {
        for (k, v) in m {
            let shown = match v.as_f64() {
                Some(f) if f.fract() != 0.0 => format!("{f:.2}"),
                _ => v.to_string(),
            };
            println!("{k:<34} {shown:>14}");
        }
    }
    let _ = std::fs::create_dir_all("target/bench");
    std::fs::write("target/bench/latest.json", serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    println!("\nwritten to target/bench/latest.json");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The core phases, one agent with five followed files: idle cost, command latency, stateless
/// burst, logcollector (also during an outage), the mock's ceiling, stateful, a backlog.
fn core(a: &Args, agent_bin: &Path, dir: &Path, out: &mut serde_json::Map<String, Value>) {
    let mut opts = Options::new(&dir.join("mock"));
    opts.keep_events = false;
    opts.command_hold = Duration::from_secs(30);
    opts.max_body = 64 << 20;
    let mock = MockServer::start(opts).expect("mock starts");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    for i in 0..5 {
        std::fs::write(logs.join(format!("f{i}.log")), "").unwrap();
    }
    let extra = format!("[logcollector]\nfiles = [{:?}]\n", logs.join("*.log").display().to_string());
    let config = agent_config(dir, &mock, "warn", &extra);
    let creds = register(agent_bin, &config, dir);
    let agent = Agent::spawn(agent_bin, &config);
    let pid = agent.pid();
    let run_dir = dir.join("run");
    let socket = run_dir.join("ingest.sock");
    assert!(wait_for(Duration::from_secs(10), || socket.exists() && !mock.auth_calls().is_empty()), "agent up");

    // Idle: RSS after registration and start, threads, fds, CPU and wakeups.
    let idle_secs = if a.quick { 3.0 } else { 30.0 };
    std::thread::sleep(Duration::from_secs(if a.quick { 1 } else { 10 }));
    out.insert("idle_rss_kib".into(), json!(proc_status(pid, "VmRSS:")));
    // The split: anonymous memory is the agent's own; file pages are the binary and libc,
    // shared with the page cache.
    out.insert("idle_rss_anon_kib".into(), json!(proc_status(pid, "RssAnon:")));
    out.insert("idle_rss_file_kib".into(), json!(proc_status(pid, "RssFile:")));
    out.insert("threads_idle".into(), json!(proc_status(pid, "Threads:")));
    out.insert("fds_idle".into(), json!(fds(pid)));
    let (c0, w0) = (cpu_secs(pid), wakeups(pid));
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    out.insert("idle_cpu_percent".into(), json!((cpu_secs(pid) - c0) / idle_secs * 100.0));
    out.insert("idle_wakeups_per_s".into(), json!((wakeups(pid) - w0) as f64 / idle_secs));

    eprintln!("bench: Command delivery latency …");
    // Command delivery latency: idle, then with 10 000 events/s flowing.
    let uuid = creds["uuid"].as_str().unwrap().to_string();
    let idle_lat = command_latencies(&mock, &uuid, "idle", if a.quick { 20 } else { 100 });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (socket, stop) = (socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 1_000_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                produce(&socket, 1000, 1, 1000, stateless_line, i);
                i += 1000;
                std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
            }
        })
    };
    let load_lat = command_latencies(&mock, &uuid, "load", if a.quick { 20 } else { 100 });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    for (name, (delivery, roundtrip)) in [("idle", &idle_lat), ("load", &load_lat)] {
        out.insert(format!("command_{name}_delivery_p50_ms"), json!(pct(delivery, 0.5)));
        out.insert(format!("command_{name}_delivery_p99_ms"), json!(pct(delivery, 0.99)));
        out.insert(format!("command_{name}_result_p50_ms"), json!(pct(roundtrip, 0.5)));
        out.insert(format!("command_{name}_result_p99_ms"), json!(pct(roundtrip, 0.99)));
        out.insert(format!("command_{name}_result_max_ms"), json!(pct(roundtrip, 1.0)));
    }
    let settle = mock.event_counts().0;
    wait_for(Duration::from_secs(5), || mock.event_counts().0 == settle);

    eprintln!("bench: Stateless burst. …");
    // Stateless burst.
    let n = a.events;
    let load = prepare(n, 4, 20_000, stateless_line, 0);
    reset_peak(pid);
    let (req0, sl0) = (events_requests(&mock, "/api/v1/events/"), events_requests(&mock, "/api/v1/events/stateless"));
    let cpu0 = cpu_secs(pid);
    let base0 = mock.event_counts().0;
    let start = Instant::now();
    let accepted = send(&socket, load);
    assert_eq!(accepted as usize, n);
    await_delivery(&mock, false, base0 + n as u64, "stateless burst", &run_dir);
    let secs = start.elapsed().as_secs_f64();
    let reqs = events_requests(&mock, "/api/v1/events/") - req0;
    let stateless_reqs = events_requests(&mock, "/api/v1/events/stateless") - sl0;
    out.insert("stateless_events".into(), json!(n));
    out.insert("stateless_events_per_s".into(), json!(n as f64 / secs));
    out.insert("agent_cpu_s_per_100k".into(), json!((cpu_secs(pid) - cpu0) / n as f64 * 100_000.0));
    out.insert("requests_per_10k_events".into(), json!(reqs as f64 / n as f64 * 10_000.0));
    out.insert("burst_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));
    out.insert("threads_busy".into(), json!(proc_status(pid, "Threads:")));

    eprintln!("bench: Logcollector …");
    // Logcollector: one followed file written as fast as possible.
    let nl = n / 2;
    reset_peak(pid);
    let base = mock.event_counts().0;
    let (start, cpu_lc) = (Instant::now(), cpu_secs(pid));
    {
        use std::io::Write as _;
        let mut f =
            std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(logs.join("f0.log")).unwrap());
        for i in 0..nl {
            writeln!(f, "Nov 26 15:00:00 web-01 app[42]: request {i:08} served in 3 ms from 10.0.0.1 to /api/v1/items")
                .unwrap();
        }
    }
    await_delivery(&mock, false, base + nl as u64, "log lines", &run_dir);
    out.insert("logcollector_lines_per_s".into(), json!(nl as f64 / start.elapsed().as_secs_f64()));
    out.insert("logcollector_cpu_s_per_100k".into(), json!((cpu_secs(pid) - cpu_lc) / nl as f64 * 100_000.0));
    out.insert("logcollector_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));

    eprintln!("bench: Logcollector during an outage …");
    // The server is down while a followed file grows by `nl` lines: the file is the buffer,
    // so the agent's memory must stay flat; then everything arrives once the server is back.
    reset_peak(pid);
    mock.set_down(true);
    let base = mock.event_counts().0;
    {
        use std::io::Write as _;
        let mut f =
            std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(logs.join("f1.log")).unwrap());
        for i in 0..nl {
            writeln!(f, "Nov 26 15:00:00 web-01 app[42]: request {i:08} served in 3 ms from 10.0.0.1 to /api/v1/items")
                .unwrap();
        }
    }
    // Long enough for the reader to fill the pipeline and stop.
    std::thread::sleep(Duration::from_secs(if a.quick { 2 } else { 5 }));
    out.insert("logcollector_outage_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));
    mock.set_down(false);
    let start = Instant::now();
    await_delivery(&mock, false, base + nl as u64, "log lines after the outage", &run_dir);
    out.insert("logcollector_outage_catch_up_s".into(), json!(start.elapsed().as_secs_f64()));

    eprintln!("bench: The mock's own ceiling …");
    // The mock's own ceiling, same machine, same run.
    let per = n / stateless_reqs.max(1);
    let ceiling = mock_ceiling(&mock, &creds, per, if a.quick { 2.0 } else { 5.0 });
    out.insert("mock_ceiling_batch_events".into(), json!(per));
    out.insert("mock_ceiling_events_per_s".into(), json!(ceiling));
    out.insert("agent_to_mock_ratio".into(), json!(n as f64 / secs / ceiling));

    eprintln!("bench: Stateful …");
    // Stateful, durable (each connection's reply waits for the group-commit fsync).
    let ns = n / 4;
    let load = prepare(ns, 8, 1_000, stateful_line, 0);
    let s0 = mock.event_counts().1;
    let start = Instant::now();
    let accepted = send(&socket, load);
    let acked = start.elapsed().as_secs_f64();
    assert_eq!(accepted as usize, ns);
    await_delivery(&mock, true, s0 + ns as u64, "stateful", &run_dir);
    out.insert("stateful_events".into(), json!(ns));
    out.insert("stateful_durable_acks_per_s".into(), json!(ns as f64 / acked));
    out.insert("stateful_delivered_per_s".into(), json!(ns as f64 / start.elapsed().as_secs_f64()));

    eprintln!("bench: A 100 MB stateful backlog …");
    // A 100 MB stateful backlog: fill it with the server down, then drain it (retry.max is
    // 500 ms in this config, so the drain starts soon after the server is back).
    let backlog = if a.quick { 40_000 } else { 400_000 };
    mock.set_down(true);
    let s1 = mock.event_counts().1;
    reset_peak(pid);
    let accepted = produce(&socket, backlog, 4, 5_000, stateful_line, 10_000_000);
    assert_eq!(accepted as usize, backlog);
    let queue_bytes: u64 = std::fs::read_dir(dir.join("data/queue"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    out.insert("backlog_events".into(), json!(backlog));
    out.insert("backlog_queue_bytes".into(), json!(queue_bytes));
    out.insert("backlog_fill_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));
    reset_peak(pid);
    mock.set_down(false);
    let start = Instant::now();
    await_delivery(&mock, true, s1 + backlog as u64, "backlog drain", &run_dir);
    out.insert("backlog_drain_events_per_s".into(), json!(backlog as f64 / start.elapsed().as_secs_f64()));
    out.insert("backlog_drain_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));

    let size = std::fs::metadata(agent_bin).map(|m| m.len()).unwrap_or(0);
    out.insert("binary_bytes".into(), json!(size));
    out.insert("fds_end".into(), json!(fds(pid)));
    drop(agent);
}
