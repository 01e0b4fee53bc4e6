//! A ZDS datagram from istio-cni: `WorkloadRequest` bytes with its ancillary-data cases
//! (truncated, zero to three file descriptors).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::zds_request(data));
