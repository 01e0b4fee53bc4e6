//! A real agent process, started in the node's network namespace with its own pin
//! directory; stopped and uninstalled on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::topology::Topology;
use crate::wait_for;

/// The agent binary (`cargo xtask test` builds it before the tests run).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZTUNNEL_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ztunnel-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p ztunnel-agent` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    /// Its log (stdout and stderr).
    pub log_path: PathBuf,
    /// Its pin directory.
    pub pin_dir: PathBuf,
    node: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    /// Log file prefix (`agent`, or the name of an agent started beside another).
    name: String,
    /// Whether the pin and scratch directories are this agent's to remove on drop (not for
    /// an agent started beside another, which shares them).
    owns_dirs: bool,
}

impl Agent {
    /// Starts an agent in the topology's node namespace; `args` follow `run`.
    pub fn start(topo: &Topology, args: &[&str]) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
        Self::start_pinned(topo, pin_dir, args)
    }

    /// Standalone mode: writes `yaml` as the local config (`<tmp>/<prefix>-cfg/mesh.yaml`),
    /// starts an agent on `node` reading it (plus `extra` arguments) and waits until it is
    /// ready. Returns the config path too, for tests that change the mesh.
    pub fn start_local(topo: &Topology, node: &str, yaml: &str, extra: &[&str]) -> (Self, PathBuf) {
        let config = Self::write_local_config(topo, yaml);
        let config_arg = config.display().to_string();
        let mut args = vec!["--node-name", node, "--local-xds-path", &config_arg];
        args.extend_from_slice(extra);
        let mut agent = Self::start(topo, &args);
        agent.wait_ready();
        (agent, config)
    }

    /// Writes `yaml` as the test's local config (`<tmp>/<prefix>-cfg/mesh.yaml`, removed
    /// with the agent's scratch directories) and returns its path.
    pub fn write_local_config(topo: &Topology, yaml: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{}-cfg", topo.prefix));
        std::fs::create_dir_all(&dir).expect("config dir");
        let config = dir.join("mesh.yaml");
        std::fs::write(&config, yaml).expect("write config");
        config
    }

    /// Like [`Agent::start`] with a chosen pin directory.
    pub fn start_pinned(topo: &Topology, pin_dir: PathBuf, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(&topo.prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let _ = Command::new(agent_binary())
            .args(["redirect", "uninstall", "--pin-dir"])
            .arg(&pin_dir)
            .output();
        let mut agent = Self {
            child: None,
            log_path: dir.join("agent-0.log"),
            pin_dir,
            node: topo.node_path(),
            args: args.iter().map(|s| s.to_string()).collect(),
            dir,
            name: "agent".into(),
            owns_dirs: true,
        };
        agent.spawn(0);
        agent
    }

    /// A second agent started beside `first`, as a surge rollout starts the new agent pod
    /// while the old one runs: the same pin directory, CA directory and arguments, in its own
    /// network namespace `netns`; its log is `<name>-<generation>.log`. It does not wait
    /// for readiness. `config` replaces the first agent's `--local-xds-path`.
    pub fn start_beside(first: &Agent, netns: PathBuf, name: &str, config: Option<&Path>) -> Self {
        let mut args = first.args.clone();
        if let Some(config) = config {
            let at = args
                .iter()
                .position(|a| a == "--local-xds-path")
                .expect("the first agent reads a local config");
            args[at + 1] = config.display().to_string();
        }
        if !args.iter().any(|a| a == "--ca-dir") {
            args.push("--ca-dir".into());
            args.push(first.dir.join("ca").display().to_string());
        }
        let mut agent = Self {
            child: None,
            log_path: PathBuf::new(),
            pin_dir: first.pin_dir.clone(),
            node: netns,
            args,
            dir: first.dir.clone(),
            name: name.into(),
            owns_dirs: false,
        };
        agent.spawn(0);
        agent
    }

    /// The per-test scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where this agent pins its maps and links.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn spawn(&mut self, generation: u32) {
        self.log_path = self.dir.join(format!("{}-{generation}.log", self.name));
        let log = std::fs::File::create(&self.log_path).expect("create agent log");
        let err = log.try_clone().expect("clone log fd");
        // A CA of the test's own unless the test shares one between agents.
        let ca_arg: Vec<String> = if self.args.iter().any(|a| a == "--ca-dir") {
            Vec::new()
        } else {
            vec!["--ca-dir".into(), self.dir.join("ca").display().to_string()]
        };
        // nsenter enters only the network namespace; `ip netns exec` would also remount
        // /sys and hide bpffs and the cgroup2 mount from the agent.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.node.display()))
            .arg(agent_binary())
            .arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(ca_arg)
            .args(&self.args)
            // Per-connection capture lines are at debug; the tests assert on them.
            .env("RUST_LOG", "info,ztunnel_agent::proxy=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start agent");
        self.child = Some(child);
    }

    /// The agent's process id (nsenter execs it, so the child is the agent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The current log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `parts`; returns the line.
    pub fn wait_log(&mut self, parts: &[&str]) -> String {
        self.wait_log_after(0, parts)
    }

    /// The number of log lines so far: lines after it are what [`Agent::wait_log_after`]
    /// looks at, so an older line with the same words cannot satisfy a wait.
    pub fn log_mark(&self) -> usize {
        self.log().lines().count()
    }

    /// Like [`Agent::wait_log`], among the lines after `mark` only.
    pub fn wait_log_after(&mut self, mark: usize, parts: &[&str]) -> String {
        let find = |log: &str| {
            log.lines()
                .skip(mark)
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_string)
        };
        let what = format!("agent log line with {parts:?}");
        let mut exited = None;
        let line = wait_for(&what, Duration::from_secs(20), || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    return Some(String::new());
                }
            }
            find(&self.log())
        });
        if let Some(status) = exited {
            return find(&self.log()).unwrap_or_else(|| {
                panic!(
                    "agent exited ({status}) before logging {parts:?}:\n{}",
                    self.log()
                )
            });
        }
        line
    }

    /// Lines containing every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    /// Waits for readiness.
    pub fn wait_ready(&mut self) {
        self.wait_log(&["ztunnel_agent::readiness", "all readiness blockers cleared"]);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait; the pinned redirect stays.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("agent running");
        child.wait().expect("wait for agent")
    }

    /// Sends `signal` to the agent without waiting (SIGTERM starts a drain; see
    /// [`Agent::wait_exit`]).
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("agent running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Starts the agent again with the same arguments (a restart).
    pub fn restart(&mut self, generation: u32) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn(generation);
    }

    /// `method path` to the agent's `port` on 127.0.0.1 inside its node namespace; returns
    /// the status code and body.
    pub fn http(&self, method: &str, port: u16, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let request = format!("{method} {path} HTTP/1.0\r\n\r\n");
        let response = crate::traffic::in_netns(&self.node, move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("agent port");
            s.write_all(request.as_bytes()).expect("request");
            let mut body = String::new();
            s.read_to_string(&mut body).expect("response");
            body
        });
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        (status, body)
    }

    /// GET `path` from the agent's `port`; the body.
    pub fn http_get(&self, port: u16, path: &str) -> String {
        self.http("GET", port, path).1
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("agent running");
        let status = wait_for("agent exit", timeout, || child.try_wait().ok().flatten());
        self.child = None;
        status
    }

    /// Runs `ztunnel-agent <args>` (a CLI command, not `run`) in the agent's node namespace;
    /// returns stdout, panicking with stderr on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.cli_status(args);
        assert_eq!(code, 0, "ztunnel-agent {args:?} failed: {stderr}");
        stdout
    }

    /// Runs `ztunnel-agent <args>` in the agent's node namespace; returns the exit code,
    /// stdout and stderr.
    pub fn cli_status(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node.display()))
            .arg(agent_binary())
            .args(args)
            .output()
            .expect("run the agent CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Copies of the agent's TCP sockets that are connected, with their local and peer
    /// addresses, taken with pidfd_getfd(2) (Linux 5.6): the test reads the options the agent
    /// set on them with getsockopt, as the kernel holds them.
    pub fn connected_sockets(&self) -> Vec<(SocketAddr, SocketAddr, std::os::fd::OwnedFd)> {
        use std::os::fd::FromRawFd;
        let pid = self.pid().expect("agent running") as libc::pid_t;
        // SAFETY: pidfd_open with a pid and no flags returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the fd was just returned to us and nothing else owns it.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
        let mut out = Vec::new();
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("agent fds");
        for entry in entries.flatten() {
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            let Some(target) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if !is_socket {
                continue;
            }
            use std::os::fd::AsRawFd;
            // SAFETY: pidfd_getfd with a valid pidfd and the target's fd number; returns a
            // new fd or -1 (the fd may have closed meanwhile).
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
            if fd < 0 {
                continue;
            }
            // SAFETY: a new fd returned to us.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
            let sock = socket2::SockRef::from(&fd);
            let tcp = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
            let addrs = (
                sock.local_addr().ok().and_then(|a| a.as_socket()),
                sock.peer_addr().ok().and_then(|a| a.as_socket()),
            );
            if let (true, (Some(local), Some(peer))) = (tcp, addrs) {
                out.push((local, peer, fd));
            }
        }
        out
    }

    /// GET /metrics from the agent's 15020.
    pub fn scrape_metrics(&self) -> String {
        self.http_get(15020, "/metrics")
    }

    /// `ztunnel-agent redirect dump` for this agent's pin directory.
    pub fn dump(&self) -> String {
        crate::sh(
            &agent_binary().display().to_string(),
            &[
                "redirect",
                "dump",
                "--pin-dir",
                &self.pin_dir.display().to_string(),
            ],
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("agent log ({}):\n{}", self.log_path.display(), self.log());
        }
        if !self.owns_dirs {
            return;
        }
        let _ = Command::new(agent_binary())
            .args(["redirect", "uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        // The scratch directories go with the test, pass or fail (the log was printed above).
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut cfg = self.dir.clone().into_os_string();
        cfg.push("-cfg");
        let _ = std::fs::remove_dir_all(cfg);
    }
}
