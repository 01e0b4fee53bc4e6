//! A waypoint for the tests: an HBONE terminator in its own (unenrolled) pod, with a mesh
//! certificate for its service account, that records the `:authority` and the client
//! identity of every CONNECT it gets and forwards it over HBONE, as itself, to the pod the
//! test's resolver names, like Envoy in a waypoint does. It stores and forwards (the client's
//! bytes up to its end of stream, then the server's answer): enough for the request/answer
//! exchanges of [`crate::traffic::exchange`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use ztunnel_agent::identity::ca::LocalCa;
use ztunnel_agent::identity::manager::CertManager;
use ztunnel_agent::identity::Identity;

/// One CONNECT the waypoint got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `:authority` as the client's agent sent it.
    pub authority: String,
    /// The client certificate's SPIFFE identity.
    pub identity: String,
    /// Where the waypoint forwarded it, or why it could not.
    pub forwarded: Result<Hop, String>,
}

/// Where a waypoint sends a CONNECT on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The destination's HBONE server (`pod:15008`).
    pub hbone: SocketAddr,
    /// The `:authority` to ask it for (`pod:port`).
    pub authority: SocketAddr,
    /// The identity the destination must present.
    pub identity: String,
}

/// Maps a CONNECT authority to where the waypoint sends it.
pub type Resolver = Arc<dyn Fn(&str) -> Option<Hop> + Send + Sync>;

/// A running waypoint.
pub struct Waypoint {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Waypoint {
    /// Listens on `addr` (the pod's `ip:15008`) inside `netns`, with the certificate of
    /// `identity` issued by the mesh CA in `ca_dir` (the agents' `--ca-dir`).
    pub fn start(
        netns: PathBuf,
        addr: SocketAddr,
        ca_dir: &Path,
        identity: &str,
        resolve: Resolver,
    ) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let ca = LocalCa::load_or_create(ca_dir, "cluster.local").expect("mesh CA");
        let certs = Arc::new(CertManager::local(ca, Duration::from_secs(3600)));
        let me: Identity = identity.parse().expect("waypoint identity");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("open netns");
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            crate::traffic::runtime().block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .expect("bind waypoint");
                let config =
                    ztunnel_agent::tls::server_config(certs.clone(), me.clone()).expect("tls");
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                ready_tx.send(()).expect("ready");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let (acceptor, certs, me, log, resolve) = (
                        acceptor.clone(),
                        certs.clone(),
                        me.clone(),
                        log.clone(),
                        resolve.clone(),
                    );
                    tokio::spawn(async move {
                        let _ = serve(tcp, acceptor, certs, me, log, resolve).await;
                    });
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("waypoint did not start");
        Self { seen }
    }

    /// The CONNECTs seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<CertManager>,
    me: Identity,
    log: Arc<Mutex<Vec<Seen>>>,
    resolve: Resolver,
) -> Result<(), BoxError> {
    let tls = acceptor.accept(tcp).await?;
    let client =
        ztunnel_agent::tls::peer_identity(tls.get_ref().1.peer_certificates(), "cluster.local")?;
    let mut conn = h2::server::handshake(tls).await?;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted?;
        let (certs, me, log, resolve, client) = (
            certs.clone(),
            me.clone(),
            log.clone(),
            resolve.clone(),
            client.to_string(),
        );
        tokio::spawn(async move {
            let _ = relay(req, respond, certs, me, log, resolve, client).await;
        });
    }
    Ok(())
}

async fn relay(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    certs: Arc<CertManager>,
    me: Identity,
    log: Arc<Mutex<Vec<Seen>>>,
    resolve: Resolver,
    identity: String,
) -> Result<(), BoxError> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let target = if req.method() == Method::CONNECT {
        resolve(&authority).ok_or_else(|| format!("no route for {authority}"))
    } else {
        Err(format!("not a CONNECT: {}", req.method()))
    };
    log.lock().expect("lock").push(Seen {
        authority,
        identity,
        forwarded: target.clone(),
    });
    let Ok(hop) = target else {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        respond.send_response(r, true)?;
        return Ok(());
    };
    let mut send = respond.send_response(Response::new(()), false)?;
    let request = read_all(req.into_body()).await?;
    let answer = forward(&hop, &certs, &me, request).await?;
    send.send_data(answer, true)?;
    // Keep the stream until the data is flushed: the response future is gone, so wait for
    // the peer to reset or finish.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| send.poll_reset(cx)),
    )
    .await;
    Ok(())
}

async fn read_all(mut body: h2::RecvStream) -> Result<Bytes, BoxError> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    Ok(all.into())
}

/// One CONNECT along `hop` as the waypoint: sends `request` and returns the whole answer.
async fn forward(
    hop: &Hop,
    certs: &Arc<CertManager>,
    me: &Identity,
    request: Bytes,
) -> Result<Bytes, BoxError> {
    let (hbone, authority) = (hop.hbone, hop.authority);
    let expected = vec![hop.identity.parse()?];
    let config = ztunnel_agent::tls::client_config(certs.as_ref(), me, expected)?;
    let tcp = tokio::net::TcpStream::connect(hbone).await?;
    let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (sender, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut sender = sender.ready().await?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())?;
    let (response, mut send) = sender.send_request(req, false)?;
    send.send_data(request, true)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(format!("{hbone} answered {}", response.status()).into());
    }
    read_all(response.into_body()).await
}
