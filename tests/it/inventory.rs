//! Inventory end to end on a fixture host tree: first scan, one new package, a version
//! change, a restart with nothing changed, and counters that must not cause updates.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const DPKG: &str = "Package: openssl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3.0.13-1\nInstalled-Size: 2296\nDescription: Secure Sockets Layer toolkit\n\nPackage: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b2\nInstalled-Size: 7164\nDescription: GNU Bourne Again SHell\n\nPackage: old-config\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 1.0\n";

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn fixture(root: &Path) {
    write(
        root,
        "etc/os-release",
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION=\"12 (bookworm)\"\nID=debian\n",
    );
    write(root, "proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
    write(root, "proc/sys/kernel/hostname", "web-01\n");
    write(
        root,
        "proc/cpuinfo",
        "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2400.000\n\nprocessor\t: 1\nmodel name\t: Test CPU\n",
    );
    write(
        root,
        "proc/meminfo",
        "MemTotal:        2000000 kB\nMemFree:          500000 kB\nMemAvailable:    1000000 kB\n",
    );
    write(root, "var/lib/dpkg/status", DPKG);
    write(
        root,
        "proc/net/tcp",
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n",
    );
}

fn inventory_events(env: &Env) -> Vec<(String, String, String)> {
    env.mock
        .stateful_events()
        .iter()
        .filter(|e| e.header["module"] == "inventory")
        .map(|e| {
            let h = &e.header;
            (
                h["collector"].as_str().unwrap().into(),
                h["operation"].as_str().unwrap().into(),
                h["id"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn notifications(env: &Env) -> Vec<String> {
    env.mock
        .stateless_events()
        .iter()
        .filter(|e| e.header["module"] == "inventory")
        .map(|e| e.data.as_ref().unwrap()["event"]["action"].as_str().unwrap().to_string())
        .collect()
}

fn sha1_id(uuid: &str, key: &str) -> String {
    wazuh_agent::inventory::doc_id(uuid, key)
}

#[test]
fn scans_send_exactly_what_changed() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    fixture(&root);
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\ninventory.enabled = true\ninventory.interval = \"1s\"\ninventory.root = {:?}\ninventory.collectors = [\"system\", \"hardware\", \"packages\", \"ports\"]",
        root.display().to_string()
    ));
    let mut agent = env.running_agent();
    let uuid: Value =
        serde_json::from_str(&std::fs::read_to_string(env.data_dir().join("credentials.json")).unwrap()).unwrap();
    let uuid = uuid["uuid"].as_str().unwrap().to_string();

    // First scan: system + hardware + 2 installed packages + 1 listening port, all creates.
    assert!(
        env.mock.wait_until(Duration::from_secs(15), |_| inventory_events(&env).len() >= 5),
        "{:?}",
        inventory_events(&env)
    );
    let first = inventory_events(&env);
    assert!(first.iter().all(|(_, op, _)| op == "create"));
    let mut collectors: Vec<&str> = first.iter().map(|(c, _, _)| c.as_str()).collect();
    collectors.sort();
    assert_eq!(collectors, vec!["hardware", "packages", "packages", "ports", "system"]);
    assert!(first.iter().any(|(_, _, id)| *id == sha1_id(&uuid, "openssl:3.0.13-1:amd64:deb:")));
    assert!(first.iter().any(|(_, _, id)| *id == sha1_id(&uuid, "4242:tcp:0.0.0.0:22")));
    assert!(first.iter().any(|(_, _, id)| *id == sha1_id(&uuid, "Debian GNU/Linux")));
    let openssl = env
        .mock
        .stateful_events()
        .into_iter()
        .find(|e| e.header["id"] == sha1_id(&uuid, "openssl:3.0.13-1:amd64:deb:"))
        .unwrap();
    let p = &openssl.data.as_ref().unwrap()["package"];
    assert_eq!(
        (p["size"].as_u64(), p["type"].as_str(), p["installed"].is_null()),
        (Some(2296 * 1024), Some("deb"), true)
    );
    assert!(notifications(&env).is_empty(), "no notifications for the baseline");

    // Volatile counters change: nothing is sent. A package is added: one create, one notification.
    write(
        &root,
        "proc/meminfo",
        "MemTotal:        2000000 kB\nMemFree:          100000 kB\nMemAvailable:     200000 kB\n",
    );
    write(
        &root,
        "var/lib/dpkg/status",
        &format!("{DPKG}\nPackage: curl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 7.88.1-10\n"),
    );
    assert!(env.mock.wait_until(Duration::from_secs(15), |_| !notifications(&env).is_empty()));
    let second = &inventory_events(&env)[first.len()..];
    assert_eq!(second, &[("packages".to_string(), "create".to_string(), sha1_id(&uuid, "curl:7.88.1-10:amd64:deb:"))]);
    assert_eq!(notifications(&env), vec!["package-installed"]);

    // A version change: delete + create on the stateful side, ONE package-updated.
    write(
        &root,
        "var/lib/dpkg/status",
        &format!(
            "{}\nPackage: curl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 7.88.1-10\n",
            DPKG.replace("3.0.13-1", "3.0.14-1")
        ),
    );
    assert!(env.mock.wait_until(Duration::from_secs(15), |_| notifications(&env).len() >= 2));
    let third = &inventory_events(&env)[first.len() + 1..];
    let mut ops: Vec<&str> = third.iter().map(|(_, op, _)| op.as_str()).collect();
    ops.sort();
    assert_eq!(ops, vec!["create", "delete"]);
    assert_eq!(notifications(&env), vec!["package-installed", "package-updated"]);

    // A restart with nothing changed sends nothing.
    let before = (inventory_events(&env).len(), notifications(&env).len());
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    let mut agent = env.running_agent();
    // Two scans after the restart: both compared with the saved snapshot.
    assert!(wait_for(Duration::from_secs(10), || agent.log().matches("inventory:").count() >= 2));
    assert_eq!((inventory_events(&env).len(), notifications(&env).len()), before);
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(10));
}

#[test]
fn an_unreadable_package_database_keeps_the_packages() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    fixture(&root);
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\ninventory.enabled = true\ninventory.interval = \"1s\"\ninventory.root = {:?}\ninventory.collectors = [\"packages\"]",
        root.display().to_string()
    ));
    let mut agent = env.running_agent();
    assert!(env.mock.wait_until(Duration::from_secs(15), |_| inventory_events(&env).len() >= 2));
    let first = inventory_events(&env);

    // The status file becomes unreadable (a directory: the tests run as root, which reads
    // any file whatever its mode). Two scans fail; no package is deleted, no notification.
    let status = root.join("var/lib/dpkg/status");
    std::fs::remove_file(&status).unwrap();
    std::fs::create_dir(&status).unwrap();
    let failure = format!("inventory: packages: cannot read {}: ", status.display());
    assert!(wait_for(Duration::from_secs(15), || agent.log().matches(&failure).count() >= 2), "{}", agent.log());
    let state = env.dir.path().join("run").join("state.json");
    let last_error = || {
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap_or_default()).unwrap_or_default();
        s["last_error"].as_str().unwrap_or_default().to_string()
    };
    assert!(wait_for(Duration::from_secs(15), || last_error().starts_with(&failure)), "{}", last_error());

    // Readable again with the same packages: the snapshot kept them, so nothing is sent.
    std::fs::remove_dir(&status).unwrap();
    write(&root, "var/lib/dpkg/status", DPKG);
    let scans = agent.log().matches("documents (scan").count();
    assert!(wait_for(Duration::from_secs(15), || agent.log().matches("documents (scan").count() >= scans + 2));
    assert_eq!(inventory_events(&env), first);
    assert!(notifications(&env).is_empty());
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(10));
}

/// Measured: a `processes` document of 20.6 MB (a huge argument list) was acknowledged by the
/// queue, then skipped as damaged on read-back and never sent. Now it arrives cut and marked.
#[test]
fn a_process_with_a_huge_command_line_arrives_truncated_and_marked() {
    let env = Env::new();
    let root = env.dir.path().join("host");
    write(&root, "proc/stat", "btime 1764140000\n");
    for (pid, name, cmdline) in
        [(1, "init", "/sbin/init\0".to_string()), (4242, "big", format!("/bin/big\0{}\0-v\0", "A".repeat(6 << 20)))]
    {
        write(
            &root,
            &format!("proc/{pid}/stat"),
            &format!("{pid} ({name}) S 1 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"),
        );
        write(&root, &format!("proc/{pid}/cmdline"), &cmdline);
        write(&root, &format!("proc/{pid}/status"), "Uid:\t0\t0\t0\t0\n");
    }
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\ninventory.enabled = true\ninventory.root = {:?}\ninventory.collectors = [\"processes\"]",
        root.display().to_string()
    ));
    let mut agent = env.running_agent();
    assert!(env.mock.wait_until(Duration::from_secs(30), |_| inventory_events(&env).len() >= 2), "{}", agent.log());
    let docs = env.mock.stateful_events();
    let process = |pid: &str| docs.iter().filter_map(|e| e.data.as_ref()).find(|d| d["process"]["pid"] == pid).unwrap();
    let (small, big) = (process("1"), process("4242"));
    assert!(small.get("tags").is_none(), "{small}");
    assert_eq!(small["process"]["command_line"], "/sbin/init");
    assert_eq!(big["tags"], serde_json::json!(["truncated"]));
    assert_eq!((&big["process"]["name"], &big["process"]["args"][0]), (&"big".into(), &"/bin/big".into()));
    let line = big["process"]["command_line"].as_str().unwrap();
    assert!(line.starts_with("/bin/big AAAA") && line.len() > 100_000, "{} bytes", line.len());
    assert!(big.to_string().len() <= wazuh_agent::inventory::MAX_DOC_BYTES + 64, "{} bytes", big.to_string().len());
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(10));
}
