//! The admin server's query strings (`/debug/logs?lines=`, `/logging?level=`,
//! `/debug/pprof/profile?seconds=&frequency=`, `/debug/diagnose?pod=&window_ms=`,
//! `/debug/flow?pod=&dst=`) through the parsers each handler uses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_agent::admin::query_value;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = query_value(query, "lines").map(str::parse::<usize>);
    let _ = query_value(query, "window_ms").map(str::parse::<u64>);
    if let Some(level) = query_value(query, "level") {
        // No logger is installed here: the filter is parsed, then refused for want of one.
        let _ = ztunnel_agent::telemetry::set_filter(level);
    }
    let _ = ztunnel_agent::profiling::ProfileRequest::parse(
        query_value(query, "seconds"),
        query_value(query, "frequency"),
    );
    let decoded = |name| {
        query_value(query, name).map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    };
    if let Some(pod) = decoded("pod") {
        let _ = ztunnel_agent::diagnose::evidence::parse_pod_ref(&pod);
    }
    if let Some(dst) = decoded("dst") {
        let _ = ztunnel_agent::diagnose::flow::split_destination(&dst);
    }
});
