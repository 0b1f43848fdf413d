//! Running the kernel's tools (nft, iptables-restore, iptables-save, iptables): the one command
//! runner both backends share.
//!
//! A [`Runner`] says where the tools run: in this network namespace, in another one (`ip netns
//! exec NAME`, for tests), or against an in-memory kernel ([`Tools`] implemented by
//! `fake_kernel::FakeKernel`), so that the backends and the agent loop are tested without root.
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

    /// The programs run inside the named network namespace (`ip netns exec NAME`).
    pub fn in_netns(name: &str) -> Runner {
        Runner {
            place: Place::Netns(name.to_string()),
            tools: Arc::new(System),
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

    /// The whole command line of `program args…`.
    pub fn argv(&self, program: &str, args: &[&str]) -> Vec<String> {
        let mut argv = match &self.place {
            Place::Netns(name) => ["ip", "netns", "exec", name].map(String::from).to_vec(),
            Place::Here | Place::Fake => Vec::new(),
        };
        argv.push(program.to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Runs `program args…` (with `input` on its standard input) and waits for it.
    pub fn run(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<Ran, RunError> {
        let argv = self.argv(program, args);
        self.tools.run(&argv, input).map_err(|source| RunError {
            program: argv.join(" "),
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
    fn a_netns_runner_prefixes_ip_netns_exec() {
        assert_eq!(
            Runner::in_netns("n1").argv("nft", &["-f", "-"]),
            ["ip", "netns", "exec", "n1", "nft", "-f", "-"]
        );
        assert_eq!(Runner::here().argv("nft", &[]), ["nft"]);
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
