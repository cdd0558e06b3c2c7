//! Inventory collectors: read the host (files under `inventory.root`, and getifaddrs on the live host)
//! into documents shaped as in docs/events.md. Parsers are pure functions of file contents. Fields a
//! host cannot provide are `null`; a source that exists but cannot be read is an [`Unreadable`] error.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde_json::json;

/// One inventory document and its primary key (docs/events.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub key: String,
    /// Compact JSON text: thousands of packages stay small this way.
    pub doc: String,
}

/// Why a collector could not read its source.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct Unreadable {
    pub path: PathBuf,
    pub source: io::Error,
}

/// A source under the root: `None` if the host lacks it, an error if it exists but cannot be read (or is no file).
fn source(root: &Path, rel: &str) -> Result<Option<String>, Unreadable> {
    let path = root.join(rel);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Unreadable { path, source }),
    }
}

/// A detail that may be missing or unreadable to us (root-only, or gone): `None` either way.
fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel)).ok()
}

pub fn collect_system(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    // The first of two sources that exists.
    let first = |rels: [&str; 2]| rels.iter().find_map(|r| source(root, r).transpose()).transpose();
    let osr = first(["etc/os-release", "usr/lib/os-release"])?;
    let fields = osr.as_deref().map(crate::host::parse_os_release).unwrap_or_default();
    let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let kernel = source(root, "proc/sys/kernel/osrelease")?.map(|s| s.trim().to_string());
    let hostname = first(["proc/sys/kernel/hostname", "etc/hostname"])?;
    let hostname = hostname.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let name = get("NAME").unwrap_or_else(|| "Linux".into());
    let doc = json!({"host": {
        "architecture": std::env::consts::ARCH,
        "hostname": hostname,
        "os": {"full": get("PRETTY_NAME"), "kernel": kernel, "name": name, "platform": get("ID"), "type": "Linux",
               "version": get("VERSION").or_else(|| get("VERSION_ID"))}
    }});
    Ok(vec![Doc { key: name, doc: doc.to_string() }])
}

pub fn parse_cpuinfo(text: &str) -> (Option<String>, usize, Option<u64>) {
    let (mut name, mut cores, mut mhz) = (None, 0, None);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        match k.trim() {
            "processor" => cores += 1,
            "model name" | "Hardware" | "cpu model" if name.is_none() => name = Some(v.trim().to_string()),
            "cpu MHz" if mhz.is_none() => mhz = v.trim().parse::<f64>().ok().map(|f| f.round() as u64),
            _ => {}
        }
    }
    (name, cores, mhz)
}

pub fn parse_meminfo(text: &str) -> HashMap<String, u64> {
    let entry = |l: &str| {
        let (k, v) = l.split_once(':')?;
        Some((k.trim().to_string(), v.split_whitespace().next()?.parse().ok()?))
    };
    text.lines().filter_map(entry).collect()
}

pub fn collect_hardware(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    let (name, cores, mhz) = source(root, "proc/cpuinfo")?.map(|t| parse_cpuinfo(&t)).unwrap_or((None, 0, None));
    let mem = source(root, "proc/meminfo")?.map(|t| parse_meminfo(&t)).unwrap_or_default();
    let total = mem.get("MemTotal").copied();
    let free = mem.get("MemAvailable").or_else(|| mem.get("MemFree")).copied();
    let used = total.zip(free).filter(|(t, _)| *t > 0).map(|(t, f)| t.saturating_sub(f) * 100 / t);
    // Readable by root only: without it the serial is null, as on hosts that have none.
    let serial = read(root, "sys/class/dmi/id/board_serial").map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let doc = json!({
        "host": {"cpu": {"cores": (cores > 0).then_some(cores), "name": name, "speed": mhz},
                 "memory": {"free": free, "total": total, "used": {"percentage": used}}},
        "observer": {"serial_number": serial},
    });
    Ok(vec![Doc { key: serial.unwrap_or_default(), doc: doc.to_string() }])
}

/// A package from its control fields (dpkg's names; apk's letters are mapped to them).
fn package(f: &HashMap<&str, String>, format: &str) -> Option<Doc> {
    let field = |k| f.get(k).map(String::as_str);
    let (name, version, arch) = (field("Package")?, field("Version")?, field("Architecture").unwrap_or(""));
    // dpkg counts Installed-Size in KiB; opkg and apk in bytes.
    let size = field("Installed-Size").and_then(|s| s.parse::<u64>().ok());
    let size = size.and_then(|s| if format == "deb" { s.checked_mul(1024) } else { Some(s) });
    // A corrupt database can name a time past what SystemTime holds: absent, like a missing one.
    let installed = field("Installed-Time").and_then(|t| t.parse().ok()).map(std::time::Duration::from_secs);
    let installed = installed.and_then(|t| std::time::UNIX_EPOCH.checked_add(t)).map(crate::status::rfc3339);
    let doc = json!({"package": {
        "architecture": arch, "description": field("Description"), "installed": installed, "name": name,
        "path": null, "size": size, "type": format, "version": version,
    }});
    Some(Doc { key: format!("{name}:{version}:{arch}:{format}:"), doc: doc.to_string() })
}

/// dpkg's status file (and opkg's, which has the same stanza format).
pub fn parse_control_stanzas(text: &str, format: &str) -> Vec<Doc> {
    let stanzas = text.split("\n\n").map(|stanza| {
        // Continuation lines (long descriptions) are not needed: first line only.
        let lines = stanza.lines().filter(|l| !l.starts_with([' ', '\t'])).filter_map(|l| l.split_once(':'));
        lines.map(|(k, v)| (k.trim(), v.trim().to_string())).collect::<HashMap<_, _>>()
    });
    let installed = |f: &HashMap<&str, String>| {
        f.get("Status").is_some_and(|s| s.starts_with("install") && s.ends_with(" installed"))
    };
    stanzas.filter(installed).filter_map(|f| package(&f, format)).collect()
}

/// Alpine's `lib/apk/db/installed`.
pub fn parse_apk(text: &str) -> Vec<Doc> {
    let names =
        [('P', "Package"), ('V', "Version"), ('A', "Architecture"), ('I', "Installed-Size"), ('T', "Description")];
    let stanza = |stanza: &str| {
        let mut f = HashMap::new();
        for line in stanza.lines() {
            let mut c = line.chars();
            if let (Some(k), Some(':')) = (c.next(), c.next())
                && let Some((_, name)) = names.iter().find(|(n, _)| *n == k)
            {
                f.entry(*name).or_insert_with(|| c.as_str().to_string());
            }
        }
        package(&f, "apk")
    };
    text.split("\n\n").filter_map(stanza).collect()
}

/// Every supported package database under the root (dpkg, apk, opkg/ipkg). A manager whose
/// directory is missing is not installed; one whose directory exists must have a readable database.
pub fn collect_packages(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    let mut out = Vec::new();
    let opkg = if root.join("usr/lib/opkg").exists() { "usr/lib/opkg" } else { "var/lib/opkg" };
    let databases = [("var/lib/dpkg", "status", "deb"), ("lib/apk/db", "installed", "apk"), (opkg, "status", "ipk")];
    for (dir, db, format) in databases {
        let (dir, path) = (root.join(dir), root.join(dir).join(db));
        if !dir.try_exists().map_err(|source| Unreadable { path: dir, source })? {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Unreadable { path, source })?;
        out.extend(if format == "apk" { parse_apk(&text) } else { parse_control_stanzas(&text, format) });
    }
    Ok(out)
}

/// `0100007F:0016` → (127.0.0.1, 22); IPv6 as four little-endian 32-bit words.
pub fn parse_hex_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes())),
        32 => {
            let word = |i: usize| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok().map(|w| w.swap_bytes() as u128);
            IpAddr::V6(Ipv6Addr::from(word(0)? << 96 | word(1)? << 64 | word(2)? << 32 | word(3)?))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// One /proc/net/{tcp,udp}{,6} table: listening TCP sockets and bound UDP sockets.
pub fn parse_net_table(text: &str, protocol: &str) -> Vec<(IpAddr, u16, IpAddr, u16, u64, u64, u64)> {
    let tcp = protocol.starts_with("tcp");
    let socket = |line: &str| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (lip, lport) = parse_hex_addr(f.get(1)?)?;
        let (rip, rport) = parse_hex_addr(f.get(2)?)?;
        let state = f.get(3)?;
        // TCP: LISTEN (0A) only; UDP: unconnected sockets (07, CLOSE) bound to a port.
        if (tcp && *state != "0A") || (!tcp && (*state != "07" || lport == 0)) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        let inode = f.get(9)?.parse().ok()?;
        Some((lip, lport, rip, rport, u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?, inode))
    };
    text.lines().skip(1).filter_map(socket).collect()
}

/// socket inode → (pid, process name), from /proc/<pid>/fd links readable to us.
fn socket_owners(root: &Path) -> HashMap<u64, (u32, String)> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir(root.join("proc")) else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        let name = std::fs::read_to_string(p.path().join("comm")).map(|s| s.trim().to_string()).unwrap_or_default();
        for target in fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')?.parse().ok()) {
                out.entry(inode).or_insert((pid, name.clone()));
            }
        }
    }
    out
}

pub fn collect_ports(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    let owners = socket_owners(root);
    let mut out = Vec::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        // Without IPv6 the kernel has no tcp6/udp6: nothing to list there.
        let Some(text) = source(root, &format!("proc/net/{proto}"))? else { continue };
        let protocol = proto.trim_end_matches('6');
        for (lip, lport, rip, rport, tx, rx, inode) in parse_net_table(&text, proto) {
            let owner = owners.get(&inode);
            let doc = json!({
                "destination": {"ip": [rip.to_string()], "port": rport},
                "file": {"inode": inode},
                "host": {"network": {"egress": {"queue": tx}, "ingress": {"queue": rx}}},
                "interface": {"state": if protocol == "tcp" { "listening" } else { "bound" }},
                "network": {"protocol": protocol},
                "process": {"name": owner.map(|o| o.1.clone()), "pid": owner.map(|o| o.0)},
                "source": {"ip": [lip.to_string()], "port": lport},
            });
            out.push(Doc { key: format!("{inode}:{protocol}:{lip}:{lport}"), doc: doc.to_string() });
        }
    }
    Ok(out)
}

/// `/proc/net/dev` → interface → (rx bytes, rx packets, rx errs, rx drop, tx bytes, tx packets, tx errs, tx drop).
pub fn parse_net_dev(text: &str) -> HashMap<String, [u64; 8]> {
    let interface = |l: &str| {
        let (name, rest) = l.split_once(':')?;
        let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        (v.len() >= 12).then(|| (name.trim().to_string(), [v[0], v[1], v[2], v[3], v[8], v[9], v[10], v[11]]))
    };
    text.lines().skip(2).filter_map(interface).collect()
}

/// `/proc/net/route` → interface → IPv4 default gateway.
pub fn parse_route(text: &str) -> HashMap<String, Ipv4Addr> {
    let default_route = |l: &str| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let gw = u32::from_str_radix(f.get(2)?, 16).ok()?.swap_bytes();
        (f[1] == "00000000").then(|| (f[0].to_string(), Ipv4Addr::from(gw)))
    };
    text.lines().skip(1).filter_map(default_route).collect()
}

/// `/sys/class/net/<iface>/type` (ARPHRD_*) → interface type.
const IFACE_TYPES: [(&str, &str); 5] =
    [("1", "ethernet"), ("772", "loopback"), ("801", "wireless"), ("65534", "tunnel"), ("512", "ppp")];

pub fn collect_networks(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    let counters = source(root, "proc/net/dev")?.map(|t| parse_net_dev(&t)).unwrap_or_default();
    let gateways = source(root, "proc/net/route")?.map(|t| parse_route(&t)).unwrap_or_default();
    // Addresses come from getifaddrs, i.e. from the live host only.
    let addresses = (root == Path::new("/")).then(crate::sys::interfaces).transpose();
    let addresses = addresses.map_err(|source| Unreadable { path: "getifaddrs".into(), source })?.unwrap_or_default();
    let mut out = Vec::new();
    for crate::sys::IfAddr { name: iface, addr, netmask: mask, broadcast: brd, .. } in addresses {
        let sys = |f: &str| read(root, &format!("sys/class/net/{iface}/{f}")).map(|s| s.trim().to_string());
        let c = counters.get(&iface).copied().unwrap_or([0; 8]);
        let proto = if addr.is_ipv4() { "ipv4" } else { "ipv6" };
        let itype = sys("type").and_then(|t| IFACE_TYPES.iter().find(|c| c.0 == t)).map_or("unknown", |c| c.1);
        let gateway: Vec<String> =
            gateways.get(&iface).filter(|_| addr.is_ipv4()).map(|g| g.to_string()).into_iter().collect();
        let doc = json!({
            "host": {"ip": [addr.to_string()], "mac": sys("address"),
                     "network": {"egress": {"bytes": c[4], "drops": c[7], "errors": c[6], "packets": c[5]},
                                 "ingress": {"bytes": c[0], "drops": c[3], "errors": c[2], "packets": c[1]}}},
            "interface": {"mtu": sys("mtu").and_then(|m| m.parse::<u64>().ok()), "state": sys("operstate"), "type": itype},
            "network": {"broadcast": brd.map(|b| vec![b.to_string()]).unwrap_or_default(), "dhcp": null,
                        "gateway": gateway, "metric": null,
                        "netmask": mask.map(|m| vec![m.to_string()]).unwrap_or_default(), "type": proto},
            "observer": {"ingress": {"interface": {"alias": null, "name": iface}}},
        });
        out.push(Doc { key: format!("{iface}::{itype}:{proto}:{addr}"), doc: doc.to_string() });
    }
    Ok(out)
}

pub fn collect_processes(root: &Path) -> Result<Vec<Doc>, Unreadable> {
    let mut out = Vec::new();
    let boot = read(root, "proc/stat")
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
    let hz = crate::sys::clock_ticks_per_second();
    let procs = match std::fs::read_dir(root.join("proc")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        listed => listed.map_err(|source| Unreadable { path: root.join("proc"), source })?,
    };
    // A process that ends while it is read is simply not listed.
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = &stat[open + 1..close];
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ppid: Option<u64> = rest.get(1).and_then(|v| v.parse().ok());
        let start = rest.get(19).and_then(|v| v.parse::<u64>().ok()).and_then(|t| boot.map(|b| b + t / hz));
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).unwrap_or_default()).into_owned();
        let args: Vec<&str> = cmdline.split('\0').filter(|a| !a.is_empty()).collect();
        let status = std::fs::read_to_string(p.path().join("status")).unwrap_or_default();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next());
        let doc = json!({"process": {
            "args": args, "command_line": (!args.is_empty()).then(|| args.join(" ")), "name": name,
            "parent": {"pid": ppid}, "pid": pid.to_string(), "start": start, "user": {"id": uid},
        }});
        out.push(Doc { key: pid.to_string(), doc: doc.to_string() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_addresses() {
        let table: &[(&str, &str, u16)] = &[
            ("0100007F:0016", "127.0.0.1", 22),
            ("00000000:0050", "0.0.0.0", 80),
            ("F600A8C0:01BB", "192.168.0.246", 443),
            ("00000000000000000000000000000000:0016", "::", 22),
            ("00000000000000000000000001000000:0035", "::1", 53),
            ("0000000000000000FFFF00000100007F:1F90", "::ffff:127.0.0.1", 8080),
        ];
        for (hex, ip, port) in table {
            let (a, p) = parse_hex_addr(hex).unwrap();
            assert_eq!((a.to_string().as_str(), p), (*ip, *port), "{hex}");
        }
        assert!(parse_hex_addr("zz:1").is_none());
    }

    #[test]
    fn net_tables_keep_listening_tcp_and_bound_udp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0\n   1: 0100007F:9C40 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0 100 0 0 10 0\n";
        let t = parse_net_table(tcp, "tcp");
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].0.to_string(), t[0].1, t[0].6), ("0.0.0.0".into(), 22, 12345));
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 00000000:0044 00000000:0000 07 00000000:00000001 00:00000000 00000000     0        0 777 2 0 0\n  2: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 778 2 0 0\n";
        let u = parse_net_table(udp, "udp");
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].1, u[0].5, u[0].6), (68, 1, 777));
    }

    use serde_json::Value;

    fn v(d: &Doc) -> Value {
        serde_json::from_str(&d.doc).unwrap()
    }

    #[test]
    fn dpkg_status_installed_only_with_sizes_in_bytes() {
        let text = "Package: openssl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3.0.13-1~deb12u1\nInstalled-Size: 2296\nDescription: Secure Sockets Layer toolkit\n more text\n\nPackage: removed\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n\nPackage: epoch\nStatus: install ok installed\nVersion: 1:2.3\nArchitecture: all\n";
        let docs = parse_control_stanzas(text, "deb");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].key, "openssl:3.0.13-1~deb12u1:amd64:deb:");
        assert_eq!(v(&docs[0])["package"]["size"], 2296 * 1024);
        assert_eq!(v(&docs[0])["package"]["description"], "Secure Sockets Layer toolkit");
        assert_eq!(v(&docs[0])["package"]["installed"], Value::Null);
        assert_eq!(v(&docs[1])["package"]["version"], "1:2.3", "versions verbatim, epochs included");
    }

    #[test]
    fn apk_and_opkg_databases() {
        let apk = "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nS:383152\nI:622592\nT:the musl c library\n\nP:busybox\nV:1.36.1-r5\nA:x86_64\nI:946176\nT:Size optimized toolbox\n";
        let docs = parse_apk(apk);
        assert_eq!(
            docs.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(),
            vec!["musl:1.2.4-r2:x86_64:apk:", "busybox:1.36.1-r5:x86_64:apk:"]
        );
        assert_eq!(v(&docs[0])["package"]["size"], 622592);
        let opkg = "Package: dnsmasq\nVersion: 2.89-4\nStatus: install user installed\nArchitecture: mipsel_24kc\nInstalled-Size: 1024\nInstalled-Time: 1700000000\n";
        let docs = parse_control_stanzas(opkg, "ipk");
        assert_eq!(docs[0].key, "dnsmasq:2.89-4:mipsel_24kc:ipk:");
        assert_eq!(v(&docs[0])["package"]["size"], 1024);
        assert_eq!(v(&docs[0])["package"]["installed"], "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn out_of_range_install_times_and_sizes_are_absent() {
        let db = format!(
            "Package: p\nVersion: 1\nStatus: install ok installed\nInstalled-Size: {}\nInstalled-Time: {}\n",
            u64::MAX,
            u64::MAX
        );
        let docs = parse_control_stanzas(&db, "deb");
        assert_eq!(v(&docs[0])["package"]["installed"], Value::Null);
        assert_eq!(v(&docs[0])["package"]["size"], Value::Null);
    }

    #[test]
    fn proc_files() {
        let (name, cores, mhz) = parse_cpuinfo(
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\ncpu MHz\t\t: 2399.998\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R)\n",
        );
        assert_eq!((name.as_deref(), cores, mhz), (Some("Intel(R) Xeon(R)"), 2, Some(2400)));
        let m =
            parse_meminfo("MemTotal:        2000000 kB\nMemFree:          500000 kB\nMemAvailable:    1000000 kB\n");
        assert_eq!(m["MemAvailable"], 1_000_000);
        let dev = parse_net_dev("Inter-|   Receive\n face |bytes\n  eth0: 100 2 3 4 0 0 0 0 200 5 6 7 0 0 0 0\n");
        assert_eq!(dev["eth0"], [100, 2, 3, 4, 200, 5, 6, 7]);
        let r = parse_route(
            "Iface\tDestination\tGateway\n eth0\t00000000\t010200C0\t0003\n eth0\t000200C0\t00000000\t0001\n",
        );
        assert_eq!(r["eth0"].to_string(), "192.0.2.1");
    }
}
