//! The agent's state, served read-only (see [`fetch`]).

use crate::model::{ProxyConfig, Snapshot};

/// Reads a running agent's last applied snapshot and its configuration.
pub fn fetch(addr: &str) -> Result<(Snapshot, ProxyConfig), String> {
    Err(format!("--agent {addr}: not implemented yet"))
}
