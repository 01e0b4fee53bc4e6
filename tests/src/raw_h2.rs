//! An HBONE peer that writes its HTTP/2 frames by hand over a real mTLS connection, for the
//! tests of what the agent does with a peer that breaks HTTP/2's rules (more streams than the
//! server allows, oversized header blocks): a conforming client library never sends those.
//! It reads what comes back only as far as the tests need: which streams were answered and
//! kept open (200), answered and closed (a refusal), or reset (with the reason).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_agent::identity::ca::LocalCa;
use ztunnel_agent::identity::manager::CertManager;
use ztunnel_agent::identity::Identity;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The largest frame payload a client may send before it has read the server's settings.
const DEFAULT_MAX_FRAME: usize = 16_384;
/// HTTP/2's REFUSED_STREAM error code.
pub const REFUSED_STREAM: u32 = 0x7;

/// What became of one CONNECT stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with the stream left open: the tunnel was accepted (200).
    Open,
    /// Answered and closed at once: a refusal (400, 401, 431, 503, ...).
    Refused,
    /// Reset by HTTP/2 with this error code (REFUSED_STREAM is 7).
    Reset(u32),
}

/// One mTLS connection to an HBONE server, spoken to frame by frame.
pub struct RawHbone {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    next_stream: u32,
    outcomes: HashMap<u32, Outcome>,
    /// Set once the server sent GOAWAY (its error code).
    pub goaway: Option<u32>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl RawHbone {
    /// Connects to `hbone` with a certificate for `identity` from the mesh CA in `ca_dir`,
    /// expecting the server to be `server_identity`, and sends the connection preface.
    pub async fn connect(
        ca_dir: &Path,
        identity: &str,
        hbone: SocketAddr,
        server_identity: &str,
    ) -> Result<Self, BoxError> {
        let ca = LocalCa::load_or_create(ca_dir, "cluster.local")?;
        let certs = CertManager::local(ca, Duration::from_secs(3600));
        let me: Identity = identity.parse()?;
        let config =
            ztunnel_agent::tls::client_config(&certs, &me, vec![server_identity.parse()?])?;
        let tcp = TcpStream::connect(hbone).await?;
        let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        tls.flush().await?;
        Ok(Self {
            tls,
            next_stream: 1,
            outcomes: HashMap::new(),
            goaway: None,
        })
    }

    /// Opens a CONNECT stream to `authority` carrying `extra` headers (without ending it),
    /// in as many frames as its header block needs; returns the stream's id.
    pub async fn open(&mut self, authority: &str, extra: &[(&str, &str)]) -> Result<u32, BoxError> {
        let id = self.next_stream;
        self.next_stream += 2;
        // Literal header fields without indexing: `:method` and `:authority` by their
        // static-table index (2 and 1), the rest by name.
        let mut block = vec![0x02];
        string(&mut block, b"CONNECT");
        block.push(0x01);
        string(&mut block, authority.as_bytes());
        for (name, value) in extra {
            block.push(0x00);
            string(&mut block, name.as_bytes());
            string(&mut block, value.as_bytes());
        }
        let chunks: Vec<&[u8]> = block.chunks(DEFAULT_MAX_FRAME).collect();
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            out.extend(frame(kind, flags, id, chunk));
        }
        self.tls.write_all(&out).await?;
        self.tls.flush().await?;
        Ok(id)
    }

    /// Reads frames until every stream in `ids` has an outcome, the server went away, or
    /// `within` passed; answers the server's SETTINGS and PINGs. Returns the outcomes so far.
    pub async fn outcomes(
        &mut self,
        ids: &[u32],
        within: Duration,
    ) -> Result<HashMap<u32, Outcome>, BoxError> {
        let deadline = tokio::time::Instant::now() + within;
        while ids.iter().any(|id| !self.outcomes.contains_key(id)) && self.goaway.is_none() {
            let Ok(read) = tokio::time::timeout_at(deadline, self.read_frame()).await else {
                break;
            };
            let Some((kind, flags, stream, payload)) = read? else {
                break;
            };
            if std::env::var_os("RAW_H2_TRACE").is_some() {
                eprintln!(
                    "frame type={kind} flags={flags:#x} stream={stream} len={}",
                    payload.len()
                );
            }
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    self.tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
                    self.tls.flush().await?;
                }
                PING if flags & ACK == 0 => {
                    self.tls.write_all(&frame(PING, ACK, 0, &payload)).await?;
                    self.tls.flush().await?;
                }
                HEADERS => {
                    let outcome = if flags & END_STREAM != 0 {
                        Outcome::Refused
                    } else {
                        Outcome::Open
                    };
                    self.outcomes.entry(stream).or_insert(outcome);
                }
                RST_STREAM => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    self.outcomes.entry(stream).or_insert(Outcome::Reset(code));
                }
                GOAWAY => {
                    let code = payload
                        .get(4..8)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    self.goaway = Some(code);
                }
                DATA => {}
                _ => {}
            }
        }
        Ok(self.outcomes.clone())
    }

    async fn read_frame(&mut self) -> Result<Option<(u8, u8, u32, Vec<u8>)>, BoxError> {
        let mut head = [0u8; 9];
        match self.tls.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.tls.read_exact(&mut payload).await?;
        Ok(Some((head[3], head[4], stream, payload)))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal without Huffman coding.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix after the bits `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        integer(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    }
}
