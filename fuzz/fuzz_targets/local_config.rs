//! The local config file (YAML) as `--local-xds-path` reads it, through to the mesh state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ztunnel_agent::xds::local::load_state(std::path::Path::new("fuzz.yaml"), text);
    }
});
