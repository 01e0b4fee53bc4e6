//! Values the agent reads back from the eBPF maps (original destinations, address keys, the
//! per-CPU counters), whatever bytes a pinned map holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_common::convert::{ip_from_key, orig_dst_addr, sum_counters};
use ztunnel_common::{OrigDst, PodCounters};

fn word(data: &[u8], i: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, byte) in b.iter_mut().enumerate() {
        *byte = data.get(i * 4 + k).copied().unwrap_or(0);
    }
    u32::from_ne_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let family = word(data, 0);
    let addr = [word(data, 1), word(data, 2), word(data, 3), word(data, 4)];
    let _ = ip_from_key(family, &addr);
    let orig = OrigDst {
        family: (family & 0xffff) as u16,
        port_be: (family >> 16) as u16,
        addr,
    };
    let _ = orig_dst_addr(&orig);
    // Per-CPU counters: as many CPUs as the input has 8-byte words, each bumping the fields.
    let cpus: Vec<PodCounters> = data
        .chunks(8)
        .map(|chunk| {
            let mut v = [0u8; 8];
            v[..chunk.len()].copy_from_slice(chunk);
            let n = u64::from_ne_bytes(v);
            let mut c = PodCounters::default();
            c.outbound_captured = n;
            c.inbound_captured = n.rotate_left(7);
            c.orig_dst_lost = n.rotate_left(13);
            c
        })
        .collect();
    let summed = sum_counters(Some(&cpus));
    let _ = summed.fields();
});
