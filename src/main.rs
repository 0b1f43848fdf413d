//! The `svcproxy` binary: parse the command line, set up logging, run the command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use svcproxy::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Usage errors exit 1, not clap's 2: for svcproxy, 2 means "compiled, but something was
    // skipped", and scripts must be able to tell the two apart.
    // Installed as `kubectl-svcproxy`, svcproxy is a kubectl plugin: `kubectl svcproxy trace …`
    // reads the cluster through the current kubeconfig context by default.
    let plugin = std::env::args_os()
        .next()
        .is_some_and(|a| svcproxy::cli::is_kubectl_plugin(&a));
    let parsed = if plugin {
        use clap::{CommandFactory, FromArgMatches};
        Cli::command()
            .name("kubectl-svcproxy")
            .bin_name("kubectl svcproxy")
            .try_get_matches()
            .and_then(|m| Cli::from_arg_matches(&m))
    } else {
        Cli::try_parse()
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let level = match cli.verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("SVCPROXY_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    let ansi = std::io::stderr().is_terminal();
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // The agent's lines carry a time; a one-shot command's messages need none.
        LogFormat::Text if matches!(cli.command, Command::Run(_)) => logs.with_ansi(ansi).init(),
        LogFormat::Text => logs.with_ansi(ansi).without_time().init(),
    }
    ExitCode::from(svcproxy::cli::run_as(cli, plugin))
}

/// At most two glibc malloc arenas. By default glibc gives each thread that allocates an arena
/// of its own, up to eight per core; the agent converts objects on tokio's workers and compiles
/// on a blocking thread, so memory freed by one thread's work sits in an arena the next work
/// does not use, and the agent's peak RSS at 10k Services was about a fifth higher than with
/// one arena (benches/memory.rs). Its threads rarely allocate at the same time, so the lock
/// contention this trades for is negligible. `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator tunable; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
