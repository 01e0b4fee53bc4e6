//! Inbound plaintext steering: an `sk_lookup` program attached to each enrolled pod's network
//! namespace hands TCP connections for the pod's addresses to the agent's 15006 listener, so
//! the accepted socket's local address is the original destination.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use ztunnel_common::{
    addr_words, DialKey, IpKey, ListenerKey, PortKey, AF_INET, HBONE_PORT, PROBE_SOURCE_V4,
    PROBE_SOURCE_V6,
};

use crate::maps::{count, AGENT_DIALS, EXCLUDED_INBOUND_PORTS, INBOUND_LISTENERS, POD_ADDRS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const PROBE_V4: [u32; 4] = addr_words(&PROBE_SOURCE_V4);
const PROBE_V6: [u32; 4] = addr_words(&PROBE_SOURCE_V6);

#[sk_lookup]
pub fn ztunnel_inbound(ctx: SkLookupContext) -> u32 {
    try_inbound(&ctx)
}

/// Reads one `u32` field of the context. Volatile so that each read stays a load at a
/// constant offset from the context pointer, the only form the verifier accepts (merged
/// branches otherwise turn into a load through a derived pointer).
macro_rules! ctx_u32 {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the context pointer is the kernel's bpf_sk_lookup for this program type;
        // the field is an aligned u32 inside it.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx.lookup).$($field)+)) }
    };
}

#[inline(always)]
fn try_inbound(ctx: &SkLookupContext) -> u32 {
    if ctx_u32!(ctx, protocol) != IPPROTO_TCP {
        return SK_PASS;
    }
    let family = ctx_u32!(ctx, family);
    let (local, remote) = if family == AF_INET {
        (
            [ctx_u32!(ctx, local_ip4), 0, 0, 0],
            [ctx_u32!(ctx, remote_ip4), 0, 0, 0],
        )
    } else {
        (
            [
                ctx_u32!(ctx, local_ip6[0]),
                ctx_u32!(ctx, local_ip6[1]),
                ctx_u32!(ctx, local_ip6[2]),
                ctx_u32!(ctx, local_ip6[3]),
            ],
            [
                ctx_u32!(ctx, remote_ip6[0]),
                ctx_u32!(ctx, remote_ip6[1]),
                ctx_u32!(ctx, remote_ip6[2]),
                ctx_u32!(ctx, remote_ip6[3]),
            ],
        )
    };
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(owner) = (unsafe {
        POD_ADDRS.get(IpKey {
            family,
            addr: local,
        })
    })
    .copied() else {
        // Not addressed to the pod (loopback, another address): untouched.
        return SK_PASS;
    };
    // The agent's own connections to the application (from the pod's address to itself),
    // and the pod calling itself, are never steered.
    if local == remote {
        return SK_PASS;
    }
    let port = ctx_u32!(ctx, local_port) as u16;
    // The agent's connections to the application from the client's address (source-address
    // preservation), registered just before their connect(): the application's listener
    // takes them. Nothing else can be in the map: the agent writes every entry.
    // SAFETY: the context pointer is the kernel's bpf_sk_lookup; `remote_port` is a
    // network-order 16-bit field the verifier allows a 2-byte load of.
    let remote_port_be =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.lookup).remote_port)) };
    let dial = DialKey {
        family,
        local_port: port,
        remote_port: u16::from_be(remote_port_be),
        local,
        remote,
    };
    if AGENT_DIALS.get_ptr(dial).is_some() {
        return SK_PASS;
    }
    // kubelet's probes (SNATed by istio-cni) reach the application directly.
    let probe = if family == AF_INET {
        PROBE_V4
    } else {
        PROBE_V6
    };
    if remote == probe {
        count(owner.netns_cookie, |c| c.skipped_probe += 1);
        return SK_PASS;
    }
    if port == HBONE_PORT {
        count(owner.netns_cookie, |c| c.skipped_hbone_port += 1);
        return SK_PASS;
    }
    if EXCLUDED_INBOUND_PORTS
        .get_ptr(PortKey { port, _pad: 0 })
        .is_some()
    {
        count(owner.netns_cookie, |c| c.skipped_excluded_port += 1);
        return SK_PASS;
    }
    let key = ListenerKey {
        netns_cookie: owner.netns_cookie,
        family,
        _pad: 0,
    };
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            count(owner.netns_cookie, |c| c.inbound_captured += 1);
            SK_PASS
        }
        Err(_) => {
            // Enrolled but no listener (agent restarting): refuse rather than let plaintext
            // reach the application around the proxy.
            count(owner.netns_cookie, |c| c.dropped_no_listener += 1);
            SK_DROP
        }
    }
}
