//! Running the kernel's tools (nft, iptables-restore, iptables-save, iptables): the one command
//! runner both backends share.
//!
//! A [`Runner`] says where the tools run: in this network namespace, in another one (entered as
//! `ip netns exec NAME` would, for tests and benches), or against an in-memory kernel
//! ([`Tools`] implemented by `fake_kernel::FakeKernel`), so that the backends and the agent
//! loop are tested without root.
//! The backends build argument vectors and read answers; only [`System`] starts processes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

/// What a program answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ran {
    /// Its exit status (`None`: killed by a signal).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// It exited 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Exit 0 with this output.
    pub fn ok(stdout: impl Into<String>) -> Ran {
        Ran {
            status: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// Exit `status` with this error output.
    pub fn failed(status: i32, stderr: impl Into<String>) -> Ran {
        Ran {
            status: Some(status),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Something that runs the kernel's tools: the real programs ([`System`]) or a fake kernel.
pub trait Tools: Send + Sync + std::fmt::Debug {
    /// Runs `argv` (the program first) with `input` on its standard input, and waits for it.
    /// `Err`: it could not be started (`NotFound`: no such program).
    fn run(&self, argv: &[String], input: Option<&str>) -> std::io::Result<Ran>;
}

/// The real programs, started as processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Tools for System {
    fn run(&self, argv: &[String], input: Option<&str>) -> std::io::Result<Ran> {
        let Some((program, args)) = argv.split_first() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no program",
            ));
        };
        let mut command = Command::new(program);
        command.args(args);
        match input {
            Some(input) => feed(&mut command, input),
            None => {
                let out = command.stdin(Stdio::null()).output()?;
                Ok(Ran {
                    status: out.status.code(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        }
    }
}

/// The real programs, started inside a named network namespace: from a short-lived thread that
/// has entered it (`setns`), so that the child starts there, as `ip netns exec NAME` would
/// start it, without the `ip` process in between (about 6 ms per run on a 2-core machine, more
/// than a small nft transaction costs). The tools need nothing else `ip netns exec` sets up:
/// they read `/proc/self/net` and talk netlink, both per network namespace.
#[derive(Debug, Clone)]
struct InNetns {
    name: String,
}

impl Tools for InNetns {
    fn run(&self, argv: &[String], input: Option<&str>) -> std::io::Result<Ran> {
        let path = std::path::Path::new("/run/netns").join(&self.name);
        let argv = argv.to_vec();
        let input = input.map(str::to_string);
        in_namespace(&path, move || System.run(&argv, input.as_deref()))?
    }
}

/// Runs `f` on a short-lived thread that has entered the network namespace at `path` (as `ip
/// netns add` makes them, `/run/netns/NAME`): what it opens (a netlink socket) or starts (a
/// child process) belongs to that namespace. No other thread changes namespace. `Err`: the
/// namespace could not be entered (never `NotFound`, which means a missing program).
pub fn in_namespace<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    let failed = |what: &str, e: std::io::Error| {
        std::io::Error::other(format!("{what} network namespace {}: {e}", path.display()))
    };
    let netns = std::fs::File::open(path).map_err(|e| failed("opening", e))?;
    let entered = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            // SAFETY: setns(2) on a valid fd; it changes the network namespace of this thread
            // only, which ends when `f` returns.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?;
    entered.map_err(|e| failed("entering", e))
}

/// The tools could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot run `{program}`: {source}")]
pub struct RunError {
    /// The command line, prefix included.
    pub program: String,
    #[source]
    pub source: std::io::Error,
}

impl RunError {
    /// The program is not installed (where it was looked for).
    pub fn not_found(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }
}

/// Where a runner's tools act, for what reaches the kernel some other way (conntrack over
/// netlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// This network namespace.
    Here,
    /// The named network namespace.
    Netns(String),
    /// An in-memory kernel: nothing else reaches it.
    Fake,
}

/// How and where the kernel's tools run: one type for nft, iptables-restore/-save and
/// iptables.
#[derive(Clone)]
pub struct Runner {
    place: Place,
    tools: Arc<dyn Tools>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Runner").field(&self.place).finish()
    }
}

/// Two runners are equal when they run the same way in the same place (two fakes: the same
/// fake).
impl PartialEq for Runner {
    fn eq(&self, other: &Runner) -> bool {
        self.place == other.place
            && (self.place != Place::Fake || Arc::ptr_eq(&self.tools, &other.tools))
    }
}

impl Eq for Runner {}

impl Default for Runner {
    fn default() -> Runner {
        Runner::here()
    }
}

impl Runner {
    /// The programs of this network namespace.
    pub fn here() -> Runner {
        Runner {
            place: Place::Here,
            tools: Arc::new(System),
        }
    }

    /// The programs run inside the named network namespace (`/run/netns/NAME`, as `ip netns
    /// add` makes it).
    pub fn in_netns(name: &str) -> Runner {
        Runner {
            place: Place::Netns(name.to_string()),
            tools: Arc::new(InNetns {
                name: name.to_string(),
            }),
        }
    }

    /// The tools of an in-memory kernel.
    pub fn fake(tools: Arc<dyn Tools>) -> Runner {
        Runner {
            place: Place::Fake,
            tools,
        }
    }

    /// Where the tools act.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Runs `program args…` (with `input` on its standard input) and waits for it.
    pub fn run(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<Ran, RunError> {
        let mut argv = vec![program.to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        self.tools.run(&argv, input).map_err(|source| RunError {
            program: match &self.place {
                Place::Netns(name) => format!("{} (in network namespace {name})", argv.join(" ")),
                Place::Here | Place::Fake => argv.join(" "),
            },
            source,
        })
    }

    /// Whether `program` ran at all (`--version`): installed where the runner looks.
    pub fn installed(&self, program: &str) -> bool {
        self.run(program, &["--version"], None)
            .is_ok_and(|r| r.success())
    }
}

/// Runs `command` with `input` on its standard input and waits for it. `Err`: it could not be
/// started. The tools read their whole input before they answer, so writing it first cannot
/// deadlock on their (small) output. When a tool says nothing on error, the error output says
/// why its input could not be written, if it could not.
fn feed(command: &mut Command, input: &str) -> std::io::Result<Ran> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output()?;
    let mut ran = Ran {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    };
    if let Err(e) = written
        && !ran.success()
        && ran.stderr.is_empty()
    {
        ran.stderr = format!("writing the input: {e}");
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_not_a_missing_program() {
        let e = Runner::in_netns("svcproxy-no-such-netns")
            .run("true", &[], None)
            .unwrap_err();
        assert!(!e.not_found(), "{e}");
        assert!(e.to_string().contains("svcproxy-no-such-netns"), "{e}");
    }

    #[test]
    fn a_missing_program_is_a_run_error_that_says_so() {
        let e = Runner::here()
            .run("svcproxy-no-such-program", &[], Some("x"))
            .unwrap_err();
        assert!(e.not_found());
        assert!(e.to_string().contains("svcproxy-no-such-program"), "{e}");
    }

    #[test]
    fn input_and_output_pass_through() {
        let r = Runner::here().run("cat", &[], Some("hello")).unwrap();
        assert!(r.success());
        assert_eq!(r.stdout, "hello");
        let r = Runner::here()
            .run("sh", &["-c", "echo no >&2; exit 3"], None)
            .unwrap();
        assert_eq!((r.status, r.stderr.as_str()), (Some(3), "no"));
    }
}
