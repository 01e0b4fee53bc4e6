//! The maps, declared once with BTF so `bpftool map dump` prints field names.

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuHashMap, SockHash},
    macros::btf_map,
};
use ztunnel_common::{
    ConnKey, DialKey, DnsCounters, IpKey, ListenerKey, OrigDst, PodAddr, PodConfig, PodCounters,
    PortKey, RelayFlow,
};

/// Pods on this node a kubelet cannot exceed by much (default max-pods is 110).
const MAX_PODS: usize = 1024;
/// Original destinations of connections in flight (LRU: a stale entry is evicted, never
/// blocks a new connection).
const MAX_IN_FLIGHT: usize = 65536;
/// Sockets of passthrough connections the kernel relays (two per connection); beyond it a
/// connection is spliced by the agent instead.
const MAX_RELAYED: usize = 65536;

#[btf_map]
pub static ENROLLED_PODS: HashMap<u64, PodConfig, MAX_PODS> = HashMap::new();

#[btf_map]
pub static POD_ADDRS: HashMap<IpKey, PodAddr, { MAX_PODS * 4 }> = HashMap::new();

#[btf_map]
pub static EXCLUDED_OUTBOUND_PORTS: HashMap<PortKey, u32, 256> = HashMap::new();

#[btf_map]
pub static EXCLUDED_INBOUND_PORTS: HashMap<PortKey, u32, 256> = HashMap::new();

#[btf_map]
pub static ORIG_DST_BY_SOCKET: LruHashMap<u64, OrigDst, MAX_IN_FLIGHT> = LruHashMap::new();

#[btf_map]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst, MAX_IN_FLIGHT> = LruHashMap::new();

/// Connections the agent is opening from a client's address to a pod's application (LRU: an
/// entry the agent failed to delete is evicted, never blocks a new one).
#[btf_map]
pub static AGENT_DIALS: LruHashMap<DialKey, u32, MAX_IN_FLIGHT> = LruHashMap::new();

#[btf_map]
pub static INBOUND_LISTENERS: SockHash<ListenerKey, { MAX_PODS * 2 }> = SockHash::new();

/// Relayed passthrough sockets under their own cookie; carries the stream verdict program.
#[btf_map]
pub static RELAY_SOCKS: SockHash<u64, MAX_RELAYED> = SockHash::new();

/// Relayed passthrough sockets under their peer's cookie: where the peer's bytes go.
#[btf_map]
pub static RELAY_TARGETS: SockHash<u64, MAX_RELAYED> = SockHash::new();

/// Each relayed direction's accounting by its source socket's cookie. Not LRU: an entry
/// must never vanish while its direction is relayed (the agent deletes it at the end; the
/// map is not pinned, so it goes with the agent).
#[btf_map]
pub static RELAY_FLOW: HashMap<u64, RelayFlow, MAX_RELAYED> = HashMap::new();

/// What each relayed direction may charge before it is handed back; the agent's.
#[btf_map]
pub static RELAY_ALLOWED: HashMap<u64, u64, MAX_RELAYED> = HashMap::new();

/// What the agent has read of each handed-back direction; the agent's.
#[btf_map]
pub static RELAY_READ: HashMap<u64, u64, MAX_RELAYED> = HashMap::new();

#[btf_map]
pub static POD_COUNTERS: PerCpuHashMap<u64, PodCounters, MAX_PODS> = PerCpuHashMap::new();

#[btf_map]
pub static DNS_COUNTERS: PerCpuHashMap<u64, DnsCounters, MAX_PODS> = PerCpuHashMap::new();

/// Moves one DNS counter of a pod.
#[inline(always)]
pub fn count_dns(netns_cookie: u64, bump: impl FnOnce(&mut DnsCounters)) {
    if DNS_COUNTERS.get_ptr_mut(netns_cookie).is_none() {
        // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists now.
        let _ = DNS_COUNTERS.insert(netns_cookie, DnsCounters::default(), 1);
    }
    if let Some(counters) = DNS_COUNTERS.get_ptr_mut(netns_cookie) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot, valid for
        // the duration of the program; no other code on this CPU runs concurrently.
        bump(unsafe { &mut *counters });
    }
}

/// Moves one counter of a pod. Per-CPU values need no atomics.
#[inline(always)]
pub fn count(netns_cookie: u64, bump: impl FnOnce(&mut PodCounters)) {
    if POD_COUNTERS.get_ptr_mut(netns_cookie).is_none() {
        // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists now.
        let _ = POD_COUNTERS.insert(netns_cookie, PodCounters::default(), 1);
    }
    if let Some(counters) = POD_COUNTERS.get_ptr_mut(netns_cookie) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot, valid for
        // the duration of the program; no other code on this CPU runs concurrently.
        bump(unsafe { &mut *counters });
    }
}
