//! istio-cni's ZDS protocol (proto/zds.proto): the agent connects to the CNI's
//! SOCK_SEQPACKET socket, says hello, and answers every WorkloadRequest with one
//! WorkloadResponse: an empty `ack.error` for success, a reason otherwise (a NACK). An `add`
//! carries the pod's network namespace as an SCM_RIGHTS fd.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::{Enrollment, PodSpec, Source};
use crate::netns::PodNetns;
use crate::telemetry::ErrorChain;
use crate::zds_proto::{
    workload_request, workload_response, Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
};

/// Largest message accepted; upstream's CNI messages are well under 1 KiB.
const MAX_MESSAGE: usize = 64 * 1024;
/// Reconnect back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A ZDS session failure (the client reconnects after it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect.
    #[error("cannot connect to the istio-cni socket {path}: is the CNI node agent running?")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// I/O on the socket.
    #[error("ZDS connection to {path} failed")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The CNI closed the connection.
    #[error("the istio-cni agent closed the ZDS connection")]
    Closed,
}

/// One received datagram.
struct Datagram {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// Runs the client until cancelled, reconnecting with back-off. `synced` is notified after
/// the first snapshot has been applied.
pub async fn run(
    path: PathBuf,
    enrollment: Arc<Mutex<Enrollment>>,
    synced: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = session(&path, &enrollment, &synced, &mut backoff);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = session => r,
        };
        if let Err(e) = result {
            tracing::warn!(error = %ErrorChain(&e), retry_in = ?backoff, "ZDS session ended");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    path: &Path,
    enrollment: &Mutex<Enrollment>,
    synced: &Notify,
    backoff: &mut Duration,
) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let fd = connect_seqpacket(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the AsyncFd takes ownership of the fd, so it stays open and registered with
    // this reactor only until the AsyncFd is dropped.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io_err(e.into()))?;
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    send(&fd, &hello.encode_to_vec()).await.map_err(io_err)?;
    tracing::info!(path = %path.display(), "connected to istio-cni (ZDS)");
    *backoff = BACKOFF_MIN;
    // Pods named since this connection started; at snapshot_sent, the others are removed.
    let mut snapshot: Vec<String> = Vec::new();
    loop {
        let datagram = recv(&fd).await.map_err(io_err)?;
        if datagram.bytes.is_empty() && datagram.fds.is_empty() {
            return Err(Error::Closed);
        }
        let error = handle(datagram, enrollment, synced, &mut snapshot).await;
        if let Some(reason) = &error {
            tracing::warn!(reason = %reason, "ZDS request refused (NACK)");
        }
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        send(&fd, &response.encode_to_vec()).await.map_err(io_err)?;
    }
}

/// A ZDS request, checked: what istio-cni asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum ZdsRequest {
    /// Enroll this pod (its namespace fd came with it).
    Add(PodSpec),
    /// The pod is still there (during the snapshot).
    Keep(String),
    /// The pod is gone.
    Del(String),
    /// The snapshot is complete: pods not named since are gone.
    SnapshotSent,
}

/// Checks one datagram from istio-cni: its bytes (`truncated` when larger than the buffer)
/// and how many file descriptors came with it. `Err` is the answer's error text (the fuzz
/// targets' entry).
pub fn parse_request(bytes: &[u8], truncated: bool, fds: usize) -> Result<ZdsRequest, String> {
    if truncated {
        return Err(format!(
            "message larger than {MAX_MESSAGE} bytes: not a ZDS WorkloadRequest"
        ));
    }
    let request =
        WorkloadRequest::decode(bytes).map_err(|e| format!("malformed WorkloadRequest: {e}"))?;
    if fds > 1 {
        return Err("request carried more than one file descriptor".to_string());
    }
    let is_add = matches!(request.payload, Some(workload_request::Payload::Add(_)));
    if fds == 1 && !is_add {
        // Upstream refuses it too: only `add` carries a namespace.
        return Err("unexpected file descriptor: only add carries a network namespace".to_string());
    }
    match request.payload {
        None => Err(
            "WorkloadRequest without payload: expected add, keep, del or snapshot_sent".to_string(),
        ),
        Some(workload_request::Payload::Add(add)) => {
            if add.uid.is_empty() {
                return Err("add without uid".to_string());
            }
            if fds == 0 {
                return Err(format!(
                    "add for pod {} carried no network namespace fd (SCM_RIGHTS)",
                    add.uid
                ));
            }
            let info = add.workload_info.unwrap_or_default();
            Ok(ZdsRequest::Add(PodSpec {
                uid: add.uid.clone(),
                name: if info.name.is_empty() {
                    add.uid.clone()
                } else {
                    info.name
                },
                namespace: info.namespace,
                service_account: info.service_account,
                ips: Vec::new(),
            }))
        }
        Some(workload_request::Payload::Keep(keep)) => Ok(ZdsRequest::Keep(keep.uid)),
        Some(workload_request::Payload::Del(del)) => Ok(ZdsRequest::Del(del.uid)),
        Some(workload_request::Payload::SnapshotSent(_)) => Ok(ZdsRequest::SnapshotSent),
    }
}

/// Applies one request; returns the NACK reason, or None for success.
async fn handle(
    datagram: Datagram,
    enrollment: &Mutex<Enrollment>,
    synced: &Notify,
    snapshot: &mut Vec<String>,
) -> Option<String> {
    let request = match parse_request(
        datagram.bytes.as_slice(),
        datagram.truncated,
        datagram.fds.len(),
    ) {
        Ok(request) => request,
        Err(e) => return Some(e),
    };
    let netns_fd = datagram.fds.into_iter().next();
    match request {
        ZdsRequest::Add(spec) => {
            let Some(netns_fd) = netns_fd else {
                return Some(format!(
                    "add for pod {} carried no network namespace fd (SCM_RIGHTS)",
                    spec.uid
                ));
            };
            snapshot.push(spec.uid.clone());
            let mut enrollment = enrollment.lock().await;
            let what = format!("netns fd of pod {}/{}", spec.namespace, spec.name);
            let netns = match PodNetns::from_file(File::from(netns_fd), what, enrollment.host()) {
                Ok(n) => n,
                Err(e) => return Some(ErrorChain(&e).to_string()),
            };
            enrollment
                .enroll(Source::Zds, spec, netns)
                .await
                .err()
                .map(|e| ErrorChain(&e).to_string())
        }
        ZdsRequest::Keep(uid) => {
            snapshot.push(uid);
            None
        }
        ZdsRequest::Del(uid) => {
            let mut enrollment = enrollment.lock().await;
            match enrollment.unenroll(&uid).await {
                Ok(true) => None,
                // Deleting an unknown pod is not an error for the CNI: the state converges.
                Ok(false) => {
                    tracing::debug!(uid = %uid, "ZDS del for a pod not enrolled");
                    None
                }
                Err(e) => Some(ErrorChain(&e).to_string()),
            }
        }
        ZdsRequest::SnapshotSent => {
            let mut enrollment = enrollment.lock().await;
            let result = enrollment.retain(Source::Zds, snapshot).await;
            synced.notify_one();
            result.err().map(|e| ErrorChain(&e).to_string())
        }
    }
}

fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(fd),
        // A non-blocking unix connect either succeeds or fails at once, except EAGAIN when
        // the backlog is full: treat that as a failure and retry later.
        Err(e) => Err(e.into()),
    }
}

async fn send(fd: &AsyncFd<OwnedFd>, bytes: &[u8]) -> io::Result<()> {
    loop {
        let mut guard = fd.writable().await?;
        let result = guard.try_io(|inner| {
            let iov = [IoSlice::new(bytes)];
            sendmsg::<()>(inner.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)
        });
        match result {
            Ok(r) => return r.map(|_| ()),
            Err(_would_block) => continue,
        }
    }
}

async fn recv(fd: &AsyncFd<OwnedFd>) -> io::Result<Datagram> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| recv_now(inner.as_raw_fd())) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

fn recv_now(fd: RawFd) -> io::Result<Datagram> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS just installed this fd in our table and nothing else
                // owns it; wrapping it at once guarantees it is closed exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let n = msg.bytes;
    buf.truncate(n);
    Ok(Datagram {
        bytes: buf,
        fds,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_uses_field_two_like_upstream() {
        // DelWorkload.uid is field 2 upstream; a mismatch would silently drop deletes.
        let req = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(
                crate::zds_proto::DelWorkload { uid: "u".into() },
            )),
        };
        // field 2 (del) length-delimited, containing field 2 (uid) length 1 "u".
        assert_eq!(req.encode_to_vec(), vec![0x12, 0x03, 0x12, 0x01, b'u']);
    }
}
