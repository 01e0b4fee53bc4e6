//! The kernel relay of plain passthrough connections: a stream verdict program on the
//! agent's two sockets of a relayed connection sends every byte one socket receives out of
//! the other, so the payload never wakes the agent.
//!
//! `RELAY_SOCKS` holds each relayed socket under its own cookie and carries this program;
//! `RELAY_TARGETS` holds each socket under its *peer's* cookie, so the program finds where a
//! socket's bytes go with one lookup of its own cookie. `RELAY_TARGETS` has no program: the
//! agent puts both sockets there first, so a socket's bytes can only start flowing once the
//! socket they flow to is in place (see the agent's `proxy::splice`).

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext, EbpfContext,
};

use crate::maps::RELAY_TARGETS;

const SK_DROP: u32 = 0;

#[stream_verdict]
pub fn ztunnel_relay(ctx: SkBuffContext) -> u32 {
    try_relay(&ctx)
}

#[inline(always)]
fn try_relay(ctx: &SkBuffContext) -> u32 {
    // The carrier of a bare FIN has no payload; the FIN itself has already reached the
    // socket (the agent sees it there). Relayed, the empty send would break the peer's
    // stream (the kernel takes a send of nothing for a broken pipe).
    if ctx.len() == 0 {
        return SK_DROP;
    }
    // SAFETY: bpf_get_socket_cookie accepts an sk_skb context (the receiving socket).
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SK_PASS with the redirect recorded, or SK_DROP when the peer is not in the map, which
    // happens only once it has closed (closing takes a socket out of every map): the
    // connection is failing, and the agent, which watches the peer for errors and hang-ups,
    // resets both ends; the bytes are dropped as a write to a closed socket would drop them.
    RELAY_TARGETS.redirect_skb(ctx, socket, 0) as u32
}
