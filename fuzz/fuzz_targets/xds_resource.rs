//! An xDS resource body as istiod sends it (`istio.workload.Address` or
//! `istio.security.Authorization` bytes), decoded and converted to the mesh state's types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_agent::xds::client::{check_resource, ADDRESS_TYPE, AUTHORIZATION_TYPE};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let type_url = if selector % 2 == 0 {
        ADDRESS_TYPE
    } else {
        AUTHORIZATION_TYPE
    };
    let _ = check_resource(type_url, body);
});
