//! The command line (README and `--help`), parsed with lexopt into one [`Cli`] value.

use std::path::PathBuf;

use crate::credentials::Secret;
use crate::register::RegisterArgs;

/// What the process was asked to do.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Run the agent in the foreground until SIGTERM/SIGINT.
    Run,
    Register(RegisterArgs),
    Send,
    Status,
    CheckConfig,
    Version,
    Help,
}

#[derive(Debug, Clone)]
pub struct Cli {
    pub mode: Mode,
    /// `--config FILE`; `None` means the environment variable or the default path.
    pub config: Option<PathBuf>,
}

/// A command line the agent cannot act on. The message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0} (see `wazuh-agent --help`)")]
pub struct CliError(pub String);

pub const HELP: &str = "\
wazuh-agent - Wazuh endpoint agent for small Linux hosts

USAGE
    wazuh-agent [--config FILE]
        Run the agent in the foreground until SIGTERM or SIGINT.
    wazuh-agent --register --url URL --user USER [--password-file FILE] [--name NAME]
                [--key-file FILE] [--force] [--config FILE]
        Register with the server management API once, store the credentials in
        <data_dir>/credentials.json and print the new agent UUID (standard error says
        where the credentials went and how to start the agent).
    wazuh-agent --send [--config FILE]
        Read NDJSON events from standard input and hand them to the running agent.
    wazuh-agent --status [--config FILE]
        Print the running agent's status as one JSON object.
    wazuh-agent --check-config [--config FILE]
        Validate the configuration and print the effective values.
    wazuh-agent --version | --help

OPTIONS
    --config FILE        Configuration file. Default: $WAZUH_AGENT_CONFIG, else
                         /etc/wazuh-agent/wazuh-agent.toml (all defaults if it is missing).
    --url URL            Management API URL (default: server.registration_url).
    --user USER          Management API user.
    --password-file FILE Read the password from the first line of FILE. Alternatively set
                         WAZUH_REGISTRATION_PASSWORD. (--password PASS also exists, but a
                         password on the command line is visible to every user in `ps`.)
    --name NAME          Agent name (default: agent.name, else the host name).
    --key-file FILE      Use the 32-character key on the first line of FILE instead of a
                         random one. Alternatively set WAZUH_REGISTRATION_KEY. (--key KEY
                         also exists, but a key on the command line is visible in `ps`.)
    --force              Register again even if credentials exist (new identity).

SIGNALS
    SIGTERM, SIGINT  stop: answer producers, deliver for up to 5 s, keep the rest on disk.
    SIGHUP           reopen log.file, reload the configuration and the group files.

FILES
    /etc/wazuh-agent/wazuh-agent.toml   configuration (see --check-config)
    <data_dir>/credentials.json         identity written by --register (mode 0600)
    <data_dir>/queue/                   durable event queue
    <data_dir>/commands.json            commands already run
    <data_dir>/shared/                  group configuration from the server
    <data_dir>/rejected.ndjson          events the server refused, with the reason
    <run_dir>/ingest.sock               local event socket (NDJSON in, one reply line out)
    <run_dir>/state.json                status, rewritten every 5 s
    <run_dir>/wazuh-agent.pid           pid of the running agent (locked)

EXIT STATUS
    0 success; 1 failure or refusal (the message says why); 3 --status: not running.
";

fn value(parser: &mut lexopt::Parser, flag: &str) -> Result<String, CliError> {
    let v = parser.value().map_err(|_| CliError(format!("{flag} needs a value")))?;
    v.into_string().map_err(|_| CliError(format!("{flag}: the value is not valid UTF-8")))
}

/// Parses the arguments (without the program name).
pub fn parse<I>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut modes: Vec<String> = Vec::new();
    let mut config = None;
    let mut reg = RegisterArgs::default();
    // The first flag that only goes with --register, to name it when --register is missing.
    let mut register_only = None;
    let mut user = None;

    while let Some(arg) = parser.next().map_err(|e| CliError(e.to_string()))? {
        if let Long(flag @ ("url" | "user" | "password-file" | "password" | "name" | "key" | "key-file" | "force")) =
            arg
        {
            register_only.get_or_insert(format!("--{flag}"));
        }
        match arg {
            Long("config") | Short('c') => config = Some(PathBuf::from(value(&mut parser, "--config")?)),
            Long(mode @ ("register" | "send" | "status" | "check-config")) => modes.push(format!("--{mode}")),
            Long("version") | Short('V') => modes.push("--version".into()),
            Long("help") | Short('h') => modes.push("--help".into()),
            Long("url") => reg.url = Some(value(&mut parser, "--url")?),
            Long("user") => user = Some(value(&mut parser, "--user")?),
            Long("password-file") => reg.password_file = Some(PathBuf::from(value(&mut parser, "--password-file")?)),
            Long("password") => reg.password = Some(Secret::new(value(&mut parser, "--password")?)),
            Long("name") => reg.name = Some(value(&mut parser, "--name")?),
            Long("key") => reg.key = Some(Secret::new(value(&mut parser, "--key")?)),
            Long("key-file") => reg.key_file = Some(PathBuf::from(value(&mut parser, "--key-file")?)),
            Long("force") => reg.force = true,
            Long(other) => return Err(CliError(format!("unknown option --{other}"))),
            Short(c) => return Err(CliError(format!("unknown option -{c}"))),
            Value(v) => return Err(CliError(format!("unexpected argument {:?}", v.to_string_lossy()))),
        }
    }

    let early =
        [("--help", Mode::Help), ("--version", Mode::Version)].into_iter().find(|(f, _)| modes.iter().any(|m| m == f));
    if let Some((_, mode)) = early {
        return Ok(Cli { mode, config });
    }
    modes.dedup();
    if modes.len() > 1 {
        return Err(CliError(format!("{} cannot be combined", modes.join(" and "))));
    }
    let mode = match (modes.first().map(String::as_str), register_only) {
        (Some("--register"), _) => {
            reg.user = user.ok_or_else(|| CliError("--register needs --user USER".into()))?;
            Mode::Register(reg)
        }
        (_, Some(flag)) => return Err(CliError(format!("{flag} only goes with --register"))),
        (Some("--send"), None) => Mode::Send,
        (Some("--status"), None) => Mode::Status,
        (Some("--check-config"), None) => Mode::CheckConfig,
        (_, None) => Mode::Run,
    };
    Ok(Cli { mode, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, CliError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn modes() {
        assert!(matches!(p(&[]).unwrap().mode, Mode::Run));
        assert!(matches!(p(&["--send"]).unwrap().mode, Mode::Send));
        assert!(matches!(p(&["--status", "--config", "/x"]).unwrap().mode, Mode::Status));
        assert!(matches!(p(&["--check-config"]).unwrap().mode, Mode::CheckConfig));
        assert!(matches!(p(&["--version"]).unwrap().mode, Mode::Version));
        assert!(matches!(p(&["--send", "--help"]).unwrap().mode, Mode::Help));
        assert_eq!(p(&["--config=/etc/a.toml"]).unwrap().config, Some(PathBuf::from("/etc/a.toml")));
    }

    #[test]
    fn register_flags() {
        let cli = p(&[
            "--register",
            "--url",
            "https://m:55000",
            "--user",
            "wazuh",
            "--password-file",
            "/pw",
            "--name",
            "n1",
            "--force",
        ])
        .unwrap();
        let Mode::Register(r) = cli.mode else { panic!() };
        assert_eq!(r.user, "wazuh");
        assert_eq!(r.url.as_deref(), Some("https://m:55000"));
        assert_eq!(r.password_file, Some(PathBuf::from("/pw")));
        assert_eq!(r.name.as_deref(), Some("n1"));
        assert!(r.force);
    }

    #[test]
    fn errors_name_the_flag() {
        let table: &[(&[&str], &str)] = &[
            (&["--register"], "--user"),
            (&["--user", "x"], "--user"),
            (&["--force"], "--force"),
            (&["--send", "--status"], "--send and --status"),
            (&["--bogus"], "--bogus"),
            (&["--config"], "--config"),
            (&["stray"], "stray"),
        ];
        for (args, flag) in table {
            let e = p(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?} gave {e}");
        }
    }

    #[test]
    fn password_flag_is_not_printed() {
        let cli = p(&["--register", "--user", "u", "--password", "hunter2"]).unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }
}
