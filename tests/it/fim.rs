//! File integrity monitoring end to end on a fixture tree (`fim.root`): the baseline, realtime changes of every kind,
//! changes made while the agent was stopped, an inotify overflow, a corrupt snapshot and server-set keys.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// (operation, path of the document or of the notification, data) of every fim event, stateful ones first.
fn stateful(env: &Env) -> Vec<(String, String, Value)> {
    let uuid = uuid(env);
    let events = env.mock.stateful_events().into_iter().filter(|e| e.header["module"] == "fim");
    events
        .map(|e| {
            let data = e.data.clone().unwrap_or_default();
            let path = data["file"]["path"].as_str().unwrap_or_default().to_string();
            if !path.is_empty() {
                assert_eq!(e.header["id"], wazuh_agent::inventory::doc_id(&uuid, &path), "the id is sha1(uuid:path)");
            }
            assert_eq!(e.header["collector"], "file");
            (e.header["operation"].as_str().unwrap().to_string(), path, data)
        })
        .collect()
}

fn notes(env: &Env) -> Vec<(String, String, Value)> {
    let events = env.mock.stateless_events().into_iter().filter(|e| e.header["module"] == "fim");
    events
        .map(|e| {
            let d = e.data.unwrap();
            (d["event"]["type"].as_str().unwrap().to_string(), d["file"]["path"].as_str().unwrap().to_string(), d)
        })
        .collect()
}

fn ids(uuid: &str, paths: &[&str]) -> Vec<String> {
    paths.iter().map(|p| wazuh_agent::inventory::doc_id(uuid, p)).collect()
}

fn write(root: &Path, rel: &str, text: &str) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn sha256(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn config(root: &Path, extra: &str) -> String {
    format!(
        "events.batch_interval = \"50ms\"\nfim.enabled = true\nfim.root = {:?}\nfim.max_eps = 100000\n\
         fim.max_read_rate = 0\n{extra}",
        root.display().to_string()
    )
}

/// Waits until the stateful fim events number `n`; the new ones (from `from`) sorted by path, then operation.
fn next_events(env: &Env, from: usize, n: usize) -> Vec<(String, String, Value)> {
    let ok = env.mock.wait_until(Duration::from_secs(20), |_| stateful(env).len() >= from + n);
    let mut got = stateful(env)[from.min(stateful(env).len())..].to_vec();
    assert!(ok, "{n} events expected, got {:?}", got.iter().map(|(o, p, _)| (o, p)).collect::<Vec<_>>());
    got.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    got
}

fn ops(events: &[(String, String, Value)]) -> Vec<(&str, &str)> {
    events.iter().map(|(o, p, _)| (o.as_str(), p.as_str())).collect()
}

#[test]
fn fim_realtime_reports_every_kind_of_change_once() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    let outside = write(env.dir.path(), "secret", "not to be read");
    write(&root, "etc/a.conf", "alpha\n");
    write(&root, "etc/b.conf", "beta\n");
    write(&root, "etc/big.bin", &"x".repeat(2048));
    write(&root, "etc/sub/c.conf", "gamma\n");
    write(&root, "etc/editor.swp", "ignored by name\n");
    write(&root, "etc/cache/d", "ignored by path\n");
    symlink(&outside, root.join("etc/link")).unwrap();
    env.write_config(&config(
        &root,
        "fim.paths = [{ path = \"/etc\", realtime = true }]\nfim.interval = \"1h\"\nfim.max_file_bytes = \"1KiB\"\n\
         fim.hashes = [\"md5\", \"sha1\", \"sha256\"]\nfim.ignore = [\"*.swp\", \"/etc/cache/**\"]",
    ));
    let agent = env.running_agent();
    let uuid = uuid(&env);

    // The baseline: creates only, no notification; ignored names and the link's target never appear.
    let base = next_events(&env, 0, 5);
    assert_eq!(
        ops(&base),
        [
            ("create", "/etc/a.conf"),
            ("create", "/etc/b.conf"),
            ("create", "/etc/big.bin"),
            ("create", "/etc/link"),
            ("create", "/etc/sub/c.conf")
        ]
    );
    let a = &base[0].2["file"];
    assert_eq!((a["type"].as_str(), a["size"].as_u64(), a["name"].as_str()), (Some("file"), Some(6), Some("a.conf")));
    assert_eq!(a["hash"]["sha256"], sha256("alpha\n"));
    assert_eq!(a["hash"]["md5"], format!("{:x}", md5::compute("alpha\n")));
    assert_eq!(a["hash"]["sha1"], sha1_smol::Sha1::from("alpha\n").digest().to_string());
    assert_eq!(a["mode"], "0644");
    assert_eq!((a["owner"].as_str(), a["group"].as_str()), (Some("root"), Some("root")), "names by NSS (run as root)");
    let big = &base[2].2["file"];
    assert_eq!((big["attributes"].clone(), big["hash"].is_null()), (json!(["unhashed"]), true), "over max_file_bytes");
    let link = &base[3].2["file"];
    assert_eq!((link["type"].as_str(), link["target_path"].as_str()), (Some("symlink"), outside.to_str()));
    assert!(link["hash"].is_null(), "a link is not followed");
    assert!(base.iter().all(|(_, _, d)| d["@timestamp"].is_string()));
    std::thread::sleep(Duration::from_millis(300)); // (only lets a wrong extra event show up in the next assertion)
    assert!(notes(&env).is_empty(), "no notifications for the baseline");

    // Content, mode, owner: one update each, with the fields that changed and their old values.
    let mut seen = stateful(&env).len();
    write(&root, "etc/a.conf", "alpha, longer\n");
    let got = next_events(&env, seen, 1);
    assert_eq!(ops(&got), [("update", "/etc/a.conf")]);
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| !notes(&env).is_empty()));
    let (kind, path, d) = notes(&env)[0].clone();
    assert_eq!((kind.as_str(), path.as_str()), ("modified", "/etc/a.conf"));
    let fields: Vec<&str> =
        d["event"]["changed_fields"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for f in ["file.hash.md5", "file.hash.sha1", "file.hash.sha256", "file.size"] {
        assert!(fields.contains(&f), "{fields:?}");
    }
    assert_eq!(d["file"]["previous"]["size"], 6);
    assert_eq!(d["file"]["previous"]["hash"]["sha256"], sha256("alpha\n"));
    assert_eq!(d["file"]["size"], 14);

    seen = stateful(&env).len();
    std::fs::set_permissions(root.join("etc/b.conf"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(ops(&next_events(&env, seen, 1)), [("update", "/etc/b.conf")]);
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 2));
    assert_eq!(notes(&env)[1].2["event"]["changed_fields"], json!(["file.mode"]));
    assert_eq!(notes(&env)[1].2["file"]["previous"], json!({"mode": "0644"}));

    seen = stateful(&env).len();
    let nobody = wazuh_agent::privileges::resolve("nobody", None).unwrap();
    std::os::unix::fs::chown(root.join("etc/b.conf"), Some(nobody.uid), None).unwrap();
    let got = next_events(&env, seen, 1);
    assert_eq!(got[0].2["file"]["uid"], nobody.uid.to_string());
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 3));
    assert_eq!(got[0].2["file"]["owner"], "nobody");
    assert_eq!(notes(&env)[2].2["event"]["changed_fields"], json!(["file.owner", "file.uid"]));

    // Delete, rename (a delete and a create), and a new directory filled at once: every file of it.
    seen = stateful(&env).len();
    std::fs::remove_file(root.join("etc/sub/c.conf")).unwrap();
    std::fs::rename(root.join("etc/a.conf"), root.join("etc/a2.conf")).unwrap();
    std::fs::create_dir(root.join("etc/new")).unwrap();
    for i in 0..20 {
        write(&root, &format!("etc/new/f{i:02}"), "n");
    }
    write(&root, "etc/more.swp", "ignored");
    write(&root, "etc/cache/e", "ignored");
    let got = next_events(&env, seen, 23);
    let mut want = vec![("delete", String::new()), ("delete", String::new()), ("create", "/etc/a2.conf".to_string())];
    want.extend((0..20).map(|i| ("create", format!("/etc/new/f{i:02}"))));
    let got_ops: Vec<(&str, String)> = got.iter().map(|(o, p, _)| (o.as_str(), p.clone())).collect();
    assert_eq!(got_ops, want.iter().map(|(o, p)| (*o, p.clone())).collect::<Vec<_>>());
    let deleted: Vec<String> = env
        .mock
        .stateful_events()
        .into_iter()
        .filter(|e| e.header["module"] == "fim" && e.header["operation"] == "delete")
        .map(|e| e.header["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected = ids(&uuid, &["/etc/a.conf", "/etc/sub/c.conf"]);
    let mut deleted = deleted;
    expected.sort();
    deleted.sort();
    assert_eq!(deleted, expected);
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 3 + 23));
    let kinds: Vec<String> = notes(&env)[3..].iter().map(|(k, p, _)| format!("{k} {p}")).collect();
    assert!(kinds.contains(&"deleted /etc/sub/c.conf".to_string()) && kinds.contains(&"added /etc/a2.conf".into()));

    // A FIFO in the tree is recorded, never opened: the agent goes on reporting.
    seen = stateful(&env).len();
    let fifo = std::ffi::CString::new(root.join("etc/fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let got = next_events(&env, seen, 1);
    assert_eq!((got[0].1.as_str(), got[0].2["file"]["type"].as_str()), ("/etc/fifo", Some("other")));
    seen = stateful(&env).len();
    write(&root, "etc/after-fifo", "still watching");
    assert_eq!(ops(&next_events(&env, seen, 1)), [("create", "/etc/after-fifo")]);
    std::thread::sleep(Duration::from_millis(1500)); // (lets a stray event for an ignored path show up)
    assert!(stateful(&env).iter().all(|(_, p, _)| !p.contains("swp") && !p.contains("cache")), "ignored");
    assert!(!agent.log().contains("panicked"));
}

#[test]
fn fim_changes_made_while_stopped_are_found_at_the_next_start() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    for name in ["keep", "change", "remove"] {
        write(&root, &format!("srv/{name}"), name);
    }
    env.write_config(&config(&root, "fim.paths = [\"/srv\"]\nfim.interval = \"1h\""));
    let mut agent = env.running_agent();
    assert_eq!(next_events(&env, 0, 3).len(), 3);
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));

    write(&root, "srv/change", "changed while stopped");
    std::fs::remove_file(root.join("srv/remove")).unwrap();
    write(&root, "srv/added", "new");
    let mut agent = env.running_agent();
    let got = next_events(&env, 3, 3);
    // A delete carries no document: it sorts first, by its empty path.
    assert_eq!(ops(&got), [("delete", ""), ("create", "/srv/added"), ("update", "/srv/change")]);
    assert_eq!(got[0].2, Value::Null);
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 3));
    let mut kinds: Vec<String> = notes(&env).iter().map(|(k, p, _)| format!("{k} {p}")).collect();
    kinds.sort();
    assert_eq!(kinds, ["added /srv/added", "deleted /srv/remove", "modified /srv/change"]);

    // A corrupt snapshot is named, replaced by a fresh full scan (all creates again, no notifications), no crash.
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    let snapshot = env.data_dir().join("fim.snapshot");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    std::fs::write(&snapshot, text.replacen("{\"file\"", "garbage{", 1)).unwrap();
    let agent = env.running_agent();
    assert_eq!(next_events(&env, 6, 3).iter().filter(|(o, _, _)| o == "create").count(), 3);
    let named = format!(
        "fim: {} is cut short or altered (its last line does not seal the rest); it is replaced by a fresh full scan",
        snapshot.display()
    );
    assert!(agent.log().contains(&named), "{}", agent.log());
    assert_eq!(notes(&env).len(), 3);
}

#[test]
fn fim_an_inotify_overflow_is_said_once_and_a_full_scan_finds_everything() {
    let limit: usize =
        std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events").unwrap().trim().parse().unwrap();
    if limit > 100_000 {
        eprintln!("skipped: max_queued_events is {limit}");
        return;
    }
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "d/first", "1");
    env.write_config(&config(&root, "fim.paths = [{ path = \"/d\", realtime = true }]\nfim.interval = \"1h\""));
    let agent = env.running_agent();
    assert_eq!(next_events(&env, 0, 1).len(), 1);
    // Stopped, the agent reads no event: the kernel queue overflows.
    agent.signal(libc::SIGSTOP);
    let n = limit + 1000;
    for i in 0..n {
        std::fs::write(root.join(format!("d/f{i}")), "x").unwrap();
    }
    agent.signal(libc::SIGCONT);
    assert!(
        env.mock.wait_until(Duration::from_secs(120), |m| m.stateful_events().len() > n),
        "{} of {n}: {}",
        env.mock.stateful_events().len(),
        agent.log()
    );
    let log = agent.log();
    assert_eq!(log.matches("the inotify queue overflowed").count(), 1, "{log}");
    let mut paths: Vec<String> = stateful(&env).into_iter().map(|(_, p, _)| p).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n + 1, "every file, each once");
}

#[test]
fn fim_keys_set_by_the_server_apply_at_restart_but_never_fim_root() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let root = env.dir.path().join("host");
    write(&root, "opt/app.conf", "x");
    // fim.root comes from the local file only: the group's is ignored (it would point elsewhere).
    let mut local = std::fs::read_to_string(&env.config).unwrap();
    local.push_str(&format!("[fim]\nroot = {:?}\n", root.display().to_string()));
    std::fs::write(&env.config, local).unwrap();
    let group = "fim:\n  enabled: true\n  paths: [{path: /opt, realtime: true}]\n  max_eps: 1000\n  root: /tmp/evil\n";
    env.mock.set_file("g1.yml", group.as_bytes());
    env.mock.enqueue_command(&me, command("f-1", "set-group", json!({"groups": ["g1"]}), Some(60)));
    let (code, message) = result_of(&env.mock, "f-1", Duration::from_secs(30));
    assert_eq!(code, 0, "{message}");
    assert!(message.contains("fim.enabled") && message.contains("fim.paths"), "{message}");
    assert!(message.contains("ignored fim.root (g1.yml)"), "{message}");
    env.mock.enqueue_command(&me, command("f-2", "restart", json!({}), Some(60)));
    assert_eq!(result_of(&env.mock, "f-2", Duration::from_secs(30)), (0, format!("agent restarted (pid {pid})")));
    assert_eq!(ops(&next_events(&env, 0, 1)), [("create", "/opt/app.conf")]);
    write(&root, "opt/new.conf", "y");
    assert_eq!(ops(&next_events(&env, 1, 1)), [("create", "/opt/new.conf")], "realtime, as the server set it");
}

#[test]
fn fim_as_an_account_that_cannot_read_records_no_hash_and_keeps_what_it_cannot_list() {
    let env = Env::new();
    // The agent runs as nobody: let it traverse the test's directory.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = env.dir.path().join("host");
    write(&root, "etc/open", "o");
    let secret = write(&root, "etc/secret", "s");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&root, "etc/private/x", "x");
    env.write_config(&config(&root, "agent.user = \"nobody\"\nfim.paths = [\"/etc\"]\nfim.interval = \"1s\""));
    let agent = env.running_agent();
    let base = next_events(&env, 0, 3);
    assert_eq!(ops(&base), [("create", "/etc/open"), ("create", "/etc/private/x"), ("create", "/etc/secret")]);
    let secret = &base[2].2["file"];
    assert_eq!((&secret["attributes"], secret["hash"].is_null()), (&json!(["unreadable"]), true), "permission denied");
    assert!(base[0].2["file"]["hash"]["sha256"].is_string());

    // A directory it can no longer list keeps its documents: two scans later nothing was deleted.
    std::fs::set_permissions(root.join("etc/private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let kept = "1 directories unreadable (documents kept)";
    assert!(wait_for(Duration::from_secs(15), || agent.log().matches(kept).count() >= 2), "{}", agent.log());
    assert_eq!(stateful(&env).len(), 3, "{:?}", ops(&stateful(&env)));
}

#[test]
fn fim_a_single_file_in_realtime_survives_an_editor_replacing_it() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "etc/passwd", "root:x:0:0\n");
    write(&root, "etc/other", "not monitored");
    env.write_config(&config(
        &root,
        "fim.paths = [{ path = \"/etc/passwd\", realtime = true }]\nfim.interval = \"1h\"",
    ));
    let _agent = env.running_agent();
    assert_eq!(ops(&next_events(&env, 0, 1)), [("create", "/etc/passwd")]);
    // An editor writes a new file beside it and renames it over: the directory's watch sees the name come back.
    for i in 0..2 {
        write(&root, "etc/.passwd.tmp", &format!("root:x:0:0\nuser{i}:x:1000:1000\n"));
        std::fs::rename(root.join("etc/.passwd.tmp"), root.join("etc/passwd")).unwrap();
        write(&root, "etc/other", &format!("changed {i}"));
        assert_eq!(ops(&next_events(&env, 1 + i, 1)), [("update", "/etc/passwd")], "replacement {i}");
    }
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 2));
    assert!(stateful(&env).iter().all(|(_, p, _)| p == "/etc/passwd"), "siblings are not monitored");
}

/// The bound: 100 000 files with a peak resident size of at most 16 MiB (memory does not grow with the
/// files: the snapshot streams). Slow in a debug build: `WAZUH_AGENT_TEST_BIN=target/release/wazuh-agent cargo
/// test --test it fim_100000 -- --ignored`.
#[test]
#[ignore]
fn fim_100000_files_peak_memory() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    for d in 0..1000 {
        let dir = root.join(format!("data/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:02}")), format!("{d}/{f}: {}", "x".repeat(64))).unwrap();
        }
    }
    let extra = "fim.paths = [{ path = \"/data\", realtime = true }]\nfim.interval = \"20s\"\nfim.max_files = 200000";
    env.write_config(&config(&root, extra));
    let agent = env.running_agent();
    let pid = agent.child.id();
    let scanned = |n: usize| {
        wait_for(Duration::from_secs(600), || agent.log().matches("fim: full scan: 100000 files").count() >= n)
    };
    assert!(scanned(1), "{}", agent.log());
    let first = proc_kb(pid, "VmHWM:");
    assert!(env.mock.wait_until(Duration::from_secs(600), |m| m.stateful_events().len() >= 100_000));
    // A rescan with nothing changed, then one file changed (a partial scan streams the whole snapshot).
    assert!(scanned(2), "{}", agent.log());
    write(&root, "data/d500/f50", "changed");
    assert!(env.mock.wait_until(Duration::from_secs(60), |m| m.stateful_events().len() > 100_000));
    let peak = proc_kb(pid, "VmHWM:");
    eprintln!("fim 100000 files: VmHWM {first} KiB after the first scan, {peak} KiB after a rescan and a change");
    agent.log().lines().filter(|l| l.contains("fim: ")).for_each(|l| eprintln!("{l}"));
    assert!(peak <= 16 * 1024, "{peak} KiB");
}

#[test]
fn fim_never_reports_the_agents_own_data_dir() {
    let env = Env::new();
    write(env.dir.path(), "host/watched", "one");
    // fim.root is the test's directory, so data_dir is `/data` to FIM: beneath a realtime path, as `/var` holds it.
    let paths = "fim.paths = [{ path = \"/data\", realtime = true }, { path = \"/host\", realtime = true }]";
    env.write_config(&config(env.dir.path(), paths));
    let _agent = env.running_agent();
    assert_eq!(ops(&next_events(&env, 0, 1)), [("create", "/host/watched")]);
    // Each change rewrites fim.snapshot in data_dir; were it monitored, each rewrite would be another change.
    for round in 0..3 {
        write(env.dir.path(), "host/watched", &format!("change {round}"));
        assert_eq!(ops(&next_events(&env, 1 + round, 1)), [("update", "/host/watched")]);
    }
    assert!(env.mock.wait_until(Duration::from_secs(10), |_| notes(&env).len() >= 3));
    let all = stateful(&env).into_iter().chain(notes(&env)).map(|(_, p, _)| p).collect::<Vec<_>>();
    assert!(all.iter().all(|p| p == "/host/watched"), "{all:?}");
}

#[test]
fn fim_scan_on_start_false_waits_one_interval_for_the_first_scan() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "srv/a", "a");
    env.write_config(&config(&root, "fim.paths = [\"/srv\"]\nfim.interval = \"3s\"\nfim.scan_on_start = false"));
    let started = std::time::Instant::now();
    let _agent = env.running_agent();
    assert_eq!(ops(&next_events(&env, 0, 1)), [("create", "/srv/a")]);
    // A lower bound only: a loaded machine makes the scan later, never earlier.
    assert!(started.elapsed() >= Duration::from_secs(3), "first scan after {:?}", started.elapsed());
}

#[test]
fn fim_max_files_is_said_once_and_max_eps_paces_the_changes() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    for i in 0..40 {
        write(&root, &format!("srv/f{i:02}"), "x");
    }
    let keys = "fim.paths = [\"/srv\"]\nfim.interval = \"1s\"\nfim.max_files = 30\nfim.max_eps = 10";
    env.write_config(&config(&root, keys).replace("fim.max_eps = 100000\n", ""));
    let agent = env.running_agent();
    let got = next_events(&env, 0, 30);
    assert_eq!(got.len(), 30, "max_files: the first 30 in path order");
    assert_eq!((got[0].1.as_str(), got[29].1.as_str()), ("/srv/f00", "/srv/f29"));
    // 30 changes at 10 a second: chunks of 10, the third one paced 2 s after the first (the scan's own clock: the
    // arrivals at the mock are not, as a delayed first request shortens their span).
    let ms = |log: &str| log.split("fim: full scan: 30 files (scan ").nth(1)?.split(' ').next()?.parse::<u64>().ok();
    assert!(wait_for(Duration::from_secs(20), || ms(&agent.log()).is_some()), "{}", agent.log());
    assert!(ms(&agent.log()).is_some_and(|ms| ms >= 2000), "{}", agent.log());
    let scans = || agent.log().matches("fim: full scan: 30 files").count();
    assert!(wait_for(Duration::from_secs(20), || scans() >= 3), "{}", agent.log());
    let warned = "fim: fim.max_files (30) is reached; 10 files are not monitored";
    assert_eq!(agent.log().matches(warned).count(), 1, "{}", agent.log());
    assert_eq!(stateful(&env).len(), 30, "nothing more: the files past the bound are counted, not sent");
}

#[test]
fn fim_max_read_rate_throttles_hashing_and_a_throttled_scan_stops_at_once() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    std::fs::create_dir_all(root.join("srv")).unwrap();
    std::fs::write(root.join("srv/one"), vec![7u8; 1 << 20]).unwrap();
    let keys = "fim.paths = [\"/srv\"]\nfim.interval = \"1h\"\nfim.max_read_rate = \"256KiB\"";
    env.write_config(&config(&root, keys));
    let mut agent = env.running_agent();
    assert_eq!(ops(&next_events(&env, 0, 1)), [("create", "/srv/one")]);
    // 1 MiB at 256 KiB a second: 4 s of reading (a lower bound: a loaded machine only makes it longer).
    let ms = |log: &str| log.split("fim: full scan: 1 files (scan ").nth(1)?.split(' ').next()?.parse::<u64>().ok();
    assert!(wait_for(Duration::from_secs(20), || ms(&agent.log()).is_some()), "{}", agent.log());
    assert!(ms(&agent.log()).is_some_and(|ms| ms >= 3500), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));

    // 32 MiB more at 64 KiB a second would take over 8 minutes; a stop meanwhile ends the scan, sends nothing of it.
    std::fs::write(root.join("srv/two"), vec![7u8; 32 << 20]).unwrap();
    env.write_config(&config(&root, &keys.replace("256KiB", "64KiB")));
    let mut agent = env.running_agent();
    assert!(wait_for(Duration::from_secs(10), || agent.log().contains("authenticated")), "{}", agent.log());
    std::thread::sleep(Duration::from_secs(1)); // (lets the scan reach the throttled file; not an assertion)
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    assert_eq!(stateful(&env).len(), 1, "the interrupted scan sent nothing");
}

/// The inotify watches (`inotify wd:` lines of its fdinfo) the agent holds.
fn watches(pid: u32) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten();
    let inotify = fds.filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify")));
    let info = |e: std::fs::DirEntry| {
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
    };
    inotify.map(|e| info(e).unwrap_or_default().matches("inotify wd:").count()).sum()
}

#[test]
fn fim_directories_moved_out_of_the_tree_are_no_longer_watched() {
    // An account that can write in a realtime tree makes directories there (each gets a watch) and moves them out:
    // before, every one kept its watch (root's, from fs.inotify.max_user_watches) and its entry in the agent's memory.
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "d/first", "1");
    std::fs::create_dir_all(root.join("away")).unwrap();
    env.write_config(&config(&root, "fim.paths = [{ path = \"/d\", realtime = true }]\nfim.interval = \"1h\""));
    let agent = env.running_agent();
    assert_eq!(next_events(&env, 0, 1).len(), 1);
    let pid = agent.child.id();
    assert!(wait_for(Duration::from_secs(10), || watches(pid) == 1), "{}", watches(pid));
    let n = 20;
    for i in 0..n {
        write(&root, &format!("d/sub{i:02}/f"), "x");
    }
    assert_eq!(next_events(&env, 1, n).len(), n);
    assert!(wait_for(Duration::from_secs(10), || watches(pid) == 1 + n), "{}", watches(pid));
    for i in 0..n {
        std::fs::rename(root.join(format!("d/sub{i:02}")), root.join(format!("away/sub{i:02}"))).unwrap();
    }
    assert!(next_events(&env, 1 + n, n).iter().all(|(o, _, _)| o == "delete"));
    assert!(wait_for(Duration::from_secs(10), || watches(pid) == 1), "{} watches for 1 directory", watches(pid));
    // A directory moved within the tree is watched at its new name.
    write(&root, "d/a/f", "x");
    assert_eq!(ops(&next_events(&env, 1 + 2 * n, 1)), [("create", "/d/a/f")]);
    std::fs::rename(root.join("d/a"), root.join("d/b")).unwrap();
    assert_eq!(ops(&next_events(&env, 2 + 2 * n, 2)), [("delete", ""), ("create", "/d/b/f")]);
    write(&root, "d/b/g", "y");
    assert_eq!(ops(&next_events(&env, 4 + 2 * n, 1)), [("create", "/d/b/g")]);
    assert_eq!(watches(pid), 2);
}

#[test]
fn fim_a_stop_ends_a_scan_hashing_a_huge_sparse_file_at_once() {
    // Any account can make a 1 TB sparse file for free; with max_file_bytes raised (the server may set it) hashing it
    // takes hours, and before, a stop waited for that: the agent left the thread busy at exit.
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "tmp/small", "s");
    let huge = std::fs::File::create(root.join("tmp/huge")).unwrap();
    huge.set_len(1 << 40).unwrap();
    env.write_config(&config(&root, "fim.paths = [\"/tmp\"]\nfim.max_file_bytes = 4611686018427387904"));
    let mut agent = env.running_agent();
    let read = |pid: u32| {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    let pid = agent.child.id();
    assert!(wait_for(Duration::from_secs(20), || read(pid) > 256 << 20), "the hash is under way");
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!agent.log().contains("threads still busy at exit"), "{}", agent.log());
    // Stopped mid-scan: nothing was sent and no baseline was saved.
    assert!(stateful(&env).is_empty() && !env.data_dir().join("fim.snapshot").exists());
}

#[test]
fn fim_a_snapshot_cut_at_a_line_or_with_a_byte_changed_is_no_baseline() {
    // Before, a snapshot that lost its last lines, or had a byte of a hash changed, was a baseline: the files it no
    // longer named were reported "added", the changed one "modified", though nothing had changed on disk.
    let env = Env::new();
    let root = env.dir.path().join("host");
    for name in ["a", "b", "c"] {
        write(&root, &format!("srv/{name}"), name);
    }
    env.write_config(&config(&root, "fim.paths = [\"/srv\"]\nfim.interval = \"1h\""));
    let snapshot = env.data_dir().join("fim.snapshot");
    let mut seen = 0;
    let cut_last_line = |t: &str| t[..t.trim_end().rfind('\n').unwrap() + 1].to_string();
    let flip_a_hash = |t: &str| t.replacen(&sha256("b"), &sha256("B"), 1);
    let drop_a_line = |t: &str| t.lines().filter(|l| !l.starts_with("\"/srv/a\"")).map(|l| format!("{l}\n")).collect();
    type Edit = fn(&str) -> String;
    let edits: [(&str, Edit); 3] = [("cut", cut_last_line), ("flipped", flip_a_hash), ("a line dropped", drop_a_line)];
    let mut agent = env.running_agent();
    assert_eq!(next_events(&env, seen, 3).len(), 3);
    seen += 3;
    for (what, edit) in edits {
        assert!(wait_for(Duration::from_secs(10), || agent.log().contains("fim: full scan")), "{what}");
        agent.signal(libc::SIGTERM);
        assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
        let text = std::fs::read_to_string(&snapshot).unwrap();
        let edited = edit(&text);
        assert_ne!(edited, text, "{what}");
        std::fs::write(&snapshot, edited).unwrap();
        agent = env.running_agent();
        let got = next_events(&env, seen, 3);
        assert!(got.iter().all(|(o, _, _)| o == "create"), "{what}: a fresh full scan: {:?}", ops(&got));
        seen += 3;
        let named = format!("fim: {} is cut short or altered", snapshot.display());
        assert!(wait_for(Duration::from_secs(10), || agent.log().contains(&named)), "{what}: {}", agent.log());
        assert!(notes(&env).is_empty(), "{what}: no notification: {:?}", notes(&env));
    }
}

#[test]
fn fim_kill_9_mid_delivery_and_mid_outage_loses_no_change() {
    let env = Env::with(|o| o.documents = true);
    let root = env.dir.path().join("host");
    let n = 3000;
    for i in 0..n {
        write(&root, &format!("srv/f{i:04}"), &format!("{i}"));
    }
    // Chunks of 500, a second apart: the scan is delivered over about 6 s.
    env.write_config(&config(&root, "fim.paths = [\"/srv\"]\nfim.interval = \"1h\"").replace("100000", "500"));
    // Before, a file created, delivered by a scan cut short, then deleted, was never deleted on the server: the next
    // scan compared with the old snapshot, which lacked it.
    let mut agent = env.running_agent();
    assert!(env.mock.wait_until(Duration::from_secs(20), |_| stateful(&env).len() >= 500));
    agent.signal(libc::SIGKILL);
    let _ = agent.wait_exit(Duration::from_secs(10));
    assert!(stateful(&env).len() < n, "killed mid-delivery");

    // Server down: the restarted agent's scan goes to the queue only; changed meanwhile, then killed again.
    env.mock.set_down(true);
    write(&root, "srv/f0001", "changed while down");
    std::fs::remove_file(root.join("srv/f0002")).unwrap();
    let mut agent = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(30), || agent.log().contains("fim: full scan")), "{}", agent.log());
    write(&root, "srv/f0003", "changed after the scan");
    agent.signal(libc::SIGKILL);
    let _ = agent.wait_exit(Duration::from_secs(10));

    env.mock.set_down(false);
    let _agent = env.running_agent();
    let uuid = uuid(&env);
    let doc = |i: usize| env.mock.documents().get(&ids(&uuid, &[&format!("/srv/f{i:04}")])[0]).cloned();
    let want = |i: usize| match i {
        1 => Some(sha256("changed while down")),
        2 => None,
        3 => Some(sha256("changed after the scan")),
        _ => Some(sha256(&i.to_string())),
    };
    let right =
        || (0..n).all(|i| doc(i).map(|d| d["file"]["hash"]["sha256"].as_str().unwrap_or("").to_string()) == want(i));
    assert!(
        env.mock.wait_until(Duration::from_secs(60), |_| right()),
        "{:?}",
        (0..n)
            .filter(|&i| doc(i).map(|d| d["file"]["hash"]["sha256"].clone()) != want(i).map(Value::from))
            .collect::<Vec<_>>()
    );
    // Notifications (not durable: some may be lost with a kill) only for what changed, none for the files the first
    // scan had not reached when it was cut.
    let real = ["modified /srv/f0001", "deleted /srv/f0002", "modified /srv/f0003"];
    let told: Vec<String> = notes(&env).into_iter().map(|(k, p, _)| format!("{k} {p}")).collect();
    assert!(told.iter().all(|t| real.contains(&t.as_str())), "{told:?}");
    // (The mock files notifications, which have no id, under "".)
    assert_eq!(env.mock.documents().keys().filter(|k| !k.is_empty()).count(), n - 1);
}

#[test]
fn fim_a_scan_longer_than_the_interval_is_followed_by_as_long_a_pause() {
    // The server may set fim.interval = "1s" over a tree that takes longer than that to scan: before, the thread then
    // scanned (and hashed) without a pause, for ever.
    let env = Env::new();
    let root = env.dir.path().join("host");
    let big = std::fs::File::create(root.join("srv/big")).or_else(|_| {
        std::fs::create_dir_all(root.join("srv"))?;
        std::fs::File::create(root.join("srv/big"))
    });
    // 3 MiB read at 1 MiB a second: every scan takes 3 s or more, on any machine (a busy one only makes it longer).
    big.unwrap().set_len(3 << 20).unwrap();
    env.write_config(&config(&root, "fim.paths = [\"/srv\"]\nfim.interval = \"1s\"\nfim.max_read_rate = \"1MiB\""));
    let agent = env.running_agent();
    let scans = || {
        let seconds = |l: &str| -> f64 {
            let t = &l[11..l.find('Z').unwrap()];
            t[0..2].parse::<f64>().unwrap() * 3600.0
                + t[3..5].parse::<f64>().unwrap() * 60.0
                + t[6..].parse::<f64>().unwrap()
        };
        let ms =
            |l: &str| l.split("(scan ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse::<f64>().unwrap() / 1e3;
        let log = agent.log();
        log.lines().filter(|l| l.contains("fim: full scan")).map(|l| (seconds(l), ms(l))).collect::<Vec<_>>()
    };
    assert!(wait_for(Duration::from_secs(120), || scans().len() >= 2), "{}", agent.log());
    let s = scans();
    for w in s.windows(2) {
        let ((end1, took1), (end2, took2)) = (w[0], w[1]);
        let pause = end2 - took2 - end1;
        assert!(took1 >= 2.9 && pause >= 0.9 * took1, "a {took1:.1} s scan, then a pause of {pause:.1} s: {s:?}");
    }
}
