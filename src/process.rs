//! Running the kernel's tools (nft, iptables-restore, iptables-save, iptables): the one command
//! runner both backends share.
//!
//! A [`Runner`] says where the tools run: in this network namespace, in another one (entered as
//! `ip netns exec NAME` would, for tests and benches), or against an in-memory kernel
//! ([`Tools`] implemented by `fake_kernel::FakeKernel`), so that the backends and the agent
//! loop are tested without root.
//! The backends build argument vectors and read answers; only [`System`] starts processes.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
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

    /// Runs `argv` with nothing on its standard input and hands its standard output to `read`
    /// as it comes, so that a large listing is never held whole; the answer's `stdout` is
    /// empty. What `read` leaves unread is discarded. By default the whole output is collected
    /// first (an in-memory kernel's answers are small).
    fn run_reading(
        &self,
        argv: &[String],
        read: &mut dyn FnMut(&mut dyn Read),
    ) -> std::io::Result<Ran> {
        let mut ran = self.run(argv, None)?;
        read(&mut std::mem::take(&mut ran.stdout).as_bytes());
        Ok(ran)
    }

    /// Runs `argv` with what `write` writes on its standard input, as it is written, so that a
    /// large script is never held whole. If `write` panics, the program is killed before its
    /// input ends (it never sees a script cut short as a whole one). By default the input is
    /// collected first.
    fn run_writing(
        &self,
        argv: &[String],
        write: &mut dyn FnMut(&mut dyn Write),
    ) -> std::io::Result<Ran> {
        let mut input = Vec::new();
        write(&mut input);
        let input = String::from_utf8(input)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.run(argv, Some(&input))
    }
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

    fn run_reading(
        &self,
        argv: &[String],
        read: &mut dyn FnMut(&mut dyn Read),
    ) -> std::io::Result<Ran> {
        read_output(spawn(argv, false)?, read)
    }

    fn run_writing(
        &self,
        argv: &[String],
        write: &mut dyn FnMut(&mut dyn Write),
    ) -> std::io::Result<Ran> {
        write_input(spawn(argv, true)?, write)
    }
}

/// Starts `argv` with its output and error output piped, and its input too if `input`.
fn spawn(argv: &[String], input: bool) -> std::io::Result<Child> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no program",
        ));
    };
    Command::new(program)
        .args(args)
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Collects `pipe` (an error output: a line or two) on a thread, so that it cannot fill up
/// and stall the program while this thread reads or writes its other pipe.
fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        text
    })
}

/// Hands `child`'s standard output to `read`, then drains what is left of it and waits.
fn read_output(mut child: Child, read: &mut dyn FnMut(&mut dyn Read)) -> std::io::Result<Ran> {
    let errors = collect(child.stderr.take().expect("piped stderr"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    read(&mut stdout);
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let status = child.wait()?;
    Ok(Ran {
        status: status.code(),
        stdout: String::new(),
        stderr: text(&errors.join().unwrap_or_default()),
    })
}

/// Lets `write` write `child`'s standard input, ends it, and waits. If `write` panics, the
/// child is killed while its input is still open, and the panic goes on.
fn write_input(mut child: Child, write: &mut dyn FnMut(&mut dyn Write)) -> std::io::Result<Ran> {
    let output = collect(child.stdout.take().expect("piped stdout"));
    let errors = collect(child.stderr.take().expect("piped stderr"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&mut stdin)));
    if let Err(panic) = wrote {
        let _ = child.kill();
        let _ = child.wait();
        std::panic::resume_unwind(panic);
    }
    drop(stdin);
    let status = child.wait()?;
    Ok(Ran {
        status: status.code(),
        stdout: String::from_utf8_lossy(&output.join().unwrap_or_default()).into_owned(),
        stderr: text(&errors.join().unwrap_or_default()),
    })
}

/// An error output as text, without its trailing newline.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
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

    /// The child is started in the namespace; its output is read here, as it comes.
    fn run_reading(
        &self,
        argv: &[String],
        read: &mut dyn FnMut(&mut dyn Read),
    ) -> std::io::Result<Ran> {
        read_output(self.spawn(argv, false)?, read)
    }

    /// As [`InNetns::run_reading`], with its input written here.
    fn run_writing(
        &self,
        argv: &[String],
        write: &mut dyn FnMut(&mut dyn Write),
    ) -> std::io::Result<Ran> {
        write_input(self.spawn(argv, true)?, write)
    }
}

impl InNetns {
    /// [`spawn`] in the namespace.
    fn spawn(&self, argv: &[String], input: bool) -> std::io::Result<Child> {
        let path = std::path::Path::new("/run/netns").join(&self.name);
        let argv = argv.to_vec();
        in_namespace(&path, move || spawn(&argv, input))?
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
        let argv = argv(program, args);
        self.tools
            .run(&argv, input)
            .map_err(|source| self.run_error(&argv, source))
    }

    fn run_error(&self, argv: &[String], source: std::io::Error) -> RunError {
        RunError {
            program: match &self.place {
                Place::Netns(name) => format!("{} (in network namespace {name})", argv.join(" ")),
                Place::Here | Place::Fake => argv.join(" "),
            },
            source,
        }
    }

    /// Runs `program args…` and hands its standard output to `read` as it comes (see
    /// [`Tools::run_reading`]); the answer's `stdout` is empty.
    pub fn run_reading(
        &self,
        program: &str,
        args: &[&str],
        read: &mut dyn FnMut(&mut dyn Read),
    ) -> Result<Ran, RunError> {
        let argv = argv(program, args);
        self.tools
            .run_reading(&argv, read)
            .map_err(|source| self.run_error(&argv, source))
    }

    /// Runs `program args…` with what `write` writes on its standard input, as it is written
    /// (see [`Tools::run_writing`]).
    pub fn run_writing(
        &self,
        program: &str,
        args: &[&str],
        write: &mut dyn FnMut(&mut dyn Write),
    ) -> Result<Ran, RunError> {
        let argv = argv(program, args);
        self.tools
            .run_writing(&argv, write)
            .map_err(|source| self.run_error(&argv, source))
    }

    /// Whether `program` ran at all (`--version`): installed where the runner looks.
    pub fn installed(&self, program: &str) -> bool {
        self.run(program, &["--version"], None)
            .is_ok_and(|r| r.success())
    }
}

/// The program, then its arguments.
fn argv(program: &str, args: &[&str]) -> Vec<String> {
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect()
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

    #[test]
    fn output_is_streamed_and_what_is_left_unread_is_drained() {
        // 1 MiB of output, more than a pipe holds, of which only the first line is read: the
        // rest must be drained for the program to finish.
        let mut first = String::new();
        let r = Runner::here()
            .run_reading(
                "sh",
                &[
                    "-c",
                    "echo first; head -c 1048576 /dev/zero; echo oops >&2; exit 4",
                ],
                &mut |out| {
                    let mut line = [0u8; 6];
                    out.read_exact(&mut line).unwrap();
                    first = String::from_utf8_lossy(&line).into_owned();
                },
            )
            .unwrap();
        assert_eq!(first, "first\n");
        assert_eq!(
            (r.status, r.stdout.as_str(), r.stderr.as_str()),
            (Some(4), "", "oops")
        );
        let e = Runner::here()
            .run_reading("svcproxy-no-such-program", &[], &mut |_| {})
            .unwrap_err();
        assert!(e.not_found());
    }

    #[test]
    fn input_is_streamed_and_a_panicking_writer_kills_the_program_first() {
        // 1 MiB of input, more than a pipe holds, written in parts as the program reads it.
        let r = Runner::here()
            .run_writing("wc", &["-c"], &mut |input| {
                for _ in 0..16 {
                    input.write_all(&[b'x'; 65536]).unwrap();
                }
            })
            .unwrap();
        assert_eq!((r.status, r.stdout.trim()), (Some(0), "1048576"));
        // A writer that panics halfway: the program must not finish as if its input were
        // whole. `sh` exits 0 only after reading to the end, and writes a mark then.
        let mark = std::env::temp_dir().join(format!("svcproxy-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&mark);
        let script = format!("cat >/dev/null && touch {}", mark.display());
        let panicked = std::panic::catch_unwind(|| {
            Runner::here().run_writing("sh", &["-c", &script], &mut |input| {
                input.write_all(b"part of it").unwrap();
                panic!("the writer failed");
            })
        });
        assert!(panicked.is_err());
        // The shell was killed and reaped before the panic went on: it cannot touch it later.
        assert!(!mark.exists(), "the program saw its input end");
    }
}
