//! The eBPF redirect: loads the kernel programs embedded in the binary, attaches them, pins
//! maps and links under the pin directory, and keeps the maps in step with enrolled pods.
//!
//! Pinned layout (`<pin dir>` defaults to `/sys/fs/bpf/ztunnel`):
//! - `<pin dir>/<MAP>`: every map, so `bpftool map dump pinned <pin dir>/ORIG_DST` works;
//! - `<pin dir>/links/<program>`: the cgroup links;
//! - `<pin dir>/links/inbound-<netns cookie>`: each pod's `sk_lookup` link.
//!
//! A restarted agent reopens the pinned maps (the loader reuses them by path) and keeps a
//! pinned link when it runs the same program (same tag); a link to an older program is
//! replaced, new first, so capture has no gap.
//!
//! This file loads, attaches and pins; `pod_maps` writes and reads the maps per pod; the ABI
//! conversions live in `ztunnel_common::convert`.

pub mod dump;
pub mod kernel;
pub mod linkinfo;
mod log_drain;
mod pod_maps;
mod relay;

pub use pod_maps::{DialTable, OrigDstTable, PodKernelView, PodRedirect};
#[cfg(test)]
pub use relay::testing as relay_testing;
pub use relay::{Engaged, Engagement, KernelRelay};

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, Program, ProgramError, SkLookup};
use aya::{Ebpf, EbpfLoader};
use ztunnel_common::convert::pod_config;
pub use ztunnel_common::convert::{ip_from_key, ip_key, orig_dst_addr, sum_counters};
use ztunnel_common::{
    maps, programs, ConnKey, DialKey, DnsCounters, IpKey, ListenerKey, OrigDst, PodAddr, PodConfig,
    PodCounters, PortKey, AF_INET, AF_INET6,
};

use crate::socket::NetnsCookie;

/// The kernel object, built by build.rs with the bpf toolchain.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel"));

/// Errors of the redirect layer; each names what failed and the likely fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object did not load (verifier, or pinned maps from an incompatible version).
    #[error("loading the eBPF programs failed (if an older agent left maps in {pin_dir}, run `ztunnel-agent redirect uninstall --pin-dir {pin_dir}`)")]
    Load {
        /// Pin directory in use.
        pin_dir: String,
        /// Why.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object or has an unexpected type.
    #[error("eBPF program {0} is missing from the embedded object: the build is broken")]
    MissingProgram(&'static str),
    /// A map is missing from the object or has an unexpected type.
    #[error("eBPF map {name} is missing or has the wrong type: the build is broken")]
    MissingMap {
        /// Map name.
        name: &'static str,
        /// Why.
        #[source]
        source: Option<MapError>,
    },
    /// Loading or attaching a program failed.
    #[error("{what} program {name} failed")]
    Program {
        /// load or attach.
        what: &'static str,
        /// Program name.
        name: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A link could not be taken over for pinning.
    #[error("the link of program {name} cannot be pinned (kernel without bpf_link for cgroups? 5.7+ is needed)")]
    Link {
        /// Program name.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// Pinning or unpinning failed.
    #[error("pinning {path} failed: is {dir} on a bpffs mount?")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// The pin directory.
        dir: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A map update failed.
    #[error("updating eBPF map {map} for {what} failed")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was being written.
        what: String,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A pinned map was made by an agent version with a different map layout.
    #[error("the pinned map {path} has another layout (key {pinned_key} B, value {pinned_value} B, {pinned_entries} entries) than this agent's (key {key} B, value {value} B, {entries} entries): an agent of an incompatible version made it, and may still be using it. Refusing to start rather than corrupt it: stop every agent on the node, then run `ztunnel-agent redirect uninstall --pin-dir {pin_dir}` and start this agent (until it has enrolled the pods again their traffic is not captured: it bypasses the proxy)")]
    PinnedLayout {
        /// The pin path.
        path: PathBuf,
        /// The pin directory.
        pin_dir: String,
        /// Pinned key size.
        pinned_key: u32,
        /// Pinned value size.
        pinned_value: u32,
        /// Pinned capacity.
        pinned_entries: u32,
        /// Expected key size.
        key: u32,
        /// Expected value size.
        value: u32,
        /// Expected capacity.
        entries: u32,
    },
    /// The cgroup could not be opened.
    #[error("cannot open cgroup {path}: pass an existing cgroup v2 directory with --cgroup-path")]
    Cgroup {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Settings of the redirect layer.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory the cgroup programs attach to.
    pub cgroup: PathBuf,
    /// Destination ports never captured outbound.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination ports never captured inbound.
    pub exclude_inbound_ports: Vec<u16>,
    /// Whether plain passthrough connections are relayed by the kernel (see `relay`).
    pub kernel_relay: bool,
}

/// What the redirect layer did with one cgroup program at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached now and pinned.
    Attached,
    /// A pinned link to the same program was kept.
    Reused,
    /// A pinned link to a different program was replaced.
    Replaced,
}

/// The loaded and attached programs and their maps.
pub struct Redirect {
    config: RedirectConfig,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodConfig>,
    pod_addrs: HashMap<MapData, IpKey, PodAddr>,
    orig_dst: Arc<OrigDstTable>,
    dials: Arc<DialTable>,
    listeners: SockHash<MapData, ListenerKey>,
    counters: PerCpuHashMap<MapData, u64, PodCounters>,
    dns_counters: PerCpuHashMap<MapData, u64, DnsCounters>,
    attachments: Vec<(&'static str, Attachment)>,
    relay: Option<Arc<KernelRelay>>,
}

impl Redirect {
    /// Loads, attaches (or reuses what is pinned) and configures the excluded ports.
    pub fn install(config: RedirectConfig) -> Result<Self, Error> {
        let pin_dir = config.pin_dir.clone();
        let dir = pin_dir.display().to_string();
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| Error::Pin {
            path: links_dir.clone(),
            dir: dir.clone(),
            source,
        })?;
        check_pinned_layout(&pin_dir)?;
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> = maps::PINNED
            .iter()
            .chain(std::iter::once(&maps::AYA_LOGS))
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| Error::Load {
            pin_dir: dir.clone(),
            source: Box::new(source),
        })?;
        log_drain::start(&mut ebpf);

        let cgroup = File::open(&config.cgroup).map_err(|source| Error::Cgroup {
            path: config.cgroup.clone(),
            source,
        })?;
        let mut attachments = Vec::new();
        for name in programs::CGROUP {
            let state = attach_cgroup_program(&mut ebpf, name, &cgroup, &links_dir, &dir)?;
            attachments.push((name, state));
        }
        let inbound: &mut SkLookup = program(&mut ebpf, programs::INBOUND)?;
        inbound.load().map_err(|source| Error::Program {
            what: "loading",
            name: programs::INBOUND,
            source,
        })?;

        let relay = if config.kernel_relay {
            match relay::KernelRelay::load(&mut ebpf) {
                Ok(relay) => {
                    tracing::warn!(
                        "the kernel relay of plain passthrough connections is on: a relayed client that sends without reading while its server sends is reset past {} MiB, where TCP would only stall it (ZTUNNEL_KERNEL_RELAY=false, the default, keeps every connection under TCP's flow control)",
                        ztunnel_common::RELAY_PASS_BOUND >> 20
                    );
                    Some(Arc::new(relay))
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "the kernel relay of plain passthrough connections is off: the agent splices them (ZTUNNEL_KERNEL_RELAY=false silences this)");
                    None
                }
            }
        } else {
            None
        };
        let mut redirect = Self {
            enrolled: take_map(&mut ebpf, maps::ENROLLED_PODS)?,
            pod_addrs: take_map(&mut ebpf, maps::POD_ADDRS)?,
            orig_dst: Arc::new(OrigDstTable(Mutex::new(take_map(
                &mut ebpf,
                maps::ORIG_DST,
            )?))),
            dials: Arc::new(DialTable(Mutex::new(take_map(
                &mut ebpf,
                maps::AGENT_DIALS,
            )?))),
            listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            counters: take_map(&mut ebpf, maps::POD_COUNTERS)?,
            dns_counters: take_map(&mut ebpf, maps::DNS_COUNTERS)?,
            attachments,
            relay,
            ebpf,
            config,
        };
        redirect.set_excluded_ports()?;
        Ok(redirect)
    }

    /// What happened to each cgroup program at start-up.
    pub fn attachments(&self) -> &[(&'static str, Attachment)] {
        &self.attachments
    }

    fn inbound_link_path(&self, cookie: NetnsCookie) -> PathBuf {
        self.config
            .pin_dir
            .join("links")
            .join(format!("inbound-{cookie}"))
    }

    fn attach_inbound(&mut self, cookie: NetnsCookie, netns: &File) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let path = self.inbound_link_path(cookie);
        let dir = self.config.pin_dir.display().to_string();
        if path.exists() {
            // Same netns, same maps: the pinned link from before a restart still steers, as
            // long as it is still attached there (not detached behind the agent's back).
            // It must also run this agent's program: an older agent's would steer this
            // agent's source-preserving connections to the application back to 15006.
            let netns_ino = netns.metadata().map(|m| m.ino()).ok();
            let ours = self.inbound_tag();
            let attached = linkinfo::read(&path).ok().is_some_and(|i| {
                Some(i.target) == netns_ino.map(linkinfo::Target::Netns)
                    && ours.is_some()
                    && program_tag(i.program_id) == ours
            });
            if attached {
                return Ok(());
            }
        }
        let inbound: &mut SkLookup = program(&mut self.ebpf, programs::INBOUND)?;
        let attach_err = |source| Error::Program {
            what: "attaching",
            name: programs::INBOUND,
            source,
        };
        let id = inbound.attach(netns).map_err(attach_err)?;
        let link = inbound.take_link(id).map_err(attach_err)?;
        let link: FdLink = link.into();
        // The pinned link it replaces goes only now that the new one steers: no gap in
        // which the pod's plaintext would reach the application around the proxy.
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| Error::Pin {
                path: path.clone(),
                dir: dir.clone(),
                source,
            })?;
        }
        pin_link(link, &path, &dir)?;
        Ok(())
    }

    /// The tag (a hash of the instructions) of this agent's `sk_lookup` program.
    fn inbound_tag(&mut self) -> Option<u64> {
        let inbound: &mut SkLookup = program(&mut self.ebpf, programs::INBOUND).ok()?;
        inbound.info().ok().map(|info| info.tag())
    }

    /// Settings in use.
    pub fn config(&self) -> &RedirectConfig {
        &self.config
    }

    /// The cgroup programs' pinned links as the kernel reports them, in program order.
    pub fn cgroup_links(&self) -> Vec<(&'static str, std::io::Result<linkinfo::PinnedLinkInfo>)> {
        let dir = self.config.pin_dir.join("links");
        programs::CGROUP
            .iter()
            .map(|name| (*name, linkinfo::read(&dir.join(name))))
            .collect()
    }

    /// The table connections accepted on 15001 read their original destination from.
    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.orig_dst.clone()
    }

    /// The kernel relay of plain passthrough connections, unless it is off or the kernel
    /// refused it.
    pub fn kernel_relay(&self) -> Option<Arc<KernelRelay>> {
        self.relay.clone()
    }

    /// The table connections to an application from a client's address register in.
    pub fn dial_table(&self) -> Arc<DialTable> {
        self.dials.clone()
    }
}

/// The tag of the loaded program with this id, if it is still loaded.
fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

/// Refuses pinned maps whose key size, value size or capacity differ from this agent's: the
/// loader would reuse them as they are (an older agent's `POD_COUNTERS` with fewer counters,
/// say) and the programs would read and write past what each entry holds.
fn check_pinned_layout(pin_dir: &Path) -> Result<(), Error> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| Error::Load {
        pin_dir: pin_dir.display().to_string(),
        source: Box::new(aya::EbpfError::ParseError(e)),
    })?;
    for name in maps::PINNED {
        let path = pin_dir.join(name);
        let (Some(expected), Ok(pinned)) =
            (object.maps.get(name), aya::maps::MapInfo::from_pin(&path))
        else {
            continue;
        };
        let wanted = (
            expected.key_size(),
            expected.value_size(),
            expected.max_entries(),
        );
        let found = (pinned.key_size(), pinned.value_size(), pinned.max_entries());
        if wanted != found {
            return Err(Error::PinnedLayout {
                path,
                pin_dir: pin_dir.display().to_string(),
                pinned_key: found.0,
                pinned_value: found.1,
                pinned_entries: found.2,
                key: wanted.0,
                value: wanted.1,
                entries: wanted.2,
            });
        }
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::MissingProgram(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::MissingMap { name, source: None })?;
    T::try_from(map).map_err(|source| Error::MissingMap {
        name,
        source: Some(source),
    })
}

fn pin_link(link: FdLink, path: &Path, dir: &str) -> Result<PinnedLink, Error> {
    link.pin(path).map_err(|e| Error::Pin {
        path: path.to_path_buf(),
        dir: dir.to_string(),
        source: io::Error::other(e),
    })
}

/// Loads one cgroup program and makes sure exactly one link of ours runs it at the cgroup.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    links_dir: &Path,
    dir: &str,
) -> Result<Attachment, Error> {
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    let load_err = |source| Error::Program {
        what: "loading",
        name,
        source,
    };
    let attach_err = |source| Error::Program {
        what: "attaching",
        name,
        source,
    };
    let tag = match prog {
        Program::CgroupSockAddr(p) => {
            p.load().map_err(load_err)?;
            p.info().map_err(load_err)?.tag()
        }
        Program::SockOps(p) => {
            p.load().map_err(load_err)?;
            p.info().map_err(load_err)?.tag()
        }
        Program::CgroupSock(p) => {
            p.load().map_err(load_err)?;
            p.info().map_err(load_err)?.tag()
        }
        _ => return Err(Error::MissingProgram(name)),
    };
    let path = links_dir.join(name);
    let previous = PinnedLink::from_pin(&path).ok().map(FdLink::from);
    if let Some(old) = &previous {
        // Kept only if it runs this program and is still attached to this cgroup (a link
        // detached behind the agent's back, or from another cgroup, is replaced).
        let cgroup_id = {
            use std::os::unix::fs::MetadataExt;
            cgroup.metadata().map(|m| m.ino()).ok()
        };
        let attached_here = linkinfo::read(&path)
            .ok()
            .is_some_and(|i| Some(i.target) == cgroup_id.map(linkinfo::Target::Cgroup));
        if old_link_tag(old) == Some(tag) && attached_here {
            return Ok(Attachment::Reused);
        }
    }
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match prog {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| Error::Link { name, source })?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| Error::Link { name, source })?
        }
        Program::CgroupSock(p) => {
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| Error::Link { name, source })?
        }
        _ => return Err(Error::MissingProgram(name)),
    };
    // The new link runs alongside the old one for a moment (harmless: the old program sees
    // an already rewritten destination, the pod's own address, and skips it), then the old
    // pin is removed, which detaches it.
    let state = match previous {
        Some(_old) => {
            std::fs::remove_file(&path).map_err(|source| Error::Pin {
                path: path.clone(),
                dir: dir.to_string(),
                source,
            })?;
            Attachment::Replaced
        }
        None => Attachment::Attached,
    };
    pin_link(link, &path, dir)?;
    Ok(state)
}

fn old_link_tag(link: &FdLink) -> Option<u64> {
    let prog_id = link.info().ok()?.program_id();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .map(|p| p.tag())
}

/// Detaches everything (by removing the pins) and removes the pin directory.
pub fn uninstall(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
        std::fs::remove_dir(&links)?;
    }
    for name in maps::PINNED.iter().chain(std::iter::once(&maps::AYA_LOGS)) {
        let path = pin_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip_and_match_kernel_layout() {
        let v4: IpAddr = "10.244.1.10".parse().expect("ip");
        let key = ip_key(v4);
        assert_eq!(key.family, AF_INET);
        // The kernel's user_ip4 for 10.244.1.10 is these bytes in memory order.
        assert_eq!(key.addr[0].to_ne_bytes(), [10, 244, 1, 10]);
        assert_eq!(ip_from_key(key.family, &key.addr), Some(v4));
        let v6: IpAddr = "fd00::10".parse().expect("ip");
        let key = ip_key(v6);
        assert_eq!(key.family, AF_INET6);
        assert_eq!(ip_from_key(key.family, &key.addr), Some(v6));
        let mapped: IpAddr = "::ffff:10.244.1.10".parse().expect("ip");
        assert_eq!(ip_key(mapped), ip_key(v4));
        // The kubelet probe sources as the inbound program compares them.
        let probe4: IpAddr = "169.254.7.127".parse().expect("ip");
        assert_eq!(
            ip_key(probe4).addr,
            ztunnel_common::addr_words(&ztunnel_common::PROBE_SOURCE_V4)
        );
        let probe6: IpAddr = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
            .parse()
            .expect("ip");
        assert_eq!(
            ip_key(probe6).addr,
            ztunnel_common::addr_words(&ztunnel_common::PROBE_SOURCE_V6)
        );
    }

    #[test]
    fn pod_config_takes_first_address_of_each_family() {
        let ips: Vec<IpAddr> = ["10.244.1.10", "fd00::10", "10.244.1.11"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let c = pod_config(&ips);
        assert_eq!(
            c.flags,
            ztunnel_common::pod_flags::HAS_IPV4 | ztunnel_common::pod_flags::HAS_IPV6
        );
        assert_eq!(c.ip4.to_ne_bytes(), [10, 244, 1, 10]);
    }

    #[test]
    fn orig_dst_decodes_network_order_port() {
        let orig = OrigDst {
            family: AF_INET as u16,
            port_be: 9080u16.to_be(),
            addr: [u32::from_ne_bytes([10, 244, 1, 11]), 0, 0, 0],
        };
        assert_eq!(
            orig_dst_addr(&orig),
            Some("10.244.1.11:9080".parse().expect("addr"))
        );
    }
}
