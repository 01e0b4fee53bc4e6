//! The ABI shared by the kernel programs (`ztunnel-ebpf`) and the agent: map keys and values,
//! map and program names, ports and the socket mark.
//!
//! Every type is `#[repr(C)]` with explicit padding and no `bool`/`Option`, so the kernel and
//! userspace agree byte for byte and BTF describes the layout (`bpftool map dump` prints the
//! field names). Addresses are kept as the kernel hands them to programs: `u32` words in
//! network byte order; an IPv4 address lives in `addr[0]` with the other words zero.

#![no_std]

/// Outbound capture listener, in each enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener, in each enrolled pod's network namespace.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE listener; peers dial it directly, it is never redirected.
pub const HBONE_PORT: u16 = 15008;
/// DNS, the port captured DNS traffic was going to.
pub const DNS_PORT: u16 = 53;
/// The agent's DNS proxy (UDP and TCP) on the loopback of each enrolled pod whose DNS is
/// captured.
pub const DNS_PROXY_PORT: u16 = 15053;
/// `127.0.0.1`, network-order word.
pub const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// The source istio-cni gives kubelet's health probes (it SNATs them on the node), IPv4.
/// Inbound connections from it reach the application directly, as upstream's in-pod rules
/// let them: a probe must not depend on the proxy or be judged by mesh policy.
pub const PROBE_SOURCE_V4: [u8; 4] = [169, 254, 7, 127];
/// The same for IPv6: `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`.
pub const PROBE_SOURCE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

/// An address as the programs read it from the kernel: network-order words (IPv4 in word 0).
pub const fn addr_words(bytes: &[u8]) -> [u32; 4] {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 && i * 4 + 3 < bytes.len() {
        words[i] = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
    words
}
/// `SO_MARK` the agent sets on every socket it connects itself, so capture skips it
/// (1337, the mark upstream ztunnel uses for the same purpose).
pub const AGENT_SOCKET_MARK: u32 = 0x539;

/// `SO_MARK` of the agent's connections to a pod's application that carry the client's
/// address (transparent sockets): a policy-routing rule in the pod's namespace sends the
/// application's replies for this mark back to the agent (0x111, the mark upstream's in-pod
/// set-up uses for the same replies). Matched under [`AGENT_TRANSPARENT_MASK`].
pub const AGENT_TRANSPARENT_MARK: u32 = 0x111;

/// The bits of the mark [`AGENT_TRANSPARENT_MARK`] is matched under.
pub const AGENT_TRANSPARENT_MASK: u32 = 0xfff;

/// `AF_INET`, as the kernel reports it in program contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as the kernel reports it in program contexts.
pub const AF_INET6: u32 = 10;

/// Names of the maps, as declared in the object and pinned under the pin directory.
pub mod maps {
    /// Enrolled pods: netns cookie (`u64`) -> [`crate::PodConfig`].
    pub const ENROLLED_PODS: &str = "ENROLLED_PODS";
    /// Addresses of enrolled pods: [`crate::IpKey`] -> [`crate::PodAddr`].
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// Destination ports never captured outbound: [`crate::PortKey`] -> `u32` (unused).
    pub const EXCLUDED_OUTBOUND_PORTS: &str = "EXCLUDED_OUTBOUND_PORTS";
    /// Destination ports never captured inbound: [`crate::PortKey`] -> `u32` (unused).
    pub const EXCLUDED_INBOUND_PORTS: &str = "EXCLUDED_INBOUND_PORTS";
    /// Original destination of a captured socket by socket cookie (`u64`) -> [`crate::OrigDst`].
    pub const ORIG_DST_BY_SOCKET: &str = "ORIG_DST_BY_SOCKET";
    /// Original destination of a captured connection by its client end: [`crate::ConnKey`] ->
    /// [`crate::OrigDst`]; the agent reads and deletes it after accept().
    pub const ORIG_DST: &str = "ORIG_DST";
    /// The agent's 15006 listeners: [`crate::ListenerKey`] -> socket.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// Per-CPU counters per pod: netns cookie (`u64`) -> [`crate::PodCounters`].
    pub const POD_COUNTERS: &str = "POD_COUNTERS";
    /// Per-CPU hash: netns cookie -> [`crate::DnsCounters`] (a map of its own so that the
    /// layout of `POD_COUNTERS`, pinned by earlier agents, stays as it was).
    pub const DNS_COUNTERS: &str = "DNS_COUNTERS";
    /// Connections the agent is opening to a pod's application from the client's address:
    /// [`crate::DialKey`] -> `u32` (unused); `sk_lookup` leaves them to the application.
    pub const AGENT_DIALS: &str = "AGENT_DIALS";
    /// Kernel-relayed passthrough sockets under their own cookie (`u64`); not pinned.
    pub const RELAY_SOCKS: &str = "RELAY_SOCKS";
    /// Kernel-relayed passthrough sockets under their peer's cookie (`u64`); not pinned.
    pub const RELAY_TARGETS: &str = "RELAY_TARGETS";
    /// Each kernel-relayed direction's accounting, by its source socket's cookie (`u64`) ->
    /// [`crate::RelayFlow`]; made (zeroed) by the agent, then written by the program. Not
    /// pinned.
    pub const RELAY_FLOW: &str = "RELAY_FLOW";
    /// What each kernel-relayed direction may charge (`u64`, see [`crate::RelayFlow`]) before
    /// the program hands it back to the agent, by its source socket's cookie; written by the
    /// agent. Not pinned.
    pub const RELAY_ALLOWED: &str = "RELAY_ALLOWED";
    /// What the agent has read of each handed-back direction (`u64`), by its source socket's
    /// cookie; written by the agent. Not pinned.
    pub const RELAY_READ: &str = "RELAY_READ";
    /// aya-log's ring buffer.
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// Every map the agent pins, in a stable order.
    pub const PINNED: [&str; 10] = [
        ENROLLED_PODS,
        POD_ADDRS,
        EXCLUDED_OUTBOUND_PORTS,
        EXCLUDED_INBOUND_PORTS,
        ORIG_DST_BY_SOCKET,
        ORIG_DST,
        INBOUND_LISTENERS,
        POD_COUNTERS,
        DNS_COUNTERS,
        AGENT_DIALS,
    ];
}

/// Names of the programs in the object.
pub mod programs {
    /// `cgroup/connect4`: outbound IPv4 capture.
    pub const CONNECT4: &str = "ztunnel_connect4";
    /// `cgroup/connect6`: outbound IPv6 capture.
    pub const CONNECT6: &str = "ztunnel_connect6";
    /// `sockops`: moves the original destination to the 4-tuple map.
    pub const SOCKOPS: &str = "ztunnel_sockops";
    /// `cgroup/sock_release`: forgets a captured socket.
    pub const SOCK_RELEASE: &str = "ztunnel_sock_release";
    /// `cgroup/getpeername4`: shows the application the address it dialled.
    pub const GETPEERNAME4: &str = "ztunnel_getpeername4";
    /// `cgroup/getpeername6`.
    pub const GETPEERNAME6: &str = "ztunnel_getpeername6";
    /// `sk_lookup`: inbound plaintext steering to 15006, one link per pod netns.
    pub const INBOUND: &str = "ztunnel_inbound";
    /// `sk_skb/stream_verdict`: the kernel relay of plain passthrough connections.
    pub const RELAY: &str = "ztunnel_relay";
    /// `cgroup/sendmsg4`: DNS capture of unconnected IPv4 UDP sends.
    pub const SENDMSG4: &str = "ztunnel_sendmsg4";
    /// `cgroup/sendmsg6`: DNS capture of unconnected IPv6 UDP sends.
    pub const SENDMSG6: &str = "ztunnel_sendmsg6";
    /// `cgroup/recvmsg4`: the resolver's address restored as a DNS reply's source, IPv4.
    pub const RECVMSG4: &str = "ztunnel_recvmsg4";
    /// `cgroup/recvmsg6`: the same for IPv6.
    pub const RECVMSG6: &str = "ztunnel_recvmsg6";
    /// The programs attached once at the cgroup, in attach order (the reply side of DNS
    /// before the capture side, so no captured query's reply goes unrestored).
    pub const CGROUP: [&str; 10] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS,
        SOCK_RELEASE,
        GETPEERNAME4,
        GETPEERNAME6,
        RECVMSG4,
        RECVMSG6,
        SENDMSG4,
        SENDMSG6,
    ];
}

/// Bits of [`PodConfig::flags`].
pub mod pod_flags {
    /// [`crate::PodConfig::ip4`] is set.
    pub const HAS_IPV4: u32 = 1;
    /// [`crate::PodConfig::ip6`] is set.
    pub const HAS_IPV6: u32 = 2;
    /// The pod's DNS (port 53, UDP and TCP) goes to the agent's DNS proxy on 15053.
    pub const DNS_CAPTURE: u32 = 4;
}

/// What the kernel needs to know about an enrolled pod (value of `ENROLLED_PODS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// [`pod_flags`] bits.
    pub flags: u32,
    /// The pod's IPv4 address, network order.
    pub ip4: u32,
    /// The pod's IPv6 address, network-order words.
    pub ip6: [u32; 4],
}

/// What `cgroup/connect4|6` does with an enrolled pod's TCP connect(), once the checks that
/// need the socket itself (its type, the agent's mark) have passed. One function for the
/// kernel program and for `ztunnel-agent diagnose flow`, so the explanation cannot drift from
/// what the kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundDecision {
    /// Sent to the pod's 15001 (`outbound_captured`).
    Capture,
    /// Left alone: the destination is loopback (`skipped_loopback`).
    Loopback,
    /// Left alone: the destination is one of the pod's own addresses (`skipped_own_address`).
    OwnAddress,
    /// Left alone: the destination port is excluded (`skipped_excluded_port`).
    ExcludedPort,
    /// Refused with EPERM: the pod has no address of the destination's family, so the proxy
    /// cannot be reached (`refused_no_pod_address`).
    NoPodAddress,
    /// DNS over TCP: sent to the agent's DNS proxy on the pod's loopback, port 15053
    /// (`DnsCounters::captured_tcp`).
    Dns,
}

/// Whether `addr` of `family` is loopback (127.0.0.0/8, ::1).
#[inline(always)]
pub fn is_loopback(family: u32, addr: &[u32; 4]) -> bool {
    if family == AF_INET {
        // 127.0.0.0/8: first byte of the network-order word.
        (u32::from_be(addr[0]) >> 24) == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be()
    }
}

/// The outbound capture decision for `pod` connecting to `family`/`addr`, `port` (host
/// order), in the kernel's order. `own_address` says whether `POD_ADDRS` maps the destination
/// to this pod, `excluded` whether the port is in `EXCLUDED_OUTBOUND_PORTS`; each is asked
/// only when the decision gets that far, as the kernel program's map lookups are.
#[inline(always)]
pub fn outbound_decision(
    pod: &PodConfig,
    family: u32,
    addr: &[u32; 4],
    port: u16,
    own_address: impl FnOnce() -> bool,
    excluded: impl FnOnce(u16) -> bool,
) -> OutboundDecision {
    if is_loopback(family, addr) {
        return OutboundDecision::Loopback;
    }
    if own_address() {
        return OutboundDecision::OwnAddress;
    }
    if excluded(port) {
        return OutboundDecision::ExcludedPort;
    }
    if port == DNS_PORT && pod.flags & pod_flags::DNS_CAPTURE != 0 {
        return OutboundDecision::Dns;
    }
    let needed = if family == AF_INET {
        pod_flags::HAS_IPV4
    } else {
        pod_flags::HAS_IPV6
    };
    if pod.flags & needed == 0 {
        return OutboundDecision::NoPodAddress;
    }
    OutboundDecision::Capture
}

/// Whether an enrolled pod's UDP datagram to `family`/`addr`, `port` (host order) goes to
/// the agent's DNS proxy: DNS (port 53) to anything but loopback, with the pod's DNS capture
/// on. The kernel's `sendmsg` and `connect` hooks and `diagnose` ask the same question.
#[inline(always)]
pub fn dns_captured(pod: &PodConfig, family: u32, addr: &[u32; 4], port: u16) -> bool {
    port == DNS_PORT && pod.flags & pod_flags::DNS_CAPTURE != 0 && !is_loopback(family, addr)
}

/// Per-pod DNS capture counters (value of the per-CPU `DNS_COUNTERS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// UDP queries (unconnected sends and connected sockets) sent to the DNS proxy.
    pub captured_udp: u64,
    /// TCP connections to port 53 sent to the DNS proxy.
    pub captured_tcp: u64,
    /// Replies whose source was restored to the resolver the pod asked.
    pub replies_restored: u64,
    /// DNS left alone because the pod's DNS capture is off.
    pub skipped_capture_off: u64,
    /// UDP to a port other than 53, left alone.
    pub skipped_not_dns: u64,
    /// DNS refused (EPERM): the query's resolver could not be recorded, so its reply could
    /// not be given the right source.
    pub refused_map_full: u64,
}

impl DnsCounters {
    /// Field names and values, in declaration order.
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("captured_udp", self.captured_udp),
            ("captured_tcp", self.captured_tcp),
            ("replies_restored", self.replies_restored),
            ("skipped_capture_off", self.skipped_capture_off),
            ("skipped_not_dns", self.skipped_not_dns),
            ("refused_map_full", self.refused_map_full),
        ]
    }

    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &DnsCounters) {
        self.captured_udp = self.captured_udp.saturating_add(other.captured_udp);
        self.captured_tcp = self.captured_tcp.saturating_add(other.captured_tcp);
        self.replies_restored = self.replies_restored.saturating_add(other.replies_restored);
        self.skipped_capture_off = self
            .skipped_capture_off
            .saturating_add(other.skipped_capture_off);
        self.skipped_not_dns = self.skipped_not_dns.saturating_add(other.skipped_not_dns);
        self.refused_map_full = self.refused_map_full.saturating_add(other.refused_map_full);
    }
}

/// An IP address as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Network-order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// Value of `POD_ADDRS`: which pod owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodAddr {
    /// Network namespace cookie of the owning pod.
    pub netns_cookie: u64,
}

/// A port as a map key (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// The destination an application dialled before capture rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Port, network order (as in `bpf_sock_addr.user_port`).
    pub port_be: u16,
    /// Network-order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// The client end of a captured connection, as the agent sees it as the peer after accept().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Network namespace cookie of the pod the client is in.
    pub netns_cookie: u64,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Client port, host order.
    pub port: u32,
    /// Client address, network-order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// Key of `AGENT_DIALS`: a connection the agent opens inside a pod's namespace from a client's
/// address (transparent) to the pod's application, as `sk_lookup` sees its SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DialKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// The application's port, host order.
    pub local_port: u16,
    /// The client's port, host order.
    pub remote_port: u16,
    /// The application's (the pod's) address, network-order words; IPv4 in `[0]`.
    pub local: [u32; 4],
    /// The client's address, network-order words; IPv4 in `[0]`.
    pub remote: [u32; 4],
}

/// Value of `RELAY_FLOW`: one kernel-relayed direction as the program counts it. The kernel
/// gives the relay no flow control (a redirected packet leaves its source socket's window at
/// once), so the program bounds what may wait for the destination: past `RELAY_ALLOWED` it
/// hands the direction back to the agent for good, and packets then stay on the source
/// socket, under TCP's flow control, for the agent to read once the destination has taken
/// everything redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayFlow {
    /// Payload bytes redirected: what the destination takes before the agent may write.
    pub moved: u64,
    /// What the redirected packets are charged: their bytes plus [`RELAY_PACKET_CHARGE`]
    /// each, so many tiny packets are bounded by their real cost too.
    pub charged: u64,
    /// Non-zero once handed back to the agent.
    pub handed_back: u64,
    /// Payload bytes left on the source socket since the hand-back, for the agent.
    pub passed: u64,
    /// Non-zero once the program dropped a packet: handed-back packets outran what the
    /// agent read by more than [`RELAY_PASS_BOUND`] (they can queue where the kernel counts
    /// them against no buffer); the stream is broken and the agent resets the connection.
    pub broken: u64,
}

/// What a kernel-relayed direction may charge (payload plus [`RELAY_PACKET_CHARGE`] a
/// packet, see [`RelayFlow`]) beyond what its destination had taken when last seen keeping
/// up, before the program hands it back: the most the kernel holds for one slow destination.
/// About what TCP's own buffers hold for one connection.
pub const RELAY_BOUND: u64 = 8 * 1024 * 1024;

/// What a relayed packet is charged beyond its payload: about a small packet's kernel
/// buffer overhead.
pub const RELAY_PACKET_CHARGE: u64 = 1024;

/// How far a handed-back direction's packets may run ahead of what the agent has read
/// (`RELAY_READ`) before the program drops them. Above what the source socket's receive
/// buffer (set to [`RELAY_RCVBUF`] when relayed) lets through when the agent reads slowly.
pub const RELAY_PASS_BOUND: u64 = 16 * 1024 * 1024;

/// The receive buffer of a relayed socket (`SO_RCVBUF`; the kernel doubles it): what
/// handed-back packets may fill while the agent does not read, its window then closed.
pub const RELAY_RCVBUF: u32 = 2 * 1024 * 1024;

/// Key of `INBOUND_LISTENERS`: a pod's 15006 listener for one address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Network namespace cookie of the pod.
    pub netns_cookie: u64,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

/// Defines [`PodCounters`] from one list of fields: the struct, its field names and values in
/// order, and the per-CPU sum (a counter added to the list appears in all three).
macro_rules! pod_counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Per-pod capture counters (value of the per-CPU `POD_COUNTERS`; the agent sums the
        /// CPUs). Every kernel decision on an enrolled pod's socket moves exactly one of them.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct PodCounters {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl PodCounters {
            /// How many counters there are.
            pub const COUNT: usize = [$(stringify!($name)),*].len();

            /// Field names and values, in declaration order (for metrics and `redirect dump`).
            pub fn fields(&self) -> [(&'static str, u64); Self::COUNT] {
                [$((stringify!($name), self.$name)),*]
            }

            /// Adds another CPU's counters to these.
            pub fn add(&mut self, other: &PodCounters) {
                $(self.$name = self.$name.saturating_add(other.$name);)*
            }
        }
    };
}

pod_counters! {
    /// Outbound connections sent to 15001.
    outbound_captured,
    /// Inbound connections steered to 15006.
    inbound_captured,
    /// Outbound: destination is loopback.
    skipped_loopback,
    /// Outbound: destination is one of the pod's own addresses.
    skipped_own_address,
    /// Outbound or inbound: destination port excluded by configuration.
    skipped_excluded_port,
    /// Outbound: the socket carries the agent's mark (the agent's own connection).
    skipped_agent_socket,
    /// Outbound: neither TCP nor UDP (UDP is counted in [`DnsCounters`]).
    skipped_not_tcp,
    /// Inbound: the HBONE port, served directly by the agent.
    skipped_hbone_port,
    /// Outbound refused (EPERM): the pod has no address of the destination's family.
    refused_no_pod_address,
    /// Outbound refused (EPERM): the original destination could not be recorded.
    refused_map_full,
    /// Inbound dropped: no 15006 listener registered for the pod (agent down or restarting).
    dropped_no_listener,
    /// sockops: a captured socket's original destination could not be moved to `ORIG_DST`.
    orig_dst_lost,
    /// Inbound: from the kubelet probe source ([`PROBE_SOURCE_V4`], [`PROBE_SOURCE_V6`]).
    skipped_probe,
}

// The kernel and the agent share these layouts: a change in size is a change of ABI.
const _: () = assert!(core::mem::size_of::<PodConfig>() == 24);
const _: () = assert!(core::mem::size_of::<DnsCounters>() == 48);
const _: () = assert!(core::mem::size_of::<IpKey>() == 20);
const _: () = assert!(core::mem::size_of::<PodAddr>() == 8);
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 20);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 32);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);
const _: () = assert!(core::mem::size_of::<DialKey>() == 40);
const _: () = assert!(core::mem::size_of::<PodCounters>() == 13 * 8);

#[cfg(feature = "user")]
pub mod convert;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): plain-old-data #[repr(C)] structs of integers with explicit
    // padding fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::PodAddr {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::DialKey {}
    unsafe impl aya::Pod for super::RelayFlow {}
    unsafe impl aya::Pod for super::PodCounters {}
    // SAFETY: as above: `#[repr(C)]`, u64 fields only, no padding.
    unsafe impl aya::Pod for super::DnsCounters {}
}
