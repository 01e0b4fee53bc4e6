//! `ztunnel-agent diagnose [<namespace>/<pod>]`: is this pod's traffic going through the mesh,
//! and if not, why.
//!
//! The agent gathers the evidence (`GET /debug/diagnose` on the admin port): the kernel's
//! view of the pinned links (link ids, the cgroup and network namespace they are attached
//! to), the maps' entries for each pod, the pod's listeners as its own network namespace's
//! socket table shows them, the capture counters over a short window, certificate and xDS
//! state, and the pod's recent connection outcomes. The command walks the chain a captured
//! connection depends on, in order, and names the first broken link; exit status 0 means
//! every link holds.
//!
//! Three parts: [`evidence`] is the wire schema between the two sides, [`collect`] runs in
//! the agent (behind `/debug/diagnose`), [`report`] runs in the CLI.

pub mod collect;
pub mod evidence;
pub mod flow;
pub mod report;

pub use evidence::{parse_pod_ref, Evidence};
pub use report::{node_report, pod_report};
