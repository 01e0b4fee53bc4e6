//! The admin server's query strings (`/debug/logs?lines=`, `/logging?level=`,
//! `/debug/pprof/profile?seconds=&frequency=`, `/debug/diagnose?pod=&window_ms=`,
//! `/debug/flow?pod=&dst=`) through the parsers each handler uses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::admin_query(data));
