//! `wazuh-mock-server`: runs the mock until killed, printing its ports as one JSON line.
//!
//! Admin endpoints (plain HTTP on --admin-port): GET /admin/state, POST /admin/commands
//! {"agent","command"} or {"agent","commands":[...]}, POST /admin/faults {Fault} (e.g.
//! {"path":"/api/v1/commands","times":1000,"action":{"kind":"status","code":503,"retry_after":"0"}}),
//! POST /admin/token-lifetime {"seconds"}, POST /admin/token-claims {"claims": {"iat":0,"exp":...}
//! or null}, POST /admin/expire-tokens, POST /admin/down {"down"}, POST /admin/files {"name","content"}.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use wazuh_mock_server::{MockServer, Options};

const USAGE: &str = "usage: wazuh-mock-server --dir DIR [--comms-port N] [--mgmt-port N] [--admin-port N] \
[--token-lifetime SECS] [--command-hold SECS] [--user U] [--password P] [--uuid-v4-only] [--documents] [--refuse-gzip] \
[--cert-name NAME]... (default names: localhost, 127.0.0.1)";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = Options::new(&PathBuf::from("."));
    opts.admin_port = Some(0);
    let mut dir = None;
    let mut cert_names_given = false;
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value\n{USAGE}");
                std::process::exit(2)
            })
        };
        let num = |name: &str, v: String| -> u64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: {v:?} is not a number\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(val("--dir"))),
            "--comms-port" => opts.comms_port = num("--comms-port", val("--comms-port")) as u16,
            "--mgmt-port" => opts.mgmt_port = num("--mgmt-port", val("--mgmt-port")) as u16,
            "--admin-port" => opts.admin_port = Some(num("--admin-port", val("--admin-port")) as u16),
            "--token-lifetime" => opts.token_lifetime = num("--token-lifetime", val("--token-lifetime")),
            "--command-hold" => opts.command_hold = Duration::from_secs(num("--command-hold", val("--command-hold"))),
            "--user" => opts.user = val("--user"),
            "--password" => opts.password = val("--password"),
            "--uuid-v4-only" => opts.uuid_v4_only = true,
            "--documents" => opts.documents = true,
            "--refuse-gzip" => opts.refuse_gzip = true,
            "--cert-name" => {
                let name = val("--cert-name");
                if !cert_names_given {
                    opts.cert_names.clear();
                    cert_names_given = true;
                }
                opts.cert_names.push(name);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("--dir is required\n{USAGE}");
        std::process::exit(2);
    };
    opts.dir = dir;
    let server = match MockServer::start(opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wazuh-mock-server: cannot start: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", server.describe());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
