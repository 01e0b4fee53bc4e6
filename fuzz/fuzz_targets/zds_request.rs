//! A ZDS datagram from istio-cni: `WorkloadRequest` bytes with its ancillary-data cases
//! (truncated, zero to three file descriptors).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let truncated = flags & 1 == 1;
    let fds = usize::from((flags >> 1) & 3);
    let _ = ztunnel_agent::enroll::zds::parse_request(bytes, truncated, fds);
});
