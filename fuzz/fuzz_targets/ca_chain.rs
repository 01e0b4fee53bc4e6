//! A CA's answer (`cert_chain`, PEM strings separated by NUL in the input) as the CA client
//! checks it, and a peer's DER certificate as the TLS verifiers read its SPIFFE identity.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztunnel_fuzz::ca_chain(data));
