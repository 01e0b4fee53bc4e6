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
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
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
    /// A marked packet to a foreign address is not delivered locally.
    #[error("a packet marked 0x111 to a foreign address takes a `{kind}` route, not `local` (ip {family}): something else holds table 100 or a rule before priority 32764 takes the mark; see `ip {family} rule` and `ip {family} route show table 100` in the pod")]
    NotLocal { family: &'static str, kind: String },
    /// A netlink request failed.
    #[error("{what} failed (ip {family}): {source}")]
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
        // What exists already was kept: check that the whole set-up does its job, a marked
        // packet to a foreign address is delivered locally (table 100 may hold another
        // default route, or a rule before ours may take marked packets elsewhere).
        let kind = match marked_route(&mut socket, *family) {
            Ok(RouteType::Local) => continue,
            Ok(kind) => format!("{kind:?}").to_lowercase(),
            // What the kernel answers a lookup that ends on such a route.
            Err(e) => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => "unreachable".to_string(),
                Some(libc::EINVAL) => "blackhole".to_string(),
                Some(libc::EACCES) => "prohibit".to_string(),
                _ => {
                    return Err(Error::Netlink {
                        what: "route lookup `ip route get <foreign address> mark 0x111`",
                        family: name,
                        source: e,
                    })
                }
            },
        };
        return Err(Error::NotLocal { family: name, kind });
    }
    Ok(())
}

/// The type of the route a packet marked as the agent's, to a foreign address, takes
/// (`ip route get 192.0.2.1 mark 0x111`; 2001:db8::1 for IPv6).
fn marked_route(socket: &mut Socket, family: AddressFamily) -> io::Result<RouteType> {
    let foreign = if family == AddressFamily::Inet6 {
        RouteAddress::Inet6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
    } else {
        RouteAddress::Inet(std::net::Ipv4Addr::new(192, 0, 2, 1))
    };
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    query.header.destination_prefix_length = if family == AddressFamily::Inet6 {
        128
    } else {
        32
    };
    query.attributes = vec![
        RouteAttribute::Destination(foreign),
        RouteAttribute::Mark(AGENT_TRANSPARENT_MARK),
    ];
    match exchange(socket, RouteNetlinkMessage::GetRoute(query), NLM_F_REQUEST)? {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => Ok(route.header.kind),
        NetlinkPayload::Error(e) => Err(match e.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()),
            None => io::Error::new(io::ErrorKind::InvalidData, "an ACK instead of a route"),
        }),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink answer type {}", other.message_type()),
        )),
    }
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

/// Sends one request and returns the kernel's first answer.
fn exchange(
    socket: &mut Socket,
    message: RouteNetlinkMessage,
    flags: u16,
) -> io::Result<NetlinkPayload<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = Vec::with_capacity(8192);
    socket.recv(&mut answer, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(reply.payload)
}

/// Sends one request that creates something and waits for the kernel's answer; "already
/// exists" is success.
fn request(socket: &mut Socket, message: RouteNetlinkMessage) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    match exchange(socket, message, flags)? {
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
