//! The plan, rendered as svcproxy's iptables chains in the `nat` and `filter` tables, one
//! [`FamilyRules`] per IP family (iptables for IPv4, ip6tables for IPv6).
//!
//! # Layout, and why
//! iptables has no maps: a destination is found by walking rules, so the layout follows
//! kube-proxy's iptables mode, the shape operators know, with three changes that cut the number
//! of kernel objects (what makes iptables-nft slow at scale, ../shared/NOTES-kernel.md):
//!
//! * `nat`: `SVCP-SERVICES` (entered from PREROUTING and OUTPUT) has one rule per address,
//!   protocol and port, jumping to the Service port's endpoint chain `SVCP-SVC-<hash>` (or, for
//!   externalTrafficPolicy Local endpoints, `SVCP-SVL-<hash>`), or for external destinations to
//!   `SVCP-EXT-<hash>`, which marks for masquerading (Cluster policy) or tells pods and the node
//!   (cluster-wide endpoints) from outside clients (local endpoints only). NodePorts go through
//!   `SVCP-NODEPORTS`, entered last, for local non-loopback addresses (`addrtype LOCAL`, the
//!   kernel's own view at packet time, like the nftables backend's `fib daddr type local`).
//! * An endpoint chain picks an endpoint with `statistic random` rules (probability 1/(n-i) for
//!   the i-th, so that each is equally likely) that DNAT directly. Only endpoints that need
//!   more than a DNAT get a chain of their own, `SVCP-SEP-<hash>`: an endpoint on this node (a
//!   pod reaching itself through its Service is marked for masquerading, hairpin) and endpoints
//!   of a ClientIP-affinity Service (`recent` lists, as kube-proxy). kube-proxy gives every
//!   endpoint a chain; at 10 endpoints per Service that is ten times more chains.
//! * `DROP` and `REJECT` are refused in `nat`, so drops (internalTrafficPolicy Local without a
//!   local endpoint, outside clients of an externalTrafficPolicy Local destination without one)
//!   and rejects (no endpoint at all, a port the ClusterIP does not have) live in `filter`'s
//!   `SVCP-FILTER`, entered for new connections from INPUT, FORWARD and OUTPUT. Its first rule
//!   returns at once for connections `nat` already DNATed (all working Service traffic), so
//!   only traffic that found no endpoint walks the list.
//! * Masquerading is kube-proxy's mark: `SVCP-MARK-MASQ` sets the masquerade bit, and
//!   `SVCP-POSTROUTING` masquerades marked packets. ClusterIP traffic from outside the cluster
//!   CIDRs (all of it with masquerade-all) is marked in the endpoint chain, matching the
//!   ClusterIP and port, so that the same chain serves external destinations unmarked.
//!
//! * loadBalancerSourceRanges and INVALID follow kube-proxy's iptables mode: a firewall chain
//!   `SVCP-FW-<hash>` per guarded Service port in `nat` (sources in the ranges go on to the
//!   external chain; the rest stay unDNATed and are dropped in `SVCP-FILTER`), and
//!   `SVCP-FORWARD` (from FORWARD) dropping `ctstate INVALID` unless `conntrack.tcpBeLiberal`.
//!
//! Every chain name starts with `SVCP-` (never kube-proxy's `KUBE-`); per-Service chains are
//! named by a stable hash (FNV-1a) of the Service port and scope, so the same Service keeps its
//! chain names across syncs and restarts and an incremental sync rewrites only changed chains.
//! Chains are only ever entered through the jump rules in [`jump_rules`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{IpFamily, ObjectRef, Protocol};
use crate::plan::{
    Address, Backends, ClusterIpMasquerade, Destination, DestinationKind, FamilyPlan, LocalTraffic,
    NodePortMatch, Plan, Route, Scope, stable_hash,
};

/// Every chain svcproxy owns starts with this (kube-proxy's are `KUBE-`).
pub const PREFIX: &str = "SVCP-";
/// The nat chain every new connection goes through (from PREROUTING and OUTPUT).
pub const SERVICES: &str = "SVCP-SERVICES";
/// The nat chain of NodePorts.
pub const NODEPORTS: &str = "SVCP-NODEPORTS";
/// The nat chain run from POSTROUTING: masquerades marked packets.
pub const POSTROUTING: &str = "SVCP-POSTROUTING";
/// The nat chain that marks a packet for masquerading.
pub const MARK_MASQ: &str = "SVCP-MARK-MASQ";
/// The nat chain that marks ClusterIP traffic from outside several cluster CIDRs.
const CIDR_MASQ: &str = "SVCP-CIDR-MASQ";
/// The filter chain run for new connections from INPUT, FORWARD and OUTPUT.
pub const FILTER: &str = "SVCP-FILTER";
/// The filter chain of NodePorts (drops and rejects).
const FILTER_NODEPORTS: &str = "SVCP-NODEPORTS";
/// The filter chain that refuses: TCP reset, else ICMP port unreachable.
const REJECT: &str = "SVCP-REJECT";
/// The filter chain run for every forwarded packet (kube-proxy's `KUBE-FORWARD`): drops
/// `ctstate INVALID` unless `conntrack.tcpBeLiberal`.
pub const FORWARD: &str = "SVCP-FORWARD";

/// A netfilter table svcproxy writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Nat, Table::Filter];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// One chain: its rules as iptables arguments after `-A CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

/// svcproxy's chains in one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    /// The fixed chains first, then the per-Service ones sorted by name.
    pub chains: Vec<Chain>,
}

/// What one family's `iptables-restore` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRules {
    pub family: IpFamily,
    /// `nat`, then `filter` (an error in `nat` then stops the restore before `filter`).
    pub tables: Vec<TableRules>,
}

/// The whole iptables rendering: IPv4, then IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub families: Vec<FamilyRules>,
}

/// A rule in a built-in chain that enters svcproxy's chains; installed outside the restore
/// input (a restore cannot add a rule only when it is missing), checked with `-C` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpRule {
    pub table: Table,
    pub chain: &'static str,
    /// The rule's arguments after the chain name.
    pub spec: &'static [&'static str],
}

/// The jump rules from the built-in chains, the same in both families.
pub fn jump_rules() -> &'static [JumpRule] {
    const SERVICES_JUMP: &[&str] = &[
        "-m",
        "comment",
        "--comment",
        "svcproxy: Kubernetes Services",
        "-j",
        SERVICES,
    ];
    const POSTROUTING_JUMP: &[&str] = &[
        "-m",
        "comment",
        "--comment",
        "svcproxy: masquerade",
        "-j",
        POSTROUTING,
    ];
    const FORWARD_JUMP: &[&str] = &[
        "-m",
        "comment",
        "--comment",
        "svcproxy: forwarding rules",
        "-j",
        FORWARD,
    ];
    const FILTER_JUMP: &[&str] = &[
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        "svcproxy: refuse or drop Service traffic without endpoints",
        "-j",
        FILTER,
    ];
    &[
        JumpRule {
            table: Table::Nat,
            chain: "PREROUTING",
            spec: SERVICES_JUMP,
        },
        JumpRule {
            table: Table::Nat,
            chain: "OUTPUT",
            spec: SERVICES_JUMP,
        },
        JumpRule {
            table: Table::Nat,
            chain: "POSTROUTING",
            spec: POSTROUTING_JUMP,
        },
        JumpRule {
            table: Table::Filter,
            chain: "INPUT",
            spec: FILTER_JUMP,
        },
        JumpRule {
            table: Table::Filter,
            chain: "FORWARD",
            spec: FILTER_JUMP,
        },
        JumpRule {
            table: Table::Filter,
            chain: "OUTPUT",
            spec: FILTER_JUMP,
        },
        JumpRule {
            table: Table::Filter,
            chain: "FORWARD",
            spec: FORWARD_JUMP,
        },
    ]
}

impl JumpRule {
    /// The rule as an iptables command line (after the program name), with `action` (`-C`,
    /// `-I`, `-D`).
    pub fn args(&self, action: &str) -> Vec<String> {
        let mut args = vec![
            "-t".to_string(),
            self.table.as_str().into(),
            action.into(),
            self.chain.into(),
        ];
        args.extend(self.spec.iter().map(|s| s.to_string()));
        args
    }

    /// The rule as a shell would show it (quoting arguments with spaces).
    pub fn shell(&self, program: &str, action: &str) -> String {
        let mut out = program.to_string();
        for a in self.args(action) {
            if a.contains(' ') {
                write!(out, " \"{a}\"").unwrap();
            } else {
                write!(out, " {a}").unwrap();
            }
        }
        out
    }
}

/// `SVCP-<kind>-<16 hex digits>`: 25 characters, within iptables' 28.
fn hashed(kind: &str, id: &str) -> String {
    format!("{PREFIX}{kind}-{:016X}", stable_hash(id))
}

/// Renders the whole plan.
pub fn render(plan: &Plan) -> Ruleset {
    Ruleset {
        families: plan
            .families
            .iter()
            .map(|f| render_family(f, plan.masquerade_mark, plan.drop_invalid))
            .collect(),
    }
}

/// Per-family spellings.
#[derive(Clone, Copy)]
struct Fam(IpFamily);

impl Fam {
    fn host(self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        }
    }

    fn loopback(self) -> &'static str {
        match self.0 {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1/128",
        }
    }

    fn port_unreachable(self) -> &'static str {
        match self.0 {
            IpFamily::V4 => "icmp-port-unreachable",
            IpFamily::V6 => "icmp6-port-unreachable",
        }
    }
}

/// `-p tcp -m tcp --dport 80`.
/// The matches for "from a pod" (`negate`: "not from a pod"), as `detectLocalMode` says, one
/// per alternative (several CIDRs are several rules; negated, only one CIDR is ever asked for:
/// several go through their own chain of RETURNs). Empty when pods cannot be recognised.
fn local_matches(local: &LocalTraffic, negate: bool) -> Vec<String> {
    let not = if negate { "! " } else { "" };
    match local {
        LocalTraffic::Unknown => Vec::new(),
        LocalTraffic::FromCidrs(nets) => nets.iter().map(|n| format!("{not}-s {n}")).collect(),
        LocalTraffic::FromInterfacePrefix(prefix) => vec![format!("{not}-i {prefix}+")],
        LocalTraffic::FromInterface(name) => vec![format!("{not}-i {name}")],
    }
}

fn port_match(protocol: Protocol, port: u16) -> String {
    let p = protocol.as_str();
    format!("-p {p} -m {p} --dport {port}")
}

fn comment(text: &str) -> String {
    // Names are DNS labels (no quotes); a comment is at most 256 bytes.
    let text: String = text.chars().filter(|c| *c != '"').take(250).collect();
    format!("-m comment --comment \"{text}\"")
}

fn describe(d: &Destination) -> String {
    format!("{} {}", d.service_port(), d.kind.label())
}

/// The identity of a Service port within a family (chains are per family, in its own tables).
fn port_id(d: &Destination) -> String {
    format!("{}/{}/{}", d.service, d.port_name, d.protocol)
}

/// An endpoint chain while it is being built: ClusterIP masquerade rules go first, whichever
/// destination (in address order) asked for the chain first.
struct BackendChain {
    masq: Vec<String>,
    body: Vec<String>,
}

/// The rules some destinations add to the shared dispatch chains, in destination order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Dispatch {
    services: Vec<String>,
    nodeports: Vec<String>,
    filter_drops: Vec<String>,
    filter_rejects: Vec<String>,
    filter_nodeports: Vec<String>,
}

struct Builder<'a> {
    /// The family's plan, for what does not depend on its Services (masquerading, NodePort
    /// addresses); its destinations and hairpin set are given apart, so that a part of the
    /// plan can be rendered (the incremental backend renders the changed Services alone).
    plan: &'a FamilyPlan,
    /// Endpoints on this node: they get a chain of their own (hairpin masquerade).
    hairpin: &'a BTreeSet<IpAddr>,
    /// Whether to build the per-Service chains, or only the dispatch rules (which name them).
    chains: bool,
    fam: Fam,
    dispatch: Dispatch,
    backends: BTreeMap<String, BackendChain>,
    /// EXT and SEP chains, by name.
    others: BTreeMap<String, Vec<String>>,
}

impl Builder<'_> {
    /// The endpoint chain of a backend set (shared by every destination of the Service port
    /// with the same scope), created on first use.
    fn backends(&mut self, d: &Destination, b: &Backends) -> String {
        let (kind, scope) = match b.scope {
            Scope::Cluster => ("SVC", "cluster"),
            Scope::Local => ("SVL", "local"),
        };
        let id = port_id(d);
        let name = hashed(kind, &format!("{id}/{scope}"));
        if !self.chains || self.backends.contains_key(&name) {
            return name;
        }
        let mut body = Vec::new();
        let n = b.endpoints.len();
        let mut targets = Vec::with_capacity(n);
        for ep in &b.endpoints {
            let local = self.hairpin.contains(&ep.ip());
            if b.affinity_timeout.is_some() || local {
                let sep = hashed("SEP", &format!("{id}/{ep}"));
                self.endpoint_chain(&sep, d, ep, b.affinity_timeout, local);
                targets.push(format!("-j {sep}"));
            } else {
                targets.push(dnat(d.protocol, ep));
            }
        }
        if let Some(timeout) = b.affinity_timeout {
            // A client seen within the timeout goes back to its endpoint.
            for t in &targets {
                let sep = t.trim_start_matches("-j ");
                body.push(format!(
                    "-m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
                ));
            }
        }
        for (i, t) in targets.iter().enumerate() {
            if i + 1 < n {
                // The i-th of the remaining n-i endpoints: each is equally likely overall.
                let p = 1.0 / (n - i) as f64;
                body.push(format!(
                    "-m statistic --mode random --probability {p:.10} {t}"
                ));
            } else {
                body.push(t.clone());
            }
        }
        self.backends.insert(
            name.clone(),
            BackendChain {
                masq: Vec::new(),
                body,
            },
        );
        name
    }

    /// A chain for one endpoint that needs more than a DNAT: hairpin masquerade for an endpoint
    /// on this node, the affinity list for ClientIP affinity.
    fn endpoint_chain(
        &mut self,
        name: &str,
        d: &Destination,
        ep: &SocketAddr,
        affinity: Option<u32>,
        local: bool,
    ) {
        if self.others.contains_key(name) {
            return;
        }
        let mut rules = Vec::new();
        if local {
            rules.push(format!(
                "-s {} {} -j {MARK_MASQ}",
                self.fam.host(ep.ip()),
                comment("hairpin")
            ));
        }
        if affinity.is_some() {
            rules.push(format!("-m recent --name {name} --set"));
        }
        rules.push(dnat(d.protocol, ep));
        self.others.insert(name.to_string(), rules);
    }

    /// Marks ClusterIP traffic for masquerading as the configuration says, in the endpoint
    /// chain (matching the ClusterIP and port, so the chain can serve external addresses too).
    fn clusterip_masquerade(&mut self, chain: &str, d: &Destination, ip: IpAddr) {
        let dest = format!(
            "-d {} {}",
            self.fam.host(ip),
            port_match(d.protocol, d.port)
        );
        let rule = match (self.plan.clusterip_masquerade, &self.plan.local_traffic) {
            (ClusterIpMasquerade::Always, _) => format!("{dest} -j {MARK_MASQ}"),
            (ClusterIpMasquerade::Never, _) | (_, LocalTraffic::Unknown) => return,
            (ClusterIpMasquerade::NotLocal, LocalTraffic::FromCidrs(nets)) if nets.len() > 1 => {
                format!("{dest} -j {CIDR_MASQ}")
            }
            (ClusterIpMasquerade::NotLocal, local) => {
                let not_from_pod = local_matches(local, true).join(" ");
                format!("{not_from_pod} {dest} -j {MARK_MASQ}")
            }
        };
        // Only when building chains; `backends` made this one just before.
        if let Some(c) = self.backends.get_mut(chain) {
            c.masq.push(rule);
        }
    }

    /// The chain external destinations of a Service port enter (shared by its NodePort,
    /// external IPs and load balancer IPs, which all have the same route).
    fn external(&mut self, d: &Destination) -> String {
        let name = hashed("EXT", &port_id(d));
        if !self.chains || self.others.contains_key(&name) {
            return name;
        }
        let mut rules = Vec::new();
        match &d.route {
            Route::ExternalCluster(b) => {
                let svc = self.backends(d, b);
                rules.push(format!(
                    "{} -j {MARK_MASQ}",
                    comment("externalTrafficPolicy Cluster: masquerade")
                ));
                rules.push(format!("-j {svc}"));
            }
            Route::ExternalLocal { cluster, local } => {
                let svc = self.backends(d, cluster);
                for from_pod in local_matches(&self.plan.local_traffic, false) {
                    rules.push(format!(
                        "{from_pod} {} -j {svc}",
                        comment("pods reach every endpoint")
                    ));
                }
                rules.push(format!(
                    "-m addrtype --src-type LOCAL {} -j {MARK_MASQ}",
                    comment("this node reaches every endpoint, masqueraded")
                ));
                rules.push(format!("-m addrtype --src-type LOCAL -j {svc}"));
                // Without a local endpoint, outside clients fall through, unDNATed, and are
                // dropped in filter (nat cannot drop).
                if let Some(b) = local {
                    let svl = self.backends(d, b);
                    rules.push(format!(
                        "{} -j {svl}",
                        comment("outside clients: this node's endpoints only")
                    ));
                }
            }
            // Not an external route: `destination` never asks for one.
            Route::Reject | Route::Drop | Route::Internal(_) => {}
        }
        self.others.insert(name.clone(), rules);
        name
    }

    fn destination(&mut self, d: &Destination) {
        let port = port_match(d.protocol, d.port);
        let c = comment(&describe(d));
        let nat_match = match d.address {
            Address::Ip(ip) => format!("-d {} {port} {c}", self.fam.host(ip)),
            Address::NodePort => format!("{port} {c}"),
        };
        let filter_match = &nat_match;
        let nodeport = d.address == Address::NodePort;
        let filter = if nodeport {
            &mut self.dispatch.filter_nodeports
        } else {
            &mut self.dispatch.filter_drops
        };
        match &d.route {
            Route::Reject if nodeport => filter.push(format!("{filter_match} -j {REJECT}")),
            Route::Reject => self
                .dispatch
                .filter_rejects
                .push(format!("{filter_match} -j {REJECT}")),
            Route::Drop => filter.push(format!("{filter_match} -j DROP")),
            Route::Internal(b) => {
                let chain = self.backends(d, b);
                if let Address::Ip(ip) = d.address
                    && d.kind == DestinationKind::ClusterIp
                {
                    self.clusterip_masquerade(&chain, d, ip);
                }
                self.dispatch(nodeport, format!("{nat_match} -j {chain}"));
            }
            Route::ExternalCluster(_) | Route::ExternalLocal { .. } => {
                if let Route::ExternalLocal { local: None, .. } = &d.route {
                    // Outside clients: nothing DNATs them in nat; they are dropped here.
                    filter.push(format!("{filter_match} -j DROP"));
                }
                let mut chain = self.external(d);
                if !d.allowed_sources.is_empty() {
                    chain = self.firewall(d, &chain);
                }
                self.dispatch(nodeport, format!("{nat_match} -j {chain}"));
            }
        }
        if !d.allowed_sources.is_empty() {
            // What the firewall chain did not DNAT (a source outside the ranges, or no
            // endpoint at all) is dropped here, as in kube-proxy's KUBE-PROXY-FIREWALL.
            let fw = hashed("FW", &port_id(d));
            self.dispatch.filter_drops.push(format!(
                "{} {} -j DROP",
                nat_match.split(" -m comment").next().unwrap_or(&nat_match),
                comment(&format!("{} traffic not accepted by {fw}", describe(d)))
            ));
        }
    }

    /// loadBalancerSourceRanges, as kube-proxy's iptables mode does it: the load-balancer IPs
    /// of a Service port enter `SVCP-FW-<hash>`, which sends sources in the ranges on to the
    /// external chain; the rest leave it unDNATed and are dropped in filter.
    fn firewall(&mut self, d: &Destination, next: &str) -> String {
        let name = hashed("FW", &port_id(d));
        if self.others.contains_key(&name) {
            return name;
        }
        let c = comment(&describe(d));
        let rules = d
            .allowed_sources
            .iter()
            .map(|net| format!("-s {net} {c} -j {next}"))
            .collect();
        self.others.insert(name.clone(), rules);
        name
    }

    fn dispatch(&mut self, nodeport: bool, rule: String) {
        if nodeport {
            self.dispatch.nodeports.push(rule);
        } else {
            self.dispatch.services.push(rule);
        }
    }
}

/// The rules that send traffic to a NodePort address into `chain`; they end their chain
/// (the loopback exclusion returns).
fn nodeport_jumps(plan: &FamilyPlan, chain: &str) -> Vec<String> {
    let f = Fam(plan.family);
    let c = comment("NodePorts");
    match &plan.nodeports {
        NodePortMatch::AnyLocal => vec![format!(
            "! -d {} -m addrtype --dst-type LOCAL {c} -j {chain}",
            f.loopback()
        )],
        NodePortMatch::LocalIn(nets) => {
            let mut rules = vec![format!("-d {} -j RETURN", f.loopback())];
            rules
                .extend(nets.iter().map(|n: &IpNet| {
                    format!("-d {n} -m addrtype --dst-type LOCAL {c} -j {chain}")
                }));
            rules
        }
        NodePortMatch::Addresses(ips) => ips
            .iter()
            .map(|ip| format!("-d {} {c} -j {chain}", f.host(*ip)))
            .collect(),
        NodePortMatch::Nothing => Vec::new(),
    }
}

/// `-p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80` (`[fd00::1]:80` for IPv6).
fn dnat(protocol: Protocol, ep: &SocketAddr) -> String {
    let p = protocol.as_str();
    format!("-p {p} -m {p} -j DNAT --to-destination {ep}")
}

/// `SVCP-FORWARD`: kube-proxy's iptables mode drops forwarded packets conntrack marks INVALID
/// (an out-of-window TCP segment would otherwise reach the pod unNATed, and its reset kill the
/// connection), unless `conntrack.tcpBeLiberal` makes the kernel accept such packets.
fn forward_chain(drop_invalid: bool) -> Chain {
    let mut rules = Vec::new();
    if drop_invalid {
        rules.push(format!(
            "-m conntrack --ctstate INVALID {} -j DROP",
            comment("conntrack INVALID (conntrack.tcpBeLiberal is off)")
        ));
    }
    Chain {
        name: FORWARD.into(),
        rules,
    }
}

/// Drops new connections to an address in the Service CIDRs that no Service holds (after the
/// rules refusing unknown ports of allocated ClusterIPs), as kube-proxy's nftables mode does.
fn unallocated_cluster_ips(plan: &FamilyPlan) -> Vec<String> {
    plan.service_cidrs
        .iter()
        .map(|net| format!("-d {net} {} -j DROP", comment("unallocated ClusterIP")))
        .collect()
}

/// Renders `destinations` (in key order) of a family's plan, with `hairpin` as its endpoints
/// on this node.
fn build<'a, 'd>(
    plan: &'a FamilyPlan,
    hairpin: &'a BTreeSet<IpAddr>,
    chains: bool,
    destinations: impl IntoIterator<Item = &'d Destination>,
) -> Builder<'a> {
    let mut b = Builder {
        plan,
        hairpin,
        chains,
        fam: Fam(plan.family),
        dispatch: Dispatch::default(),
        backends: BTreeMap::new(),
        others: BTreeMap::new(),
    };
    for d in destinations {
        b.destination(d);
    }
    b
}

impl Builder<'_> {
    /// The per-Service chains built, sorted by name.
    fn service_chains(self) -> (Dispatch, Vec<Chain>) {
        let mut hashed_chains: BTreeMap<String, Vec<String>> = self.others;
        for (name, mut chain) in self.backends {
            chain.masq.extend(chain.body);
            hashed_chains.insert(name, chain.masq);
        }
        let chains = hashed_chains
            .into_iter()
            .map(|(name, rules)| Chain { name, rules })
            .collect();
        (self.dispatch, chains)
    }
}

/// What some Services (the changed ones) contribute to a family's rules: their rules in the
/// dispatch chains, and their own chains (sorted by name). `destinations` in key order.
pub(crate) fn service_chains<'d>(
    plan: &FamilyPlan,
    hairpin: &BTreeSet<IpAddr>,
    destinations: impl IntoIterator<Item = &'d Destination>,
) -> (Dispatch, Vec<Chain>) {
    build(plan, hairpin, true, destinations).service_chains()
}

/// The chains every Service has a rule in: `SVCP-SERVICES` and `SVCP-NODEPORTS` in `nat`, then
/// `SVCP-FILTER` and `SVCP-NODEPORTS` in `filter`, for `destinations` (the whole family's, in
/// key order) and `cluster_ips`.
pub(crate) fn dispatch_chains<'d>(
    plan: &FamilyPlan,
    destinations: impl IntoIterator<Item = &'d Destination>,
    cluster_ips: &BTreeMap<IpAddr, ObjectRef>,
) -> [(Table, Chain); 4] {
    let empty = BTreeSet::new();
    let b = build(plan, &empty, false, destinations);
    shared_chains(plan, b.dispatch, cluster_ips)
}

fn shared_chains(
    plan: &FamilyPlan,
    mut d: Dispatch,
    cluster_ips: &BTreeMap<IpAddr, ObjectRef>,
) -> [(Table, Chain); 4] {
    let fam = Fam(plan.family);
    let mut services = std::mem::take(&mut d.services);
    services.extend(nodeport_jumps(plan, NODEPORTS));
    let mut filter_rules = vec![format!(
        "-m conntrack --ctstate DNAT {} -j RETURN",
        comment("found its endpoint")
    )];
    filter_rules.append(&mut d.filter_drops);
    filter_rules.append(&mut d.filter_rejects);
    for (ip, svc) in cluster_ips {
        filter_rules.push(format!(
            "-d {} {} -j {REJECT}",
            fam.host(*ip),
            comment(&format!("{svc}: a port the Service does not have"))
        ));
    }
    filter_rules.extend(unallocated_cluster_ips(plan));
    filter_rules.extend(nodeport_jumps(plan, FILTER_NODEPORTS));
    [
        (
            Table::Nat,
            Chain {
                name: SERVICES.into(),
                rules: services,
            },
        ),
        (
            Table::Nat,
            Chain {
                name: NODEPORTS.into(),
                rules: d.nodeports,
            },
        ),
        (
            Table::Filter,
            Chain {
                name: FILTER.into(),
                rules: filter_rules,
            },
        ),
        (
            Table::Filter,
            Chain {
                name: FILTER_NODEPORTS.into(),
                rules: d.filter_nodeports,
            },
        ),
    ]
}

/// Whether `name` is a per-Service chain (`SVCP-SVC-…`, `-SVL-`, `-EXT-`, `-SEP-`, `-FW-`):
/// these sort after the fixed chains of their table.
pub(crate) fn is_service_chain(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    ["SVC-", "SVL-", "EXT-", "SEP-", "FW-"]
        .iter()
        .any(|k| rest.len() == k.len() + 16 && rest.starts_with(k))
}

fn render_family(plan: &FamilyPlan, mark: u32, drop_invalid: bool) -> FamilyRules {
    let fam = Fam(plan.family);
    let (dispatch, hashed_chains) = service_chains(plan, &plan.hairpin, &plan.destinations);
    let [
        (_, services),
        (_, nodeports),
        (_, filter),
        (_, filter_nodeports),
    ] = shared_chains(plan, dispatch, &plan.cluster_ips);

    // nat
    let mut nat = vec![
        services,
        nodeports,
        Chain {
            name: POSTROUTING.into(),
            rules: vec![
                format!("-m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
                format!("-j MARK --xor-mark {mark:#x}"),
                format!(
                    "{} -j MASQUERADE --random-fully",
                    comment("Service traffic that must come back through this node")
                ),
            ],
        },
        Chain {
            name: MARK_MASQ.into(),
            rules: vec![format!("-j MARK --or-mark {mark:#x}")],
        },
    ];
    if let (ClusterIpMasquerade::NotLocal, LocalTraffic::FromCidrs(nets)) =
        (plan.clusterip_masquerade, &plan.local_traffic)
        && nets.len() > 1
    {
        let mut rules: Vec<String> = nets.iter().map(|n| format!("-s {n} -j RETURN")).collect();
        rules.push(format!("-j {MARK_MASQ}"));
        nat.push(Chain {
            name: CIDR_MASQ.into(),
            rules,
        });
    }
    nat.extend(hashed_chains);

    // filter
    let filter = vec![
        filter,
        filter_nodeports,
        Chain {
            name: REJECT.into(),
            rules: vec![
                "-p tcp -j REJECT --reject-with tcp-reset".into(),
                format!("-j REJECT --reject-with {}", fam.port_unreachable()),
            ],
        },
        forward_chain(drop_invalid),
    ];
    FamilyRules {
        family: plan.family,
        tables: vec![
            TableRules {
                table: Table::Nat,
                chains: nat,
            },
            TableRules {
                table: Table::Filter,
                chains: filter,
            },
        ],
    }
}

impl TableRules {
    /// The chain named `name`, if this table has it.
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Number of rules in the table's chains.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

impl FamilyRules {
    /// The `iptables-restore --noflush` input that (re)writes every chain: each is declared
    /// (`:NAME - [0:0]` creates it, or flushes it if it exists), then filled. `stale` chains
    /// (svcproxy's, in the kernel, not wanted any more) are flushed and deleted after.
    pub fn restore_input(&self, stale: &BTreeMap<Table, Vec<String>>) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let gone = stale.get(&t.table).map(Vec::as_slice).unwrap_or(&[]);
            let chains: Vec<&Chain> = t.chains.iter().collect();
            write_table(&mut out, t.table, &chains, &[], gone);
        }
        out
    }

    pub fn table(&self, table: Table) -> Option<&TableRules> {
        self.tables.iter().find(|t| t.table == table)
    }

    /// The program name of this family (`iptables` or `ip6tables`).
    pub fn program(&self) -> &'static str {
        program(self.family)
    }
}

/// `iptables` or `ip6tables`.
pub fn program(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// One table's section of a restore input: declare (create or flush) `chains`, flush `gone`,
/// append the rules in [`walk_order`], then the `edits` (`-D`/`-I` lines of chains edited in
/// place), delete `gone` (nothing refers to them once the others are rewritten).
pub fn write_table(
    out: &mut String,
    table: Table,
    chains: &[&Chain],
    edits: &[String],
    gone: &[String],
) {
    if chains.is_empty() && edits.is_empty() && gone.is_empty() {
        return;
    }
    writeln!(out, "*{}", table.as_str()).unwrap();
    for c in chains {
        writeln!(out, ":{} - [0:0]", c.name).unwrap();
    }
    for g in gone {
        writeln!(out, "-F {g}").unwrap();
    }
    for c in walk_order(chains) {
        for r in &c.rules {
            writeln!(out, "-A {} {r}", c.name).unwrap();
        }
    }
    for e in edits {
        writeln!(out, "{e}").unwrap();
    }
    for g in gone {
        writeln!(out, "-X {g}").unwrap();
    }
    out.push_str("COMMIT\n");
}

/// `chains` in the order the kernel walks them: each chain, then the chains its rules jump to,
/// depth first, in rule order (from the fixed chains, which come first); chains nothing here
/// jumps to keep their place after. Semantics do not depend on it (each chain keeps its own
/// rules' order), but with iptables-nft every transaction that adds a rule makes the kernel
/// walk the whole `nat` table from each hook to validate it, and the kernel places rules in
/// memory in the order they are added. Written in the walk's order, one endpoint change at
/// 10k Services cost 70 ms of that walk; in name order (hash order) 150 ms.
fn walk_order<'c>(chains: &[&'c Chain]) -> Vec<&'c Chain> {
    let index: std::collections::HashMap<&str, usize> = chains
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let mut seen = vec![false; chains.len()];
    let mut order = Vec::with_capacity(chains.len());
    for root in 0..chains.len() {
        // An explicit stack of (chain, next rule to look at).
        let mut stack = vec![(root, 0)];
        while let Some((i, next)) = stack.pop() {
            if next == 0 {
                if seen[i] {
                    continue;
                }
                seen[i] = true;
                order.push(chains[i]);
            }
            let Some(rule) = chains[i].rules.get(next) else {
                continue;
            };
            stack.push((i, next + 1));
            if let Some(&t) = jump_target(rule).and_then(|t| index.get(t))
                && !seen[t]
            {
                stack.push((t, 0));
            }
        }
    }
    order
}

/// The chain a rule jumps or goes to (`-j NAME`, `-g NAME`), or its target.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    let mut target = None;
    while let Some(w) = words.next() {
        if matches!(w, "-j" | "-g" | "--jump" | "--goto") {
            target = words.next();
        }
    }
    target
}

impl Ruleset {
    /// The dry-run: each family's exact `iptables-restore --noflush` input for a first sync,
    /// headed by the command it is fed to, followed by the jump rules installed after it.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let program = f.program();
            writeln!(
                out,
                "# {program}-restore --noflush ({})",
                match f.family {
                    IpFamily::V4 => "IPv4",
                    IpFamily::V6 => "IPv6",
                }
            )
            .unwrap();
            out.push_str(&f.restore_input(&BTreeMap::new()));
            writeln!(out, "# then, for each rule missing (checked with -C):").unwrap();
            for j in jump_rules() {
                writeln!(out, "# {}", j.shell(program, "-I")).unwrap();
            }
        }
        out
    }

    pub fn family(&self, family: IpFamily) -> Option<&FamilyRules> {
        self.families.iter().find(|f| f.family == family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProxyConfig;
    use crate::synthetic;

    fn rules_of(r: &Ruleset, table: Table, chain: &str) -> Vec<String> {
        r.families[0]
            .table(table)
            .unwrap()
            .chain(chain)
            .unwrap_or_else(|| panic!("no chain {chain}"))
            .rules
            .clone()
    }

    #[test]
    fn chain_names_are_prefixed_short_and_stable() {
        let s = synthetic::cluster(50, 3);
        let a = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        let b = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        assert_eq!(a, b);
        for f in &a.families {
            for t in &f.tables {
                for c in &t.chains {
                    assert!(c.name.starts_with(PREFIX), "{}", c.name);
                    assert!(c.name.len() <= 28, "{}", c.name);
                }
            }
        }
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn endpoints_are_picked_uniformly_and_only_local_ones_get_a_chain() {
        let s = synthetic::cluster(1, 4);
        let r = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        let nat = r.families[0].table(Table::Nat).unwrap();
        let svc = nat
            .chains
            .iter()
            .find(|c| c.name.starts_with("SVCP-SVC-"))
            .unwrap();
        let probs: Vec<&str> = svc
            .rules
            .iter()
            .map(|r| {
                r.split("--probability ")
                    .nth(1)
                    .map_or("last", |s| s.split(' ').next().unwrap())
            })
            .collect();
        assert_eq!(
            probs,
            ["0.2500000000", "0.3333333333", "0.5000000000", "last"]
        );
        // Service 0's endpoint 0 is on node-0, the proxy's node: a chain for the hairpin mark.
        assert!(
            svc.rules[0].ends_with(&format!(
                "-j {}",
                hashed("SEP", "ns0/svc-0/http/tcp/10.128.0.0:8080")
            )),
            "{:?}",
            svc.rules
        );
        assert!(svc.rules[1].contains("-j DNAT --to-destination 10.128.0.1:8080"));
        let seps = nat
            .chains
            .iter()
            .filter(|c| c.name.starts_with("SVCP-SEP-"))
            .count();
        assert_eq!(seps, 1);
    }

    #[test]
    fn clusterip_masquerade_follows_the_configuration() {
        let s = synthetic::cluster(1, 1);
        let chain = |cfg: &ProxyConfig| {
            let r = render(&crate::plan::plan(&s, cfg));
            let nat = r.families[0].table(Table::Nat).unwrap().clone();
            nat.chains
                .into_iter()
                .find(|c| c.name.starts_with("SVCP-SVC-"))
                .unwrap()
                .rules
        };
        assert!(!chain(&ProxyConfig::default())[0].contains(MARK_MASQ));
        let cfg = ProxyConfig {
            cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
            ..ProxyConfig::default()
        };
        assert_eq!(
            chain(&cfg)[0],
            "! -s 10.128.0.0/9 -d 10.96.0.0/32 -p tcp -m tcp --dport 80 -j SVCP-MARK-MASQ"
        );
        let cfg = ProxyConfig {
            masquerade_all: true,
            ..ProxyConfig::default()
        };
        assert_eq!(
            chain(&cfg)[0],
            "-d 10.96.0.0/32 -p tcp -m tcp --dport 80 -j SVCP-MARK-MASQ"
        );
    }

    #[test]
    fn filter_returns_first_for_dnated_traffic_and_refuses_unknown_ports() {
        let s = synthetic::cluster(2, 1);
        let r = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        let filter = rules_of(&r, Table::Filter, FILTER);
        assert!(filter[0].starts_with("-m conntrack --ctstate DNAT"));
        assert!(filter[1].starts_with("-d 10.96.0.0/32 "), "{filter:?}");
        assert!(filter[1].ends_with("-j SVCP-REJECT"));
        // Every local address but loopback answers NodePorts by default.
        assert!(
            filter
                .last()
                .unwrap()
                .starts_with("! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL")
        );
        // The v6 family has its own spellings.
        let reject6 = &r.families[1]
            .table(Table::Filter)
            .unwrap()
            .chain(REJECT)
            .unwrap()
            .rules;
        assert!(reject6[1].contains("icmp6-port-unreachable"));
    }

    #[test]
    fn source_ranges_get_a_firewall_chain_and_a_drop_for_the_rest() {
        let mut s = synthetic::cluster(1, 1);
        let mut svc = (*s.services.values().next().unwrap()).as_ref().clone();
        svc.load_balancer_ips = vec!["198.51.100.1".parse().unwrap()];
        svc.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
        s.services.insert(svc.id.clone(), std::sync::Arc::new(svc));
        let r = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        let nat = r.families[0].table(Table::Nat).unwrap();
        let fw = nat
            .chains
            .iter()
            .find(|c| c.name.starts_with("SVCP-FW-"))
            .unwrap();
        assert_eq!(fw.rules.len(), 1);
        assert!(
            fw.rules[0].starts_with("-s 203.0.113.0/25 "),
            "{:?}",
            fw.rules
        );
        assert!(fw.rules[0].ends_with(&format!("-j {}", fw.name.replace("-FW-", "-EXT-"))));
        let services = rules_of(&r, Table::Nat, SERVICES);
        assert!(
            services
                .iter()
                .any(|x| x.starts_with("-d 198.51.100.1/32 ") && x.ends_with(&fw.name))
        );
        let filter = rules_of(&r, Table::Filter, FILTER);
        assert!(filter[1].starts_with("-d 198.51.100.1/32 -p tcp -m tcp --dport 80 "));
        assert!(filter[1].ends_with("-j DROP"), "{filter:?}");
    }

    #[test]
    fn invalid_is_dropped_in_forward_unless_tcp_be_liberal() {
        let s = synthetic::cluster(1, 1);
        let forward = |cfg: &ProxyConfig| {
            rules_of(&render(&crate::plan::plan(&s, cfg)), Table::Filter, FORWARD)
        };
        assert!(forward(&ProxyConfig::default())[0].starts_with("-m conntrack --ctstate INVALID "));
        let liberal = ProxyConfig {
            tcp_be_liberal: true,
            ..ProxyConfig::default()
        };
        assert!(forward(&liberal).is_empty());
        assert!(
            jump_rules()
                .iter()
                .any(|j| j.chain == "FORWARD" && j.spec.ends_with(&["-j", FORWARD]))
        );
    }

    #[test]
    fn rules_are_written_in_the_order_the_kernel_walks_the_chains() {
        let chain = |name: &str, rules: &[&str]| Chain {
            name: name.into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        };
        let chains = [
            chain(
                "SERVICES",
                &["-d 10.0.0.2/32 -j SVC-B", "-d 10.0.0.1/32 -j SVC-A"],
            ),
            chain("MASQ", &["-j MARK --set-xmark 0x4000/0x4000"]),
            chain("SVC-A", &["-j MASQ", "-j SEP-A1"]),
            chain(
                "SVC-B",
                &["-m comment --comment \"to SVC-A\" -j DNAT --to-destination 10.1.0.1:80"],
            ),
            chain("SEP-A1", &["-j MASQ", "-j SERVICES"]),
            chain("ALONE", &["-j RETURN"]),
        ];
        let refs: Vec<&Chain> = chains.iter().collect();
        let order: Vec<&str> = walk_order(&refs).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            order,
            ["SERVICES", "SVC-B", "SVC-A", "MASQ", "SEP-A1", "ALONE"]
        );
        // Every chain once, and each chain's rules in their own order.
        let mut out = String::new();
        write_table(&mut out, Table::Nat, &refs, &[], &[]);
        let appended: Vec<&str> = out.lines().filter(|l| l.starts_with("-A SVC-A ")).collect();
        assert_eq!(appended, ["-A SVC-A -j MASQ", "-A SVC-A -j SEP-A1"]);
        assert_eq!(out.lines().filter(|l| l.starts_with("-A ")).count(), 9);
    }

    #[test]
    fn restore_input_declares_then_fills_then_deletes_stale_chains() {
        let s = synthetic::cluster(1, 1);
        let r = render(&crate::plan::plan(&s, &ProxyConfig::default()));
        let stale = BTreeMap::from([(Table::Nat, vec!["SVCP-SVC-OLD".to_string()])]);
        let input = r.families[0].restore_input(&stale);
        let pos = |s: &str| input.find(s).unwrap_or_else(|| panic!("{s} in {input}"));
        assert!(pos("*nat\n:SVCP-SERVICES - [0:0]") < pos("-F SVCP-SVC-OLD"));
        assert!(pos("-F SVCP-SVC-OLD") < pos("-A SVCP-SERVICES"));
        assert!(pos("-A SVCP-SERVICES") < pos("-X SVCP-SVC-OLD"));
        assert!(pos("-X SVCP-SVC-OLD") < pos("COMMIT\n*filter"));
        assert!(input.ends_with("COMMIT\n"));
    }
}
