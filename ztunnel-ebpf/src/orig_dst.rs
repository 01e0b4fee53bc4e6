//! Original destination bookkeeping: `sockops` copies a captured socket's original
//! destination to a map keyed by its client end once the source port is known, so the agent
//! can find it from the accepted socket's peer address; `cgroup/sock_release` forgets the
//! per-socket entry. The agent deletes the `ORIG_DST` entry it read; LRU eviction bounds any
//! entry a crashed agent left behind.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, sock_ops},
    programs::{SockContext, SockOpsContext},
    EbpfContext,
};
use ztunnel_common::{ConnKey, AF_INET, AF_INET6, LOOPBACK_V4_BE};

use crate::maps::{count, ORIG_DST, ORIG_DST_BY_SOCKET};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const V4_MAPPED_WORD: u32 = 0xffff_u32.to_be();

#[sock_ops]
pub fn ztunnel_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    // sockops' return value only matters for ops that ask for a reply; these do not.
    1
}

#[cgroup_sock(sock_release)]
pub fn ztunnel_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Usually absent (only captured sockets have an entry); a failed delete is harmless.
    let _ = ORIG_DST_BY_SOCKET.remove(socket);
    1
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    // TCP_CONNECT is the first point where the source port is bound; ACTIVE_ESTABLISHED
    // repeats the copy in case the first one raced an eviction.
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    // SAFETY: bpf_get_socket_cookie accepts this program type's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(orig) = (unsafe { ORIG_DST_BY_SOCKET.get(socket) }).copied() else {
        return;
    };
    // A TCP DNS connection sent to the DNS proxy on the pod's loopback: the proxy never
    // looks it up, so it must not take room in the node-wide table (15001 capture always
    // goes to the pod's own address, never loopback).
    let to_loopback = if ctx.family() == AF_INET {
        ctx.remote_ip4() == LOOPBACK_V4_BE
    } else {
        let ip6 = ctx.remote_ip6();
        ip6[0] == 0
            && ip6[1] == 0
            && ((ip6[2] == 0 && ip6[3] == 1u32.to_be())
                || (ip6[2] == V4_MAPPED_WORD && ip6[3] == LOOPBACK_V4_BE))
    };
    if to_loopback {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts this program type's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (family, addr) = if ctx.family() == AF_INET {
        (AF_INET, [ctx.local_ip4(), 0, 0, 0])
    } else {
        let ip6 = ctx.local_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
            (AF_INET, [ip6[3], 0, 0, 0])
        } else {
            (AF_INET6, ip6)
        }
    };
    let key = ConnKey {
        netns_cookie: netns,
        family,
        port: ctx.local_port(),
        addr,
    };
    if ORIG_DST.insert(key, orig, 0).is_err() {
        count(netns, |c| c.orig_dst_lost += 1);
    }
}
