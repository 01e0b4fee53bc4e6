//! Outbound capture: `cgroup/connect4|6` send an enrolled pod's TCP connections to the
//! agent's 15001 listener in the same pod, after recording where they were going;
//! `cgroup/getpeername4|6` give the application back the address it dialled.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use ztunnel_common::{
    outbound_decision, IpKey, OrigDst, OutboundDecision, PodConfig, PortKey, AF_INET, AF_INET6,
    AGENT_SOCKET_MARK, AGENT_TRANSPARENT_MARK, OUTBOUND_PORT,
};

use crate::maps::{
    count, count_dns, ENROLLED_PODS, EXCLUDED_OUTBOUND_PORTS, ORIG_DST_BY_SOCKET, POD_ADDRS,
};

/// Let the connect() proceed (possibly with a rewritten destination).
pub const ALLOW: i32 = 1;
/// Fail the connect() with EPERM: used when capture cannot be done safely, so an enrolled
/// pod's traffic never bypasses the proxy.
pub const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// `::ffff:0:0/96`, the IPv4-mapped prefix, third word in network order.
pub const V4_MAPPED_WORD: u32 = 0xffff_u32.to_be();

#[cgroup_sock_addr(connect4)]
pub fn ztunnel_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn ztunnel_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ztunnel_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ztunnel_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true)
}

/// Writes `user_ip6` one word at a time: the verifier only accepts context stores at a
/// constant offset from the context pointer, and a 16-byte array store would be lowered to a
/// copy through a derived pointer.
#[inline(always)]
pub fn set_user_ip6(ctx: &SockAddrContext, ip6: [u32; 4]) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's bpf_sock_addr; connect and getpeername hooks may write
    // user_ip6, and each store is a single aligned u32 at a constant offset.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[0]), ip6[0]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[1]), ip6[1]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[2]), ip6[2]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[3]), ip6[3]);
    }
}

/// The destination of a connect() as (family, address words); IPv4-mapped IPv6 addresses are
/// IPv4 on the wire, so they are treated as IPv4.
#[inline(always)]
pub fn destination(ctx: &SockAddrContext, ipv6_hook: bool) -> (u32, [u32; 4]) {
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if !ipv6_hook {
        return (AF_INET, [sa.user_ip4, 0, 0, 0]);
    }
    let ip6 = sa.user_ip6;
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        (AF_INET, [ip6[3], 0, 0, 0])
    } else {
        (AF_INET6, ip6)
    }
}

/// The calling socket's netns cookie and, when that netns is an enrolled pod's, its entry.
#[inline(always)]
pub fn enrolled_pod(ctx: &SockAddrContext) -> Option<(u64, PodConfig)> {
    // SAFETY: bpf_get_netns_cookie accepts this program type's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value.
    unsafe { ENROLLED_PODS.get(netns) }.map(|pod| (netns, *pod))
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, ipv6_hook: bool) -> i32 {
    // Not an enrolled pod: never touched, not even counted.
    let Some((netns, pod)) = enrolled_pod(ctx) else {
        return ALLOW;
    };
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ == SOCK_DGRAM {
        // A connected UDP socket: DNS goes to the proxy, the rest is left alone.
        return crate::dns::try_udp(ctx, netns, &pod, ipv6_hook);
    }
    if sa.type_ != SOCK_STREAM {
        count(netns, |c| c.skipped_not_tcp += 1);
        return ALLOW;
    }
    // SAFETY: `sk` is always set for connect hooks; the verifier allows reading `mark`.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    // The agent's own sockets: forwarding ones, and the transparent ones that carry a
    // client's address to the application.
    if mark == AGENT_SOCKET_MARK || mark == AGENT_TRANSPARENT_MARK {
        count(netns, |c| c.skipped_agent_socket += 1);
        return ALLOW;
    }
    let (family, addr) = destination(ctx, ipv6_hook);
    let port_be = sa.user_port as u16;
    let decision = outbound_decision(
        &pod,
        family,
        &addr,
        u16::from_be(port_be),
        || {
            // SAFETY: read-only lookup of a plain-old-data value.
            unsafe { POD_ADDRS.get(IpKey { family, addr }) }
                .is_some_and(|owner| owner.netns_cookie == netns)
        },
        |port| {
            EXCLUDED_OUTBOUND_PORTS
                .get_ptr(PortKey { port, _pad: 0 })
                .is_some()
        },
    );
    match decision {
        OutboundDecision::Capture => {}
        OutboundDecision::Dns => {
            if !crate::dns::record_and_redirect(ctx, family, addr, port_be, ipv6_hook) {
                count_dns(netns, |c| c.refused_map_full += 1);
                return REFUSE;
            }
            count_dns(netns, |c| c.captured_tcp += 1);
            return ALLOW;
        }
        OutboundDecision::Loopback => {
            count(netns, |c| c.skipped_loopback += 1);
            return ALLOW;
        }
        OutboundDecision::OwnAddress => {
            count(netns, |c| c.skipped_own_address += 1);
            return ALLOW;
        }
        OutboundDecision::ExcludedPort => {
            count(netns, |c| c.skipped_excluded_port += 1);
            return ALLOW;
        }
        OutboundDecision::NoPodAddress => {
            count(netns, |c| c.refused_no_pod_address += 1);
            return REFUSE;
        }
    }
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: family as u16,
        port_be,
        addr,
    };
    if ORIG_DST_BY_SOCKET.insert(socket, orig, 0).is_err() {
        count(netns, |c| c.refused_map_full += 1);
        return REFUSE;
    }
    let listener_port = (OUTBOUND_PORT.to_be()) as u32;
    if !ipv6_hook {
        // SAFETY: connect hooks may rewrite user_ip4.
        unsafe { (*ctx.sock_addr).user_ip4 = pod.ip4 };
    } else if family == AF_INET {
        set_user_ip6(ctx, [0, 0, V4_MAPPED_WORD, pod.ip4]);
    } else {
        set_user_ip6(ctx, pod.ip6);
    }
    // SAFETY: connect hooks may rewrite user_port.
    unsafe { (*ctx.sock_addr).user_port = listener_port };
    count(netns, |c| c.outbound_captured += 1);
    debug!(
        ctx,
        "outbound captured: netns {} dst port {}",
        netns,
        u16::from_be(port_be)
    );
    ALLOW
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, ipv6_hook: bool) -> i32 {
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(orig) = (unsafe { ORIG_DST_BY_SOCKET.get(socket) }).copied() else {
        return ALLOW;
    };
    if !ipv6_hook {
        // SAFETY: getpeername hooks may rewrite user_ip4.
        unsafe { (*ctx.sock_addr).user_ip4 = orig.addr[0] };
    } else if orig.family as u32 == AF_INET {
        set_user_ip6(ctx, [0, 0, V4_MAPPED_WORD, orig.addr[0]]);
    } else {
        set_user_ip6(ctx, orig.addr);
    }
    // SAFETY: getpeername hooks may rewrite user_port.
    unsafe { (*ctx.sock_addr).user_port = orig.port_be as u32 };
    ALLOW
}
