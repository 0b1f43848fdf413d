//! Running the kernel's tools (nft, iptables-restore) on an input of ours.

use std::io::Write;
use std::process::{Command, Stdio};

/// How feeding a tool its input went.
#[derive(Debug)]
pub enum Fed {
    /// It exited 0.
    Accepted,
    /// It exited otherwise: its status and its error output (or, if it said nothing, why its
    /// input could not be written).
    Refused { status: Option<i32>, stderr: String },
}

/// Runs `command` with `input` on its standard input and waits for it. `Err`: it could not be
/// started. The tools read their whole input before they answer, so writing it first cannot
/// deadlock on their (small) output.
pub fn feed(command: &mut Command, input: &str) -> std::io::Result<Fed> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(Fed::Accepted);
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if let Err(e) = written
        && stderr.is_empty()
    {
        stderr = format!("writing the input: {e}");
    }
    Ok(Fed::Refused {
        status: out.status.code(),
        stderr,
    })
}
