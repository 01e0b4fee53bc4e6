//! An xDS resource body as istiod sends it (`istio.workload.Address` or
//! `istio.security.Authorization` bytes), decoded and converted to the mesh state's types.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::xds_resource(data));
