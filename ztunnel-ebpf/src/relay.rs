//! The kernel relay of plain passthrough connections: a stream verdict program on the
//! agent's two sockets of a relayed connection sends every byte one socket receives out of
//! the other, so the payload never wakes the agent.
//!
//! `RELAY_SOCKS` holds each relayed socket under its own cookie and carries this program;
//! `RELAY_TARGETS` holds each socket under its *peer's* cookie, so the program finds where a
//! socket's bytes go with one lookup of its own cookie. `RELAY_TARGETS` has no program: the
//! agent puts both sockets there first, so a socket's bytes can only start flowing once the
//! socket they flow to is in place (see the agent's `proxy::splice`).
//!
//! Flow control: a redirected packet leaves its source socket at once, so TCP's window
//! never closes and the kernel would queue for a slow destination without limit. Each
//! direction is charged what it redirects (`RELAY_FLOW`) against what the agent allows
//! (`RELAY_ALLOWED`, renewed while the destination keeps up); past it the direction is handed
//! back to the agent for good: its packets stay on the source socket (SK_PASS), whose window
//! then closes as TCP's does, and the agent takes over once the destination has taken
//! everything redirected. Where the kernel queues such packets behind the other direction's
//! bytes waiting to leave the same socket, it counts them against no buffer and the window
//! stays open: past `RELAY_PASS_BOUND` beyond what the agent has read (`RELAY_READ`), the
//! program drops them and marks the direction broken, and the agent resets the connection.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext, EbpfContext,
};
use ztunnel_common::{RelayFlow, RELAY_PACKET_CHARGE, RELAY_PASS_BOUND};

use crate::maps::{RELAY_ALLOWED, RELAY_FLOW, RELAY_READ, RELAY_TARGETS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[stream_verdict]
pub fn ztunnel_relay(ctx: SkBuffContext) -> u32 {
    try_relay(&ctx)
}

#[inline(always)]
fn try_relay(ctx: &SkBuffContext) -> u32 {
    // The carrier of a bare FIN has no payload; the FIN itself has already reached the
    // socket (the agent sees it there). Relayed, the empty send would break the peer's
    // stream (the kernel takes a send of nothing for a broken pipe).
    let len = ctx.len();
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: bpf_get_socket_cookie accepts an sk_skb context (the receiving socket).
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // No accounting (made before a socket joins, forgotten after it left): the agent takes
    // the direction.
    let Some(flow) = RELAY_FLOW.get_ptr_mut(socket) else {
        return SK_PASS;
    };
    // SAFETY: a pointer from a successful lookup, valid while the program runs; a socket's
    // verdicts run one at a time under its lock, and only this program writes the entry.
    let flow = unsafe { &mut *flow };
    if flow.handed_back != 0 {
        return pass(flow, socket, len);
    }
    let charge = u64::from(len) + RELAY_PACKET_CHARGE;
    // SAFETY: read-only lookup of a plain-old-data value.
    let allowed = unsafe { RELAY_ALLOWED.get(socket) }.copied().unwrap_or(0);
    if flow.charged + charge > allowed {
        flow.handed_back = 1;
        return pass(flow, socket, len);
    }
    // SK_PASS with the redirect recorded, or SK_DROP when the peer is not in the map, which
    // happens only once it has closed (closing takes a socket out of every map): the
    // connection is failing, and the agent, which watches the peer for errors and hang-ups,
    // resets both ends; the bytes are dropped as a write to a closed socket would drop them.
    let verdict = RELAY_TARGETS.redirect_skb(ctx, socket, 0) as u32;
    if verdict == SK_PASS {
        flow.moved += u64::from(len);
        flow.charged += charge;
    }
    verdict
}

/// A handed-back direction's packet: left on its socket for the agent, unless the packets
/// left so far run too far ahead of what the agent has read (then dropped, for good: the
/// stream is broken and the agent resets the connection).
#[inline(always)]
fn pass(flow: &mut RelayFlow, socket: u64, len: u32) -> u32 {
    if flow.broken != 0 {
        return SK_DROP;
    }
    // SAFETY: read-only lookup of a plain-old-data value.
    let read = unsafe { RELAY_READ.get(socket) }.copied().unwrap_or(0);
    if flow.passed + u64::from(len) > read + RELAY_PASS_BOUND {
        flow.broken = 1;
        return SK_DROP;
    }
    flow.passed += u64::from(len);
    SK_PASS
}
