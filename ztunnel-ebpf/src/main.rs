//! ztunnel-agent's kernel programs: outbound capture (`cgroup/connect4|6`), original
//! destination bookkeeping (`sockops`, `cgroup/sock_release`, `cgroup/getpeername4|6`),
//! inbound plaintext steering (`sk_lookup`) and DNS capture (`cgroup/sendmsg4|6`,
//! `cgroup/recvmsg4|6`, and port 53 in the connect hooks) and the kernel relay of plain
//! passthrough connections (`sk_skb/stream_verdict`). Each entry point is a thin wrapper that returns
//! the verdict its `try_*` helper computed.

#![no_std]
#![no_main]

mod dns;
mod inbound;
mod maps;
mod orig_dst;
mod outbound;
mod relay;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never called.
    loop {}
}

/// GPL-compatible licence: needed for the helpers these programs call.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
