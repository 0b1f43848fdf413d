//! The conntrack table over netfilter netlink (ctnetlink): a dump of one family's entries and
//! deletes by tuple. Deliberately thin: which entries to delete is decided by the pure half
//! (`StaleFlows::matches`), on what [`Entry::flow`] extracts.
//!
//! The kernel has no delete-by-filter for conntrack (only by exact tuple, or a flush of
//! everything), so, like `conntrack -D` and kube-proxy, we dump and match in userspace. The
//! delete echoes the entry's original tuple, and its id and zone when the dump gave them: the
//! id makes the kernel refuse (ENOENT) to delete a newer entry that reused the tuple, the zone
//! finds entries outside the default zone.

use std::io;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::{ConntrackError, UdpFlow};
use crate::model::IpFamily;

/// `CTA_ID` and `CTA_ZONE` (linux/netfilter/nfnetlink_conntrack.h): carried from the dump to
/// the delete as they came (the crate has no variants for them).
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

/// One UDP entry of a dump: what the matcher looks at, and what deleting it takes.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub flow: UdpFlow,
    key: Vec<ConntrackAttribute>,
}

/// A netfilter netlink socket, in the network namespace it was opened in.
pub(super) struct Socket {
    socket: netlink_sys::Socket,
    seq: u32,
}

fn socket_error(what: &'static str) -> impl FnOnce(io::Error) -> ConntrackError {
    move |source| ConntrackError::Socket { what, source }
}

fn proto_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

impl Socket {
    /// Opens a socket here, or in the namespace at `netns`: a socket belongs for life to the
    /// namespace it was created in, so a short-lived thread enters the namespace, creates it
    /// and hands it back; no thread of the process changes namespace for longer.
    pub fn open(netns: Option<&Path>) -> Result<Socket, ConntrackError> {
        let socket = match netns {
            None => Self::create()?,
            Some(path) => {
                crate::process::in_namespace(path, Self::create).map_err(|source| {
                    ConntrackError::Netns {
                        path: path.to_owned(),
                        source,
                    }
                })??
            }
        };
        Ok(Socket { socket, seq: 0 })
    }

    fn create() -> Result<netlink_sys::Socket, ConntrackError> {
        let mut s = netlink_sys::Socket::new(NETLINK_NETFILTER).map_err(socket_error("socket"))?;
        s.bind_auto().map_err(socket_error("bind"))?;
        s.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(socket_error("connect"))?;
        Ok(s)
    }

    fn send(
        &mut self,
        family: IpFamily,
        flags: u16,
        message: ConntrackMessage,
    ) -> Result<u32, ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(proto_family(family), 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(socket_error("send"))?;
        Ok(self.seq)
    }

    /// Reads datagrams and hands each netlink message of sequence `seq` to `each`, until it
    /// returns `true` (the last one). Messages that do not parse are skipped (an entry the
    /// crate cannot decode is one the matcher cannot judge).
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkPayload<NetfilterMessage>) -> Result<bool, ConntrackError>,
    ) -> Result<(), ConntrackError> {
        loop {
            let (datagram, _) = self
                .socket
                .recv_from_full()
                .map_err(socket_error("receive"))?;
            let mut rest = &datagram[..];
            while !rest.is_empty() {
                let len = NetlinkBuffer::new_checked(rest)
                    .map_err(|e| ConntrackError::Protocol(e.to_string()))?
                    .length() as usize;
                let (message, tail) = rest.split_at(len.min(rest.len()));
                rest = &tail[((4 - len % 4) % 4).min(tail.len())..];
                let parsed = match NetlinkMessage::<NetfilterMessage>::deserialize(message) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!("skipping a conntrack message that does not parse: {e}");
                        continue;
                    }
                };
                if parsed.header.sequence_number != seq {
                    continue;
                }
                if each(parsed.payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// The UDP entries of one family that `keep` wants (matched as they arrive, so that a
    /// large table is never held whole), and how many UDP entries there were.
    pub fn dump_udp(
        &mut self,
        family: IpFamily,
        keep: impl Fn(&UdpFlow) -> bool,
    ) -> Result<(usize, Vec<Entry>), ConntrackError> {
        let seq = self.send(family, NLM_F_DUMP, ConntrackMessage::Get(vec![]))?;
        let mut udp = 0;
        let mut entries = Vec::new();
        self.receive(seq, |payload| match payload {
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => Err(ConntrackError::Refused {
                what: format!("the conntrack dump ({family:?})"),
                source: e.to_io(),
            }),
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                ..
            }) => {
                if let Some(e) = entry(attributes) {
                    udp += 1;
                    if keep(&e.flow) {
                        entries.push(e);
                    }
                }
                Ok(false)
            }
            _ => Ok(false),
        })?;
        Ok((udp, entries))
    }

    /// Deletes `entries`; returns how many the kernel deleted. One that is already gone
    /// (expired, or replaced by a newer entry with the same tuple) is skipped. After a failure
    /// the rest are still tried; the first failure is returned.
    pub fn delete(&mut self, family: IpFamily, entries: &[Entry]) -> Result<usize, ConntrackError> {
        let mut deleted = 0;
        let mut first_error = None;
        for e in entries {
            let seq = self.send(family, NLM_F_ACK, ConntrackMessage::Delete(e.key.clone()))?;
            let mut outcome = Ok(());
            self.receive(seq, |payload| match payload {
                NetlinkPayload::Error(err) => {
                    outcome = match err.code.map(|c| -c.get()) {
                        None => {
                            deleted += 1;
                            Ok(())
                        }
                        Some(libc::ENOENT) => Ok(()),
                        Some(_) => Err(err.to_io()),
                    };
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            if let Err(source) = outcome {
                first_error.get_or_insert(ConntrackError::Refused {
                    what: format!("deleting {:?}", e.flow),
                    source,
                });
            }
        }
        match first_error {
            None => Ok(deleted),
            Some(e) => Err(e),
        }
    }
}

/// A dumped entry, if it is UDP and has the parts the matcher needs.
fn entry(attributes: Vec<ConntrackAttribute>) -> Option<Entry> {
    let mut orig = None;
    let mut reply_src = None;
    let mut dnat = false;
    let mut key = Vec::new();
    for a in attributes {
        match a {
            ConntrackAttribute::CtaTupleOrig(ref tuple) => {
                orig = Some(original(tuple)?);
                key.push(a);
            }
            ConntrackAttribute::CtaTupleReply(ref tuple) => reply_src = source(tuple),
            ConntrackAttribute::CtaStatus(s) => dnat = s.contains(Status::DstNat),
            ConntrackAttribute::Other(ref nla)
                if matches!(netlink_packet_core::Nla::kind(nla), CTA_ID | CTA_ZONE) =>
            {
                key.push(a)
            }
            _ => {}
        }
    }
    let (orig_dst, orig_dst_port) = orig?;
    Some(Entry {
        flow: UdpFlow {
            orig_dst,
            orig_dst_port,
            reply_src: reply_src?,
            dnat,
        },
        key,
    })
}

/// The destination address and port of an original tuple, if it is UDP.
fn original(tuple: &[Tuple]) -> Option<(std::net::IpAddr, u16)> {
    let mut dst = None;
    let mut port = None;
    let mut udp = false;
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for i in ips {
                    if let IPTuple::DestinationAddress(a) = i {
                        dst = Some(*a);
                    }
                }
            }
            Tuple::Proto(parts) => {
                for p in parts {
                    match p {
                        ProtoTuple::Protocol(Protocol::Udp) => udp = true,
                        ProtoTuple::DestinationPort(n) => port = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if udp { Some((dst?, port?)) } else { None }
}

/// The source address of a reply tuple.
fn source(tuple: &[Tuple]) -> Option<std::net::IpAddr> {
    tuple.iter().find_map(|t| match t {
        Tuple::Ip(ips) => ips.iter().find_map(|i| match i {
            IPTuple::SourceAddress(a) => Some(*a),
            _ => None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, dst: &str, proto: Protocol, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(proto),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    #[test]
    fn a_dumped_udp_entry_gives_its_flow_and_its_delete_key() {
        let orig = ConntrackAttribute::CtaTupleOrig(tuple(
            "10.244.0.5",
            "10.96.0.10",
            Protocol::Udp,
            40000,
            53,
        ));
        let id = ConntrackAttribute::Other(netlink_packet_core::DefaultNla::new(
            CTA_ID,
            vec![0, 0, 0, 7],
        ));
        let e = entry(vec![
            orig.clone(),
            ConntrackAttribute::CtaTupleReply(tuple(
                "10.244.1.7",
                "10.244.0.5",
                Protocol::Udp,
                5353,
                40000,
            )),
            ConntrackAttribute::CtaStatus(Status::DstNat | Status::Confirmed),
            ConntrackAttribute::CtaTimeout(30),
            id.clone(),
        ])
        .unwrap();
        assert_eq!(
            e.flow,
            UdpFlow {
                orig_dst: "10.96.0.10".parse().unwrap(),
                orig_dst_port: 53,
                reply_src: "10.244.1.7".parse().unwrap(),
                dnat: true,
            }
        );
        assert_eq!(e.key, vec![orig, id]);
        // TCP is not ours.
        let tcp = ConntrackAttribute::CtaTupleOrig(tuple(
            "10.244.0.5",
            "10.96.0.10",
            Protocol::Tcp,
            40000,
            53,
        ));
        assert!(entry(vec![tcp]).is_none());
    }
}
