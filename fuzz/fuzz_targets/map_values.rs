//! Values the agent reads back from the eBPF maps (original destinations, address keys, the
//! per-CPU counters), whatever bytes a pinned map holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::map_values(data));
