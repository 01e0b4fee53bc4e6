//! PEM text of certificates, both ways.

use rustls::pki_types::CertificateDer;

/// PEM text of one certificate.
pub fn pem_encode(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Every CERTIFICATE block of PEM text (other blocks and garbage between them are skipped).
pub fn parse_pem_certs(text: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut certs = Vec::new();
    let mut rest = text;
    while let Ok((remaining, pem)) = x509_parser::pem::parse_x509_pem(rest) {
        if pem.label == "CERTIFICATE" {
            certs.push(CertificateDer::from(pem.contents));
        }
        if remaining.len() >= rest.len() {
            break;
        }
        rest = remaining;
    }
    certs
}
