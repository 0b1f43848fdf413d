//! The house's arrows, checked: every `crate::room` a module of `src/` names must be a room its
//! own room may depend on (docs/architecture.md draws them). The flow goes one way, source →
//! model → plan → backend → kernel; the pure core knows no backend, and neither backend knows
//! the other. A new import against the flow fails this test, so the layering cannot slip
//! unnoticed. Comments and a file's `#[cfg(test)]` part (unit tests may use any test data) are
//! not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each room and the rooms it may import. A room is a top-level module of `src/` (a file or a
/// directory); `lib` is `src/lib.rs`'s own items (`crate::compile`).
const ROOMS: &[(&str, &[&str])] = &[
    // The pure core: no I/O, no backend.
    ("model", &[]),
    ("duration", &[]),
    ("convert", &["model"]),
    ("plan", &["model"]),
    ("incremental", &["model", "plan"]),
    // Where a packet goes and why, and the table of frontends: read from the plan alone.
    ("trace", &["model", "plan"]),
    ("services", &["model", "plan", "trace"]),
    ("synthetic", &["model"]),
    ("manifests", &["model", "convert"]),
    // Stale conntrack flows: the pure computation and its netlink writer (in the namespace a
    // process::Place names).
    ("conntrack", &["model", "plan", "process"]),
    // What a sync did, whichever backend did it.
    ("report", &["model", "conntrack", "incremental"]),
    // The one way to run a program.
    ("process", &[]),
    // The in-memory kernel: the tools' side of process::Tools, nothing of svcproxy's.
    ("fake_kernel", &["process"]),
    // The two backends, side by side: neither imports the other.
    (
        "nft",
        &[
            "model",
            "plan",
            "incremental",
            "report",
            "conntrack",
            "process",
        ],
    ),
    (
        "iptables",
        &[
            "model",
            "plan",
            "incremental",
            "report",
            "conntrack",
            "process",
        ],
    ),
    ("lib", &["model", "plan", "nft"]),
    // Reading both backends' tables back and comparing them with the plan.
    ("verify", &["model", "plan", "nft", "iptables"]),
    // The seam over both backends.
    (
        "backend",
        &[
            "model",
            "plan",
            "report",
            "conntrack",
            "incremental",
            "nft",
            "iptables",
            "verify",
            "process",
        ],
    ),
    // The configuration file and flags' meaning (no I/O but reading the file).
    ("config", &["model", "convert", "duration"]),
    // The node agent: the watch, the sync loop, its servers. It reaches the kernel only through
    // the backend seam: neither backend is named here.
    (
        "agent",
        &[
            "model",
            "convert",
            "plan",
            "duration",
            "report",
            "conntrack",
            "backend",
            "config",
        ],
    ),
];

/// The binary's edge may use every room.
const EDGE: &[&str] = &["cli", "main"];

fn room_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The rooms a file names as `crate::room`, outside comments and its `#[cfg(test)]` part.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.starts_with("//") {
            continue;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b::c}`.
        if let Some(i) = code.find("crate::{") {
            let group = &code[i + "crate::{".len()..];
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn every_import_follows_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rooms: BTreeMap<&str, &[&str]> = ROOMS.iter().copied().collect();
    let known: BTreeSet<&str> = rooms.keys().copied().chain(EDGE.iter().copied()).collect();
    // lib.rs's own public functions, named as `crate::name`.
    let lib_items = ["compile"];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    for file in &files {
        let room = room_of(file, &src);
        assert!(
            known.contains(room.as_str()),
            "{}: room {room:?} is not in tests/layering.rs (add it, with its arrows, and to \
             docs/architecture.md)",
            file.display()
        );
        if EDGE.contains(&room.as_str()) {
            continue;
        }
        let allowed = rooms[room.as_str()];
        let text = std::fs::read_to_string(file).unwrap();
        for target in imports(&text) {
            let target = if lib_items.contains(&target.as_str()) {
                "lib".to_string()
            } else {
                target
            };
            if target == room || allowed.contains(&target.as_str()) {
                continue;
            }
            violations.push(format!(
                "{}: room {room} imports {target}",
                file.strip_prefix(&src).unwrap().display()
            ));
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the flow (docs/architecture.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_and_skips_comments_and_tests() {
    let text = "//! see [`crate::agent`]\nuse crate::{model::X, plan};\nlet x = crate::nft::render(); // crate::cli\n#[cfg(test)]\nuse crate::synthetic;\n";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["model", "nft", "plan"]);
}
