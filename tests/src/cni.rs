//! A stand-in for istio-cni's node agent speaking the real ZDS protocol: it listens on a
//! SOCK_SEQPACKET socket, reads the agent's hello, sends WorkloadRequests (an `add` carries a
//! pod's netns fd as SCM_RIGHTS) and reads one WorkloadResponse per request.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, listen, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
    ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use ztunnel_agent::zds_proto::{
    workload_request, workload_response, AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello,
};

/// The CNI side of one ZDS connection.
pub struct CniServer {
    listener: OwnedFd,
    conn: Option<OwnedFd>,
}

impl CniServer {
    /// Listens at `path`.
    pub fn listen(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("seqpacket socket");
        bind(
            listener.as_raw_fd(),
            &UnixAddr::new(path).expect("unix addr"),
        )
        .expect("bind");
        listen(&listener, Backlog::new(4).expect("backlog")).expect("listen");
        // accept(2) honours SO_RCVTIMEO: a test whose agent never connects fails, not hangs.
        let timeout = nix::sys::time::TimeVal::new(CONNECT_WAIT.as_secs() as i64, 0);
        setsockopt(&listener, sockopt::ReceiveTimeout, &timeout).expect("timeout");
        Self {
            listener,
            conn: None,
        }
    }

    /// Accepts the agent's connection and returns its hello.
    pub fn accept_hello(&mut self) -> ZdsHello {
        let fd = restarting(|| accept(self.listener.as_raw_fd())).expect("accept agent");
        // SAFETY: accept returned a new fd we now own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let timeout = nix::sys::time::TimeVal::new(10, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).expect("timeout");
        self.conn = Some(fd);
        ZdsHello::decode(self.recv().as_slice()).expect("hello decodes")
    }

    /// Accepts another agent's connection beside the current one, as istio-cni keeps every
    /// connected agent (a surge rollout): returns the CNI side of the new connection, with
    /// its hello read; this one keeps its own.
    pub fn accept_beside(&self) -> (Self, ZdsHello) {
        let mut other = Self {
            listener: self.listener.try_clone().expect("dup listener"),
            conn: None,
        };
        let hello = other.accept_hello();
        (other, hello)
    }

    /// Whether the agent closed this connection (waits up to 10 s for it).
    pub fn closed_by_agent(&self) -> bool {
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let read = restarting(|| {
            recvmsg::<()>(self.conn().as_raw_fd(), &mut iov, None, MsgFlags::empty())
                .map(|m| m.bytes)
        });
        matches!(read, Ok(0))
    }

    fn conn(&self) -> &OwnedFd {
        self.conn.as_ref().expect("accepted")
    }

    fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let n = restarting(|| {
            recvmsg::<()>(self.conn().as_raw_fd(), &mut iov, None, MsgFlags::empty())
                .map(|m| m.bytes)
        })
        .expect("recv from agent");
        buf.truncate(n);
        buf
    }

    /// Sends raw bytes (optionally with an fd) and returns the `ack.error` of the answer.
    pub fn send_raw(&self, bytes: &[u8], fd: Option<&File>) -> String {
        let iov = [IoSlice::new(bytes)];
        let fds;
        let cmsgs: Vec<ControlMessage> = match fd {
            Some(f) => {
                fds = [f.as_raw_fd()];
                vec![ControlMessage::ScmRights(&fds)]
            }
            None => Vec::new(),
        };
        sendmsg::<()>(
            self.conn().as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("send to agent");
        let response = WorkloadResponse::decode(self.recv().as_slice()).expect("response decodes");
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("WorkloadResponse without ack"),
        }
    }

    /// Sends a request; returns the ack error ("" for success).
    pub fn send(&self, request: workload_request::Payload, fd: Option<&File>) -> String {
        let req = WorkloadRequest {
            payload: Some(request),
        };
        self.send_raw(&req.encode_to_vec(), fd)
    }

    /// `add` with the pod's netns (service account `default`).
    pub fn add(&self, uid: &str, name: &str, netns: &Path) -> String {
        self.add_as(uid, name, "default", netns)
    }

    /// `add` with the pod's netns and service account.
    pub fn add_as(&self, uid: &str, name: &str, sa: &str, netns: &Path) -> String {
        let file = File::open(netns).expect("open pod netns");
        self.send(
            workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(WorkloadInfo {
                    name: name.into(),
                    namespace: "default".into(),
                    service_account: sa.into(),
                    windows_namespace: None,
                }),
            }),
            Some(&file),
        )
    }

    /// `snapshot_sent`.
    pub fn snapshot_sent(&self) -> String {
        self.send(
            workload_request::Payload::SnapshotSent(SnapshotSent {}),
            None,
        )
    }

    /// `del`.
    pub fn del(&self, uid: &str) -> String {
        self.send(
            workload_request::Payload::Del(DelWorkload { uid: uid.into() }),
            None,
        )
    }
}

/// How long tests wait for the agent to connect.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A node whose agent takes its pods from istio-cni: the CNI side listening at
/// `<tmp>/<prefix>-cni.sock`, an agent started on it (`--inpod-uds`, plus `extra`), and the
/// agent's hello accepted.
pub fn start_with_agent(
    topo: &crate::topology::Topology,
    extra: &[&str],
) -> (CniServer, crate::agent::Agent, ZdsHello) {
    let sock = std::env::temp_dir().join(format!("{}-cni.sock", topo.prefix));
    let mut cni = CniServer::listen(&sock);
    let sock_arg = sock.display().to_string();
    let mut args = vec!["--inpod-uds", sock_arg.as_str()];
    args.extend_from_slice(extra);
    let agent = crate::agent::Agent::start(topo, &args);
    let hello = cni.accept_hello();
    (cni, agent, hello)
}

/// Runs `call` again while a signal interrupts it (EINTR): socket calls with a timeout
/// (`SO_RCVTIMEO`, set on every socket here) are never restarted after a handled signal,
/// even with `SA_RESTART` (signal(7)). CI saw `accept agent: EINTR` once.
fn restarting<T>(mut call: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match call() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}
