//! `wazuh-agent`: parses the command line, sets up logging, dispatches; [`exit_code`] maps errors.

// Every libc call lives in the library's `sys` module.
#![deny(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use wazuh_agent::cli::{self, Mode};
use wazuh_agent::config::{Config, ConfigError};
use wazuh_agent::ingest::{self, IngestError};
use wazuh_agent::logging;
use wazuh_agent::register::{self, RegisterError};
use wazuh_agent::status;
use wazuh_agent::supervisor::{self, RunError};

/// Everything that can end the process with a failure.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Cli(cli::CliError),
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Register(RegisterError),
    #[error(transparent)]
    Run(RunError),
    #[error(transparent)]
    Send(IngestError),
    #[error(transparent)]
    Log(logging::LogError),
    #[error("cannot write to standard output: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("restart failed: cannot execute the agent again: {0}")]
    Restart(#[source] std::io::Error),
}

/// The single mapping from errors to exit codes (`--help`, EXIT STATUS): every failure or refusal is 1.
fn exit_code(_e: &Error) -> u8 {
    1
}

fn main() -> ExitCode {
    wazuh_agent::memory::tune_allocator();
    match try_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Printed for the person at the terminal, and logged too when the log goes to a file.
            if logging::file_path().is_some() {
                log::error!("{e}");
            }
            // Errors can carry server text (a refusal's reason): escaped like every log line.
            let _ = writeln!(std::io::stderr(), "wazuh-agent: {}", logging::escape(&e.to_string()));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn try_main() -> Result<u8, Error> {
    let cli = cli::parse(std::env::args_os().skip(1)).map_err(Error::Cli)?;
    let config = match cli.mode {
        Mode::Help => return print(cli::HELP, 0),
        Mode::Version => return print(&format!("wazuh-agent {}\n", wazuh_agent::VERSION), 0),
        _ => Config::load(cli.config.as_deref()).map_err(Error::Config)?,
    };
    match cli.mode {
        Mode::CheckConfig => {
            config.check_build().map_err(Error::Config)?;
            let head = config.source.as_ref().map(|p| format!("# configuration {} is valid", p.display()));
            let head = head.unwrap_or_else(|| "# no configuration file; built-in defaults".into());
            print(&format!("{head}\n{}", config.render()), 0)
        }
        Mode::Register(args) => {
            logging::init(&config, true).map_err(Error::Log)?;
            let creds = register::register(&config, &args).map_err(Error::Register)?;
            log::info!("registered as {} ({})", creds.name, creds.uuid);
            print(&format!("{}\n", creds.uuid), 0)
        }
        Mode::Run => {
            config.check_build().map_err(Error::Config)?;
            logging::init(&config, false).map_err(Error::Log)?;
            match supervisor::run(&config).map_err(Error::Run)? {
                supervisor::Stopped::Signal => Ok(0),
                supervisor::Stopped::Restart => Err(Error::Restart(restart())),
            }
        }
        Mode::Send => {
            let reply = ingest::send(&config.agent.run_dir, &mut std::io::stdin().lock()).map_err(Error::Send)?;
            let code = if reply.rejected == 0 && reply.errors.is_empty() { 0 } else { 1 };
            print(&format!("{}\n", serde_json::to_string(&reply).unwrap_or_default()), code)
        }
        Mode::Status => print_status(&config),
        Mode::Help | Mode::Version => Ok(0),
    }
}

/// Replaces this process with a fresh start of the same binary and arguments (same pid, so pid
/// files and init scripts stay valid). Returns only on failure: exit 1, the init system restarts.
fn restart() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // /proc/self/exe is the binary that runs, even if its path was replaced meanwhile.
    let exe = std::fs::read_link("/proc/self/exe").ok().filter(|p| p.exists());
    let exe = exe.or_else(|| std::env::current_exe().ok()).unwrap_or_else(|| arg0.clone().into());
    std::process::Command::new(exe).arg0(arg0).args(args).exec()
}

/// Writes the result of a one-shot mode, then exits with `code`. A reader that went away
/// (`--check-config | head -1`) is not a failure: the process ends quietly with 0.
fn print(text: &str, code: u8) -> Result<u8, Error> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => result.map(|()| code).map_err(Error::Stdout),
    }
}

/// `--status`: prints the state as one JSON object with `running`; 0 running, 3 not.
fn print_status(config: &Config) -> Result<u8, Error> {
    let (state, verdict) = status::read_status(&config.agent.run_dir, std::time::SystemTime::now());
    let mut doc = state.and_then(|s| serde_json::to_value(s).ok()).unwrap_or_else(|| serde_json::json!({}));
    if let serde_json::Value::Object(map) = &mut doc {
        map.insert("running".into(), verdict.is_ok().into());
        if let Err(why) = &verdict {
            map.insert("reason".into(), why.to_string().into());
        }
    }
    print(&format!("{doc}\n"), if verdict.is_ok() { 0 } else { 3 })
}
