//! A small world of network namespaces for real-packet tests: a node where svcproxy's rules are
//! loaded, pods on it and on a second node, and a client outside the cluster.
//!
//! ```text
//!   client (203.0.113.2) ── eth-x ── node (203.0.113.1, 192.168.100.1) ── eth-r ── remote node (192.168.100.2)
//!                                    │ vpK: 10.244.1.1/32                          │ vpK: 10.244.2.1/32
//!                                  pods 10.244.1.K+10                            pods 10.244.2.K+10
//! ```
//!
//! Pods are routed, not bridged (each has a veth and a /32, like the ptp CNI plugin), so every
//! packet between pods crosses the node's IP stack and its rules. Namespaces are named uniquely
//! per world and deleted when it is dropped, on success or failure. Servers are threads whose
//! sockets live in the pod's namespace; they answer "<pod> <client address>" and stop when the
//! world is dropped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The node's address towards the client: the one NodePorts are tested on.
pub const NODE_IP: &str = "203.0.113.1";
pub const CLIENT_IP: &str = "203.0.113.2";
pub const NODE_IP_TO_REMOTE: &str = "192.168.100.1";
pub const REMOTE_NODE_IP: &str = "192.168.100.2";
/// The same links' IPv6 addresses (pods get `fd01:244:1::/64` here, `fd01:244:2::/64` on the
/// remote node).
pub const NODE_IP6: &str = "fd00:203::1";
pub const CLIENT_IP6: &str = "fd00:203::2";
pub const NODE_IP6_TO_REMOTE: &str = "fd00:100::1";
pub const REMOTE_NODE_IP6: &str = "fd00:100::2";

static WORLDS: AtomicUsize = AtomicUsize::new(0);

/// A bare network namespace, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn add(name: impl Into<String>) -> Netns {
        let name = name.into();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    /// `nft list ruleset` in the namespace.
    pub fn nft_ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip` (or any command) and fails the test with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it creates live there.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// What a server answered: the pod's name and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub pod: String,
    pub peer: IpAddr,
    /// The server's own port (to tell target ports apart).
    pub port: u16,
}

pub fn parse_reply(s: &str) -> io::Result<Reply> {
    let mut it = s.split_whitespace();
    let (Some(pod), Some(peer), Some(port)) = (it.next(), it.next(), it.next()) else {
        return Err(io::Error::other(format!("bad reply {s:?}")));
    };
    let peer: SocketAddr = peer.parse().map_err(io::Error::other)?;
    Ok(Reply {
        pod: pod.to_string(),
        peer: peer.ip(),
        port: port.parse().map_err(io::Error::other)?,
    })
}

/// One TCP request from namespace `ns`: connect, read the reply.
pub fn tcp(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<Reply> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        parse_reply(&buf)
    })
}

/// A UDP socket created in namespace `ns` (it stays there), for clients that keep their socket.
pub fn udp_socket(ns: &str) -> UdpSocket {
    in_ns(ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    })
}

/// One datagram and its answer, on a socket from [`udp_socket`].
pub fn udp_ask(sock: &UdpSocket, to: SocketAddr) -> io::Result<Reply> {
    sock.send_to(b"hello", to)?;
    let mut buf = [0u8; 256];
    let (n, _) = sock.recv_from(&mut buf)?;
    parse_reply(&String::from_utf8_lossy(&buf[..n]))
}

/// A pod: its namespace, name and address.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: IpAddr,
    pub ip6: IpAddr,
    /// `node-a` (the proxy's node) or `node-b` (the remote one).
    pub node: &'static str,
}

pub struct World {
    prefix: String,
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    pods_here: u8,
    pods_remote: u8,
    /// Every pod made so far.
    pub pods: Vec<Pod>,
    pub node: String,
    pub remote: String,
    pub client: String,
}

impl World {
    /// Builds the node, the remote node and the client; fails the test when this process
    /// cannot create namespaces.
    pub fn new() -> Option<World> {
        if !super::can_unshare_net()
            || !super::have_nft()
            || Command::new("ip").arg("-V").output().is_err()
        {
            super::cannot_run("real-packet tests need root, iproute2 and nft");
        }
        let n = WORLDS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("sp{}-{n}", std::process::id());
        let mut w = World {
            node: format!("{prefix}-node"),
            remote: format!("{prefix}-remote"),
            client: format!("{prefix}-client"),
            prefix,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            pods_here: 0,
            pods_remote: 0,
            pods: Vec::new(),
        };
        let (node, remote, client) = (w.node.clone(), w.remote.clone(), w.client.clone());
        for ns in [&node, &remote, &client] {
            w.add_ns(ns);
        }
        for ns in [&node, &remote] {
            for sysctl in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
                "net.ipv6.conf.all.forwarding=1",
            ] {
                sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", sysctl]);
            }
        }
        // node <-> client
        sh(&[
            "ip", "-n", &node, "link", "add", "eth-x", "type", "veth", "peer", "name", "eth0",
            "netns", &client,
        ]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "eth-x",
        ]);
        sh(&[
            "ip",
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &node, "link", "set", "eth-x", "up"]);
        sh(&["ip", "-n", &client, "link", "set", "eth0", "up"]);
        sh(&[
            "ip", "-n", &client, "route", "add", "default", "via", NODE_IP,
        ]);
        // node <-> remote node
        sh(&[
            "ip", "-n", &node, "link", "add", "eth-r", "type", "veth", "peer", "name", "eth0",
            "netns", &remote,
        ]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP_TO_REMOTE}/24"),
            "dev",
            "eth-r",
        ]);
        sh(&[
            "ip",
            "-n",
            &remote,
            "addr",
            "add",
            &format!("{REMOTE_NODE_IP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &node, "link", "set", "eth-r", "up"]);
        sh(&["ip", "-n", &remote, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &remote,
            "route",
            "add",
            "default",
            "via",
            NODE_IP_TO_REMOTE,
        ]);
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            REMOTE_NODE_IP,
        ]);
        // The node's default route points at the client side, so that the node itself has a
        // route to ClusterIPs (as a real node has a default route).
        sh(&[
            "ip", "-n", &node, "route", "add", "default", "via", CLIENT_IP,
        ]);
        // IPv6 on the same links.
        for (ns, dev, addr) in [
            (&node, "eth-x", NODE_IP6),
            (&client, "eth0", CLIENT_IP6),
            (&node, "eth-r", NODE_IP6_TO_REMOTE),
            (&remote, "eth0", REMOTE_NODE_IP6),
        ] {
            let addr = format!("{addr}/64");
            sh(&[
                "ip", "-n", ns, "-6", "addr", "add", &addr, "dev", dev, "nodad",
            ]);
        }
        for (ns, to, via) in [
            (&client, "default", NODE_IP6),
            (&remote, "default", NODE_IP6_TO_REMOTE),
            (&node, "fd01:244:2::/64", REMOTE_NODE_IP6),
            (&node, "default", CLIENT_IP6),
        ] {
            sh(&["ip", "-n", ns, "-6", "route", "add", to, "via", via]);
        }
        Some(w)
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        // No duplicate address detection (an address would be unusable for a second or two),
        // and IPv6 sockets for IPv6 only, so that servers listen on both families separately.
        for sysctl in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.bindv6only=1",
        ] {
            sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", sysctl]);
        }
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A pod on the proxy's node (`remote: false`) or on the remote node.
    pub fn pod(&mut self, name: &str, remote: bool) -> Pod {
        let (host, subnet, k) = if remote {
            self.pods_remote += 1;
            (self.remote.clone(), 2, self.pods_remote)
        } else {
            self.pods_here += 1;
            (self.node.clone(), 1, self.pods_here)
        };
        let ns = format!("{}-pod-{name}", self.prefix);
        self.add_ns(&ns);
        let ip = format!("10.244.{subnet}.{}", 10 + k);
        let gw = format!("10.244.{subnet}.1");
        let veth = format!("vp{k}");
        sh(&[
            "ip", "-n", &host, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{gw}/32"),
            "dev",
            &veth,
        ]);
        sh(&["ip", "-n", &host, "link", "set", &veth, "up"]);
        sh(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &veth,
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip", "-n", &ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
        ]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &gw]);
        let ip6 = format!("fd01:244:{subnet}::{}", 10 + k);
        let gw6 = format!("fd01:244:{subnet}::1");
        for args in [
            vec![
                "-n", &host, "-6", "addr", "add", &gw6, "dev", &veth, "nodad",
            ],
            vec!["-n", &host, "-6", "route", "add", &ip6, "dev", &veth],
            vec!["-n", &ns, "-6", "addr", "add", &ip6, "dev", "eth0", "nodad"],
            vec!["-n", &ns, "-6", "route", "add", &gw6, "dev", "eth0"],
            vec![
                "-n", &ns, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
            ],
        ] {
            let mut argv = vec!["ip"];
            argv.extend(args);
            sh(&argv);
        }
        let pod = Pod {
            name: name.to_string(),
            ns,
            ip: ip.parse().unwrap(),
            ip6: ip6.parse().unwrap(),
            node: if remote { "node-b" } else { "node-a" },
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Starts TCP and UDP servers on `port`, IPv4 and IPv6, in the pod (or any namespace holding
    /// `ip`).
    pub fn serve(&mut self, pod: &Pod, port: u16) {
        for any in ["0.0.0.0", "::"] {
            let name = pod.name.clone();
            let stop = self.stop.clone();
            let listener = in_ns(&pod.ns, move || TcpListener::bind((any, port)).unwrap());
            listener.set_nonblocking(true).unwrap();
            let tcp_name = name.clone();
            let tcp_stop = stop.clone();
            self.servers.push(std::thread::spawn(move || {
                while !tcp_stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.write_all(format!("{tcp_name} {peer} {port}\n").as_bytes());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let sock = in_ns(&pod.ns, move || UdpSocket::bind((any, port)).unwrap());
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            self.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(format!("{name} {peer} {port}\n").as_bytes(), peer);
                    }
                }
            }));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// Calls `f` until it returns `Some`, for at most `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
