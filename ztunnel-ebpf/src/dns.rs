//! DNS capture: an enrolled pod's UDP datagrams to port 53 go to the agent's DNS proxy on the
//! pod's own loopback, port 15053, whether sent unconnected (`cgroup/sendmsg4|6`) or on a
//! connected socket (the connect hooks call [`try_udp`]); the resolver the pod asked is
//! recorded by socket, and `cgroup/recvmsg4|6` give it back as the source of the proxy's
//! replies, so resolver libraries that check where an answer came from (glibc does) accept
//! it. The agent's own sockets (its forwarder) carry its mark and are never captured.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use ztunnel_common::{
    dns_captured, pod_flags, OrigDst, PodConfig, AF_INET, AGENT_SOCKET_MARK, DNS_PORT,
    DNS_PROXY_PORT, LOOPBACK_V4_BE,
};

use crate::maps::{count, count_dns, ORIG_DST_BY_SOCKET};
use crate::outbound::{destination, enrolled_pod, set_user_ip6, ALLOW, REFUSE, V4_MAPPED_WORD};

#[cgroup_sock_addr(sendmsg4)]
pub fn ztunnel_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ztunnel_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ztunnel_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, false);
    // recvmsg hooks must return 1.
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ztunnel_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, true);
    1
}

#[inline(always)]
fn try_sendmsg(ctx: &SockAddrContext, ipv6_hook: bool) -> i32 {
    // Not an enrolled pod: never touched, not even counted.
    let Some((netns, pod)) = enrolled_pod(ctx) else {
        return ALLOW;
    };
    try_udp(ctx, netns, &pod, ipv6_hook)
}

/// An enrolled pod's UDP send (unconnected) or connect: DNS to the proxy, the rest alone.
#[inline(always)]
pub fn try_udp(ctx: &SockAddrContext, netns: u64, pod: &PodConfig, ipv6_hook: bool) -> i32 {
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: `sk` is always set for these hooks; the verifier allows reading `mark`.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == AGENT_SOCKET_MARK {
        count(netns, |c| c.skipped_agent_socket += 1);
        return ALLOW;
    }
    let (family, addr) = destination(ctx, ipv6_hook);
    let port_be = sa.user_port as u16;
    let port = u16::from_be(port_be);
    if port != DNS_PORT {
        count_dns(netns, |c| c.skipped_not_dns += 1);
        return ALLOW;
    }
    if pod.flags & pod_flags::DNS_CAPTURE == 0 {
        count_dns(netns, |c| c.skipped_capture_off += 1);
        return ALLOW;
    }
    if !dns_captured(pod, family, &addr, port) {
        count(netns, |c| c.skipped_loopback += 1);
        return ALLOW;
    }
    if !record_and_redirect(ctx, family, addr, port_be, ipv6_hook) {
        count_dns(netns, |c| c.refused_map_full += 1);
        return REFUSE;
    }
    count_dns(netns, |c| c.captured_udp += 1);
    ALLOW
}

/// Records where the socket was going and points it at the DNS proxy on the pod's loopback
/// (the same family as the socket's destination). False when the record could not be made.
#[inline(always)]
pub fn record_and_redirect(
    ctx: &SockAddrContext,
    family: u32,
    addr: [u32; 4],
    port_be: u16,
    ipv6_hook: bool,
) -> bool {
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: family as u16,
        port_be,
        addr,
    };
    if ORIG_DST_BY_SOCKET.insert(socket, orig, 0).is_err() {
        return false;
    }
    if !ipv6_hook {
        // SAFETY: connect and sendmsg hooks may rewrite user_ip4.
        unsafe { (*ctx.sock_addr).user_ip4 = LOOPBACK_V4_BE };
    } else if family == AF_INET {
        set_user_ip6(ctx, [0, 0, V4_MAPPED_WORD, LOOPBACK_V4_BE]);
    } else {
        set_user_ip6(ctx, [0, 0, 0, 1u32.to_be()]);
    }
    // SAFETY: connect and sendmsg hooks may rewrite user_port.
    unsafe { (*ctx.sock_addr).user_port = u32::from(DNS_PROXY_PORT.to_be()) };
    true
}

#[inline(always)]
fn try_recvmsg(ctx: &SockAddrContext, ipv6_hook: bool) {
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != DNS_PROXY_PORT {
        return;
    }
    let from_proxy = if ipv6_hook {
        let ip6 = sa.user_ip6;
        ip6[0] == 0
            && ip6[1] == 0
            && ((ip6[2] == 0 && ip6[3] == 1u32.to_be())
                || (ip6[2] == V4_MAPPED_WORD && ip6[3] == LOOPBACK_V4_BE))
    } else {
        sa.user_ip4 == LOOPBACK_V4_BE
    };
    if !from_proxy {
        return;
    }
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(orig) = (unsafe { ORIG_DST_BY_SOCKET.get(socket) }).copied() else {
        return;
    };
    if !ipv6_hook {
        if orig.family as u32 != AF_INET {
            return;
        }
        // SAFETY: recvmsg hooks may rewrite user_ip4.
        unsafe { (*ctx.sock_addr).user_ip4 = orig.addr[0] };
    } else if orig.family as u32 == AF_INET {
        set_user_ip6(ctx, [0, 0, V4_MAPPED_WORD, orig.addr[0]]);
    } else {
        set_user_ip6(ctx, orig.addr);
    }
    // SAFETY: recvmsg hooks may rewrite user_port.
    unsafe { (*ctx.sock_addr).user_port = u32::from(orig.port_be) };
    // SAFETY: bpf_get_netns_cookie accepts this program type's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    count_dns(netns, |c| c.replies_restored += 1);
}
