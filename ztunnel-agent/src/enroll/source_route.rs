//! Source-address preservation, the pod's side: the agent connects to the pod's application
//! from the client's address (a transparent socket marked [`AGENT_TRANSPARENT_MARK`]), and
//! the application's replies, addressed to the client, must come back to the agent instead of
//! leaving the pod. Three settings of the pod's network namespace do it, with no iptables and
//! no conntrack:
//! - `net.ipv4.tcp_fwmark_accept` = 1 (covers IPv6 too): a socket the application accepts
//!   takes the mark of the SYN that opened it, so its replies carry the agent's mark (SYNs
//!   from the network carry none: crossing into the namespace clears the mark);
//! - `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect` = 1: what the kernel answers by
//!   itself (the RST for a port nobody listens on, an ICMP error) carries the mark of the
//!   packet it answers, so it comes back too (without it, a connection to a closed port times
//!   out instead of being refused);
//! - a rule `fwmark 0x111/0xfff lookup 100` at priority 32764, per family;
//! - in table 100, `local 0.0.0.0/0 dev lo` (and `local ::/0 dev lo`): every marked packet is
//!   delivered locally, where the agent's transparent socket takes it.
//!
//! The mark, table and priority are those of upstream's in-pod set-up (istio-cni), so an
//! operator reading `ip rule` in a pod sees what they know. They are left in place when a pod
//! leaves: they act only on packets the agent marks, and a replacement agent serving the pod
//! during an overlapping upgrade relies on them.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use ztunnel_common::{AGENT_TRANSPARENT_MARK, AGENT_TRANSPARENT_MASK};

/// The routing table the marked replies are looked up in.
pub const TABLE: u32 = 100;
/// The rule's priority (before the main table's 32766).
pub const PRIORITY: u32 = 32764;
/// The loopback interface: index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const FWMARK_REFLECT: [&str; 2] = [
    "/proc/sys/net/ipv4/fwmark_reflect",
    "/proc/sys/net/ipv6/fwmark_reflect",
];

/// Why the pod's namespace could not be set up (the pod then keeps today's behaviour: the
/// application sees the pod's own address).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sysctl could not be written.
    #[error("{0} not set to 1: {1}")]
    Sysctl(&'static str, io::Error),
    /// No netlink socket in the namespace.
    #[error("no netlink socket: {0}")]
    Socket(io::Error),
    /// A netlink request failed.
    #[error("{what} not added (ip {family}): {source}")]
    Netlink {
        what: &'static str,
        family: &'static str,
        source: io::Error,
    },
}

/// Sets the pod's namespace up for replies to the agent's transparent connections. Call from
/// a thread inside the namespace (the netlink socket and /proc/sys/net are the caller's).
/// Idempotent: what exists already (an earlier agent's) is kept.
pub fn install(ipv6: bool) -> Result<(), Error> {
    let sysctls = if ipv6 {
        &[FWMARK_ACCEPT, FWMARK_REFLECT[0], FWMARK_REFLECT[1]][..]
    } else {
        &[FWMARK_ACCEPT, FWMARK_REFLECT[0]][..]
    };
    for path in sysctls {
        std::fs::write(path, "1").map_err(|e| Error::Sysctl(path, e))?;
    }
    let families: &[(AddressFamily, &'static str)] = if ipv6 {
        &[(AddressFamily::Inet, "-4"), (AddressFamily::Inet6, "-6")]
    } else {
        &[(AddressFamily::Inet, "-4")]
    };
    let mut socket = open().map_err(Error::Socket)?;
    for (family, name) in families {
        let failed = |what| {
            move |source| Error::Netlink {
                what,
                family: name,
                source,
            }
        };
        request(
            &mut socket,
            RouteNetlinkMessage::NewRoute(local_route(*family)),
        )
        .map_err(failed("route `local default dev lo table 100`"))?;
        request(
            &mut socket,
            RouteNetlinkMessage::NewRule(mark_rule(*family)),
        )
        .map_err(failed("rule `fwmark 0x111/0xfff lookup 100`"))?;
    }
    Ok(())
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// `local <any> dev lo table 100`.
fn local_route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.table = TABLE as u8;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    route
}

/// `fwmark 0x111/0xfff lookup 100 priority 32764`.
fn mark_rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.table = TABLE as u8;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::FwMark(AGENT_TRANSPARENT_MARK),
        RuleAttribute::FwMask(AGENT_TRANSPARENT_MASK),
        RuleAttribute::Table(TABLE),
        RuleAttribute::Priority(PRIORITY),
    ];
    rule
}

/// Sends one request that creates something and waits for the kernel's answer; "already
/// exists" is success.
fn request(socket: &mut Socket, message: RouteNetlinkMessage) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = Vec::with_capacity(4096);
    socket.recv(&mut answer, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) if -code.get() == libc::EEXIST => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink answer type {}", other.message_type()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages say what `ip rule` / `ip route` would: family, table, mark, priority.
    #[test]
    fn messages_carry_upstreams_mark_table_and_priority() {
        let rule = mark_rule(AddressFamily::Inet6);
        assert_eq!(rule.header.family, AddressFamily::Inet6);
        assert_eq!(rule.header.action, RuleAction::ToTable);
        for attr in [
            RuleAttribute::FwMark(0x111),
            RuleAttribute::FwMask(0xfff),
            RuleAttribute::Table(100),
            RuleAttribute::Priority(32764),
        ] {
            assert!(rule.attributes.contains(&attr), "{attr:?} in {rule:?}");
        }
        let route = local_route(AddressFamily::Inet);
        assert_eq!(route.header.kind, RouteType::Local);
        assert_eq!(route.header.destination_prefix_length, 0);
        assert!(route.attributes.contains(&RouteAttribute::Oif(1)));
        assert!(route.attributes.contains(&RouteAttribute::Table(100)));
    }
}
