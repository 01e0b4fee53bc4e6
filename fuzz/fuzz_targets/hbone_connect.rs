//! An HBONE CONNECT as a pod's 15008 server sees it: `:authority`, the `forwarded` header
//! and the connection's local address (lines of the input), checked against a mesh with a
//! waypoint (the sandwich rules) and the source-address trust rules.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::hbone_connect(data));
