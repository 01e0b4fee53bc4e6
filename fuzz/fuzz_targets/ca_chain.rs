//! A CA's answer (`cert_chain`, PEM strings separated by NUL in the input) as the CA client
//! checks it, and a peer's DER certificate as the TLS verifiers read its SPIFFE identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let chain: Vec<String> = data
        .split(|b| *b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    let _ = ztunnel_agent::identity::caclient::check_chain(
        &chain,
        "spiffe://cluster.local/ns/default/sa/x",
    );
    let _ = ztunnel_agent::tls::spiffe_identity(&CertificateDer::from(data));
    let _ = ztunnel_agent::tls::pem::parse_pem_certs(data);
});
