//! Host metadata for registration and every events body (docs/protocol.md), from uname(2), getifaddrs(3), os-release.

use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::sys;

/// `host.os` of the wire format.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OsInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: String,
}

/// `host` of the wire format.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostInfo {
    pub architecture: String,
    pub hostname: String,
    pub ip: Vec<String>,
    pub os: OsInfo,
}

/// The host name (uname's nodename), or "localhost" if the kernel has none.
pub fn hostname() -> String {
    let n = sys::uname().unwrap_or_default().nodename;
    if n.is_empty() || n == "(none)" { "localhost".into() } else { n }
}

/// Collects the host metadata. `root` is the host root for os-release (tests use fixtures).
pub fn gather(root: &Path) -> HostInfo {
    let u = sys::uname().unwrap_or_default();
    let os_release =
        ["etc/os-release", "usr/lib/os-release"].iter().find_map(|p| std::fs::read_to_string(root.join(p)).ok());
    let os = os_info(os_release.as_deref(), &u.sysname, &u.release);
    let architecture = if u.machine.is_empty() { std::env::consts::ARCH.into() } else { u.machine };
    HostInfo { architecture, hostname: hostname(), ip: interface_addresses(), os }
}

/// `host.os` from an os-release text (pure); without one (BusyBox) the kernel's name and release stand in.
pub fn os_info(os_release: Option<&str>, sysname: &str, kernel_release: &str) -> OsInfo {
    let fields = os_release.map(parse_os_release).unwrap_or_default();
    let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let kind = if sysname.is_empty() { "Linux".to_string() } else { sysname.to_string() };
    let version = get("VERSION").or_else(|| get("VERSION_ID")).unwrap_or_else(|| kernel_release.to_string());
    OsInfo { name: get("NAME").unwrap_or_else(|| kind.clone()), version, kind }
}

/// Parses os-release `KEY=value` lines, unquoting values (pure).
pub fn parse_os_release(text: &str) -> Vec<(String, String)> {
    let field = |line: &str| {
        let (k, v) = line.trim().split_once('=').filter(|(k, _)| !k.starts_with('#'))?;
        let v = v.trim();
        let v = ['"', '\''].iter().find_map(|q| v.strip_prefix(*q)?.strip_suffix(*q)).unwrap_or(v);
        Some((k.trim().to_string(), v.replace("\\\"", "\"").replace("\\\\", "\\")))
    };
    text.lines().filter_map(field).collect()
}

/// Addresses of interfaces that are up; loopback ones only when nothing else is up (never empty; no IPv6 link-local).
fn interface_addresses() -> Vec<String> {
    let (mut out, mut loopback): (Vec<IpAddr>, Vec<IpAddr>) = (Vec::new(), Vec::new());
    for addr in sys::interfaces().unwrap_or_default().into_iter().filter(|i| i.up).map(|i| i.addr) {
        let link_local_v6 = matches!(addr, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
        if addr.is_loopback() {
            loopback.push(addr);
        } else if !link_local_v6 && !out.contains(&addr) {
            out.push(addr);
        }
    }
    let out = if out.is_empty() { loopback } else { out };
    if out.is_empty() { vec!["127.0.0.1".into()] } else { out.iter().map(|a| a.to_string()).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_variants() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n";
        let alpine = "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\n";
        let openwrt = "NAME='OpenWrt'\nVERSION='23.05.2'\nID='openwrt'\n";
        let table: &[(Option<&str>, &str, &str)] = &[
            (Some(debian), "Debian GNU/Linux", "12 (bookworm)"),
            (Some(alpine), "Alpine Linux", "3.19.1"),
            (Some(openwrt), "OpenWrt", "23.05.2"),
            (None, "Linux", "6.1.0-18-amd64"),
            (Some("# only a comment\n"), "Linux", "6.1.0-18-amd64"),
        ];
        for (text, name, version) in table {
            let os = os_info(*text, "Linux", "6.1.0-18-amd64");
            assert_eq!((os.name.as_str(), os.version.as_str(), os.kind.as_str()), (*name, *version, "Linux"));
        }
    }

    #[test]
    fn gather_has_every_field() {
        let h = gather(Path::new("/"));
        assert!(!h.architecture.is_empty() && !h.hostname.is_empty() && !h.ip.is_empty());
        for ip in &h.ip {
            ip.parse::<IpAddr>().unwrap();
        }
    }
}
