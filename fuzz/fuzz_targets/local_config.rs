//! The local config file (YAML) as `--local-xds-path` reads it, through to the mesh state.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::local_config(data));
