//! `cargo xtask soak`: the agent's lifecycle under load, bounded in time and count. Not a
//! test: it reports what happened (a table, also written to target/soak-results.md).
//!
//! (a) two back-to-back overlapping upgrades under load: long-lived echo connections
//!     (HBONE, passthrough and inbound plaintext; bytes checked both ways) and a steady
//!     stream of new connections; connections cut, new connections refused, bytes corrupted;
//! (b) the same load through a kill -9 and a restart: the window in which new connections
//!     fail, from the kill and from the new process's start;
//! (c) 100,000 connections opened and closed: the agent's fds and RSS before and after;
//! (d) 10,000 concurrent idle tunnelled connections: RSS per connection;
//! (e) reset and half-close storms: sockets left in CLOSE_WAIT or FIN_WAIT2 afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::{in_netns, pattern};
use ztunnel_e2e::{open_fds, rss_kib, sh};

const ECHO_PORT: u16 = 9000;
/// Long-lived connections (split over the three paths).
const LONG_LIVED: usize = 200;
/// Each long-lived connection lives this long plus up to as much again, then is replaced:
/// longer than a handover, shorter than the drain deadline (25 s for the default 30 s
/// grace period), so a connection the old agent carries ends on its own.
const LIFE: Duration = Duration::from_secs(6);
/// New connections per second per churn task (6 tasks: at least 500/s in all).
const CHURN_RATE: u64 = 100;
const CHURN_TASKS: usize = 6;
const CYCLE_CONNECTIONS: u64 = 100_000;
const IDLE_CONNECTIONS: usize = 10_000;
const STORM: usize = 1_000;

/// Runs `f` on a thread inside `pod`'s namespace with its own runtime, so every socket it
/// opens is the pod's.
fn in_pod<T: Send + 'static, F>(
    pod: &Pod,
    f: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
{
    let netns = pod.netns_path();
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            ztunnel_e2e::traffic::runtime().block_on(f())
        })
    })
}

/// An echo server on `pod`'s 9000 (writes back what it reads; closes after EOF).
fn echo_server(pod: &Pod) {
    let ip = pod.ip4;
    let (tx, rx) = std::sync::mpsc::channel();
    drop(in_pod(pod, move || async move {
        serve_echo(ip, Some(tx)).await
    }));
    rx.recv_timeout(Duration::from_secs(5))
        .expect("echo server up");
}

/// The same echo server in a child process of its own (`ztunnel-soak --echo <netns> <ip>`),
/// for (d): the 10,000 server-side sockets then count against the child's descriptor limit,
/// not this process's, which holds the 10,000 client sockets. Killed on drop.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start(pod: &Pod) -> Self {
        let child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .arg("--echo")
            .arg(pod.netns_path())
            .arg(pod.ip4.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the echo process");
        let mut child = Self(child);
        let mut ready = [0u8; 1];
        use std::io::Read;
        child
            .0
            .stdout
            .as_mut()
            .expect("piped")
            .read_exact(&mut ready)
            .expect("echo process up");
        child
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Echoes on `ip`:9000 until the process ends; `ready` is told once it listens.
async fn serve_echo(ip: std::net::IpAddr, ready: Option<std::sync::mpsc::Sender<()>>) {
    let listener = tokio::net::TcpSocket::new_v4().expect("socket");
    listener.set_reuseaddr(true).expect("reuseaddr");
    listener
        .bind(SocketAddr::new(ip, ECHO_PORT))
        .expect("bind echo");
    let listener = listener.listen(4096).expect("listen");
    match ready {
        Some(tx) => tx.send(()).expect("ready"),
        None => {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = out.write_all(b"r").and_then(|()| out.flush());
        }
    }
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            // Out of descriptors, say: keep listening rather than refuse everything after.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    long_opened: AtomicU64,
    long_completed: AtomicU64,
    long_cut: AtomicU64,
    long_refused: AtomicU64,
    corrupted: AtomicU64,
    bytes_checked: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    /// Failures of new connections: when, and why (the first few).
    failures: Mutex<Vec<(Instant, String)>>,
    /// Connects slower than 500 ms (a dropped SYN retried).
    slow: AtomicU64,
}

impl Tally {
    fn failed(&self, why: String) {
        self.new_failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().expect("lock");
        f.push((Instant::now(), why));
    }

    fn cut(&self, why: &str) {
        self.long_cut.fetch_add(1, Ordering::Relaxed);
        self.failures
            .lock()
            .expect("lock")
            .push((Instant::now(), format!("long-lived: {why}")));
    }
}

/// One long-lived echo connection after another, each checked byte for byte.
async fn long_lived(dst: SocketAddr, id: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let seed = (id * 31 + round) as u8;
        let life = LIFE + Duration::from_millis((id * 997 + round * 131) % LIFE.as_millis() as u64);
        let mut s = match tokio::net::TcpStream::connect(dst).await {
            Ok(s) => s,
            Err(_) => {
                tally.long_refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tally.long_opened.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (mut out, mut back) = (vec![0u8; 8 * 1024], vec![0u8; 8 * 1024]);
        let mut offset = 0u64;
        let result: std::io::Result<()> = async {
            while started.elapsed() < life && !stop.load(Ordering::Relaxed) {
                pattern(seed, offset, &mut out);
                s.write_all(&out).await?;
                s.read_exact(&mut back).await?;
                if back != out {
                    tally.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                offset += out.len() as u64;
                tally
                    .bytes_checked
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tally.long_completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tally.cut(&e.to_string()),
        }
    }
}

/// New short connections at `rate` per second (`None`: as fast as they go) until `stop`
/// or `limit` connections; each sends 64 bytes and checks the echo.
async fn churn(
    dst: SocketAddr,
    rate: Option<u64>,
    limit: Option<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut tick = rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_micros(1_000_000 / r));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    while !stop.load(Ordering::Relaxed) {
        if let Some(left) = &limit {
            if left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
            {
                return;
            }
        }
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let started = Instant::now();
        let one = async {
            let mut s = tokio::net::TcpStream::connect(dst).await?;
            if started.elapsed() > Duration::from_millis(500) {
                tally.slow.fetch_add(1, Ordering::Relaxed);
            }
            s.write_all(&[5u8; 64]).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            if back.len() != 64 {
                return Err(std::io::Error::other(format!(
                    "echo of {} bytes",
                    back.len()
                )));
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), one).await {
            Ok(Ok(())) => {
                tally.new_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => tally.failed(e.to_string()),
            Err(_) => tally.failed("no answer within 10 s".into()),
        }
    }
}

/// The load of (a) and (b): long-lived connections and new-connection streams on the three
/// paths, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Pod, outsider: &Pod, hbone: SocketAddr, plain: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        // (source, destination, share of the long-lived connections, churn tasks)
        let paths = [
            (client, hbone, LONG_LIVED / 2, CHURN_TASKS / 3),
            (client, plain, LONG_LIVED / 4, CHURN_TASKS / 3),
            (outsider, hbone, LONG_LIVED / 4, CHURN_TASKS / 3),
        ];
        let mut id = 0u64;
        for (pod, dst, long, tasks) in paths {
            let (stop, tally) = (stop.clone(), tally.clone());
            let first = id;
            id += long as u64;
            threads.push(in_pod(pod, move || async move {
                let mut all = Vec::new();
                for i in 0..long as u64 {
                    all.push(tokio::spawn(long_lived(
                        dst,
                        first + i,
                        stop.clone(),
                        tally.clone(),
                    )));
                }
                for _ in 0..tasks {
                    all.push(tokio::spawn(churn(
                        dst,
                        Some(CHURN_RATE),
                        None,
                        stop.clone(),
                        tally.clone(),
                    )));
                }
                for t in all {
                    let _ = t.await;
                }
            }));
        }
        Self {
            stop,
            tally,
            threads,
        }
    }

    fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.tally
    }
}

/// Starts a new agent beside `old`, waits until it is ready, then drains `old`; returns the
/// new agent and how long the old one took to exit.
fn upgrade(topo: &Topology, old: &mut Agent, generation: u32) -> (Agent, Duration) {
    let netns = topo.add_bare_netns(&format!("gen-{generation}"));
    let mut new = Agent::start_beside(old, netns, &format!("agent-gen-{generation}"), None);
    new.wait_ready();
    let term = Instant::now();
    old.signal(libc::SIGTERM);
    let status = old.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "the old agent exits 0: {status}");
    (new, term.elapsed())
}

fn row(out: &mut String, figure: &str, value: String, goal: &str) {
    out.push_str(&format!("| {figure} | {value} | {goal} |\n"));
}

fn raise_own_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Sockets in CLOSE_WAIT or FIN_WAIT2 in the namespace of `pod`.
fn lingering(pod: &Pod) -> usize {
    sh("ip", &["netns", "exec", &pod.netns, "ss", "-tanH"])
        .lines()
        .filter(|l| l.starts_with("CLOSE-WAIT") || l.starts_with("FIN-WAIT-2"))
        .count()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--echo") {
        raise_own_fd_limit();
        let (netns, ip) = (PathBuf::from(&args[2]), args[3].parse().expect("ip"));
        in_netns(&netns, move || {
            ztunnel_e2e::traffic::runtime().block_on(serve_echo(ip, None))
        });
        return;
    }
    assert!(
        ztunnel_e2e::require_root(),
        "the soak needs root (network namespaces, eBPF)"
    );
    raise_own_fd_limit();
    let mut topo = Topology::new("soak");
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let plain = topo.add_pod("plain", 12);
    let outsider = topo.add_pod("outsider", 13);
    // A second node for (d): each agent then holds one end of every tunnel (10,000 tunnels
    // with both ends in one agent need more descriptors than a 20,000 limit allows).
    let mut topo2 = Topology::with_subnet("soak-n2", 2);
    Topology::link(&topo, &topo2);
    let far = topo2.add_pod("far", 11);
    for pod in [&server, &plain] {
        echo_server(pod);
    }
    let _far_echo = EchoProcess::start(&far);
    let yaml = mesh::yaml(
        &[
            Workload::hbone(&client, "client", "node-1"),
            Workload::hbone(&server, "server", "node-1"),
            Workload::hbone(&far, "far", "node-2"),
        ],
        &[],
    );
    let (mut agent, _) = Agent::start_local(
        &topo,
        "node-1",
        &yaml,
        // As deploy/ runs it: production logging, a 30 s grace period (a 25 s drain deadline).
        &["--log", "info", "--termination-grace-period-seconds", "30"],
    );
    let hbone = SocketAddr::new(server.ip4, ECHO_PORT);
    let passthrough = SocketAddr::new(plain.ip4, ECHO_PORT);
    let far_echo = SocketAddr::new(far.ip4, ECHO_PORT);
    let config = std::env::temp_dir().join("zt-soak-cfg/mesh.yaml");
    let ca = std::env::temp_dir().join("zt-soak/ca");
    let (config, ca) = (config.display().to_string(), ca.display().to_string());
    let mut node2 = Agent::start(
        &topo2,
        &[
            "--log",
            "info",
            "--node-name",
            "node-2",
            "--local-xds-path",
            &config,
            "--ca-dir",
            &ca,
        ],
    );
    node2.wait_ready();
    let pid2 = node2.pid().expect("node-2 agent");
    let mut out = String::from("| figure | value | goal |\n|---|---|---|\n");

    // (a) two overlapping upgrades under load.
    eprintln!("(a) two overlapping upgrades under load...");
    let load = Load::start(&client, &outsider, hbone, passthrough);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (mut gen1, drained1) = upgrade(&topo, &mut agent, 1);
    let (gen2, drained2) = upgrade(&topo, &mut gen1, 2);
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.stop();
    let seconds = started.elapsed().as_secs_f64();
    let t = &tally;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    row(
        &mut out,
        "(a) long-lived connections opened / completed",
        format!("{} / {}", get(&t.long_opened), get(&t.long_completed)),
        "-",
    );
    row(
        &mut out,
        "(a) long-lived connections cut",
        get(&t.long_cut).to_string(),
        "0",
    );
    row(
        &mut out,
        "(a) long-lived connections refused",
        get(&t.long_refused).to_string(),
        "0",
    );
    row(
        &mut out,
        "(a) bytes echoed and checked / corrupted chunks",
        format!(
            "{} MiB / {}",
            get(&t.bytes_checked) >> 20,
            get(&t.corrupted)
        ),
        "0 corrupted",
    );
    let new_total = get(&t.new_ok) + get(&t.new_failed);
    row(
        &mut out,
        "(a) new connections: total (per second) / refused or failed",
        format!(
            "{new_total} ({:.0}/s) / {}",
            new_total as f64 / seconds,
            get(&t.new_failed)
        ),
        ">= 500/s, 0 failed",
    );
    row(
        &mut out,
        "(a) old agents' drain (SIGTERM to exit), gen 0 / gen 1",
        format!("{drained1:.1?} / {drained2:.1?}"),
        "< 25 s deadline",
    );
    let failures_a: Vec<String> = t
        .failures
        .lock()
        .expect("lock")
        .iter()
        .take(5)
        .map(|(_, w)| w.clone())
        .collect();

    // (b) kill -9 and restart under load.
    eprintln!("(b) kill -9 and restart under load...");
    let mut killed = gen2;
    let load = Load::start(&client, &outsider, hbone, passthrough);
    std::thread::sleep(Duration::from_secs(2));
    let kill = Instant::now();
    killed.signal(libc::SIGKILL);
    let _ = killed.wait_exit(Duration::from_secs(5));
    let start = Instant::now();
    let netns = topo.add_bare_netns("gen-3");
    let mut restarted = Agent::start_beside(&killed, netns, "agent-gen-3", None);
    restarted.wait_ready();
    let ready = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.stop();
    let failures = tally.failures.lock().expect("lock").clone();
    let new_failures: Vec<&(Instant, String)> = failures
        .iter()
        .filter(|(_, w)| !w.starts_with("long-lived"))
        .collect();
    let last = new_failures.iter().map(|(at, _)| *at).max();
    let window_from_kill = last.map(|l| l.saturating_duration_since(kill));
    let window_from_start = last.map(|l| l.saturating_duration_since(start));
    row(
        &mut out,
        "(b) new connections failed around the kill",
        format!(
            "{} of {}",
            new_failures.len(),
            get(&tally.new_ok) + get(&tally.new_failed)
        ),
        "-",
    );
    row(
        &mut out,
        "(b) failure window from the kill / from the new process's start",
        format!(
            "{} / {}",
            window_from_kill.map_or("none".into(), |d| format!("{} ms", d.as_millis())),
            window_from_start.map_or("none".into(), |d| format!("{} ms", d.as_millis()))
        ),
        "< 1000 ms from the start",
    );
    row(
        &mut out,
        "(b) new agent ready after its start",
        format!("{} ms", ready.as_millis()),
        "-",
    );
    row(
        &mut out,
        "(b) connects slower than 500 ms (inbound SYNs dropped while no agent listened)",
        get(&tally.slow).to_string(),
        "-",
    );
    row(
        &mut out,
        "(b) long-lived connections cut by the kill",
        get(&tally.long_cut).to_string(),
        "(expected: a dead proxy's connections cannot survive)",
    );

    // (c) 100,000 connections opened and closed.
    eprintln!("(c) {CYCLE_CONNECTIONS} connections opened and closed...");
    let pid = restarted.pid().expect("running");
    std::thread::sleep(Duration::from_secs(1));
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let left = Arc::new(AtomicU64::new(CYCLE_CONNECTIONS));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let cycle_start = Instant::now();
    let threads: Vec<_> = [hbone, passthrough]
        .into_iter()
        .map(|dst| {
            let (left, stop, tally) = (left.clone(), stop.clone(), tally.clone());
            in_pod(&client, move || async move {
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        tokio::spawn(churn(
                            dst,
                            None,
                            Some(left.clone()),
                            stop.clone(),
                            tally.clone(),
                        ))
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let cycle_time = cycle_start.elapsed();
    // Let closed connections finish their access-log lines and pooled ones settle.
    std::thread::sleep(Duration::from_secs(2));
    let (fds_after, rss_after) = (open_fds(pid), rss_kib(pid));
    row(
        &mut out,
        "(c) connections (HBONE and passthrough) / failed",
        format!(
            "{} in {:.1?} / {}",
            get(&tally.new_ok) + get(&tally.new_failed),
            cycle_time,
            get(&tally.new_failed)
        ),
        "0 failed",
    );
    row(
        &mut out,
        "(c) agent fds before / after",
        format!("{fds_before} / {fds_after}"),
        "0 leaked",
    );
    row(
        &mut out,
        "(c) agent RSS before / after",
        format!("{rss_before} KiB / {rss_after} KiB"),
        "-",
    );

    // (d) 10,000 idle tunnelled connections.
    eprintln!("(d) {IDLE_CONNECTIONS} idle HBONE connections...");
    // Both agents: the client's (node 1) and the server's (node 2).
    let rss = || rss_kib(pid) + rss_kib(pid2);
    let rss_idle_before = rss();
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    // Opened in batches of 100; the agent's RSS is read after the first 1,000 too, to see
    // whether the cost per connection holds as the count grows.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = in_pod(&client, move || async move {
        let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
        let mut errors: Vec<String> = Vec::new();
        let mut go = Some(go_rx);
        for batch in 0..IDLE_CONNECTIONS / 100 {
            if batch == 10 {
                first_tx.send(conns.len()).expect("first thousand");
                if let Some(go) = go.take() {
                    let _ = go.await;
                }
            }
            let opening: Vec<_> = (0..100)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut s = tokio::net::TcpStream::connect(far_echo).await?;
                        s.write_all(&[1]).await?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b).await?;
                        Ok::<_, std::io::Error>(s)
                    })
                })
                .collect();
            for t in opening {
                match t.await {
                    Ok(Ok(s)) => conns.push(s),
                    Ok(Err(e)) => errors.push(e.to_string()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        opened_tx.send((conns.len(), errors)).expect("opened");
        let _ = hold_rx.await;
        drop(conns);
    });
    let first = first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("first thousand opened");
    std::thread::sleep(Duration::from_secs(3));
    let rss_first = rss();
    let _ = go_tx.send(());
    let (held, errors) = opened_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("idle connections opened");
    let failed = errors.len();
    std::thread::sleep(Duration::from_secs(3));
    let rss_idle = rss();
    let fds_idle = (open_fds(pid), open_fds(pid2));
    // The tunnels share pooled HTTP/2 connections (100 streams each).
    let pooled = sh(
        "ip",
        &[
            "netns",
            "exec",
            &client.netns,
            "ss",
            "-tanH",
            "state",
            "established",
            "dport",
            "15008",
        ],
    )
    .lines()
    .count();
    let _ = hold_tx.send(());
    let _ = holder.join();
    row(
        &mut out,
        "(d) idle HBONE connections held / failed",
        format!(
            "{held} / {failed}, over {pooled} pooled HBONE connections; agents' fds {} / {}",
            fds_idle.0, fds_idle.1
        ),
        "-",
    );
    if !errors.is_empty() {
        let mut kinds: Vec<&String> = errors.iter().collect();
        kinds.dedup();
        row(
            &mut out,
            "(d) why connections failed to open (first 3)",
            format!("{:?}", &kinds[..kinds.len().min(3)]),
            "-",
        );
    }
    row(
        &mut out,
        "(d) RSS per idle tunnelled connection (both agents), first 1,000",
        format!(
            "{:.1} KiB ({rss_idle_before} -> {rss_first} KiB)",
            rss_first.saturating_sub(rss_idle_before) as f64 / first.max(1) as f64
        ),
        "reported",
    );
    row(
        &mut out,
        "(d) RSS per idle tunnelled connection (both agents), all",
        format!(
            "{:.1} KiB ({rss_idle_before} -> {rss_idle} KiB)",
            rss_idle.saturating_sub(rss_idle_before) as f64 / held.max(1) as f64
        ),
        "reported",
    );

    // (e) reset and half-close storms.
    eprintln!("(e) reset and half-close storms...");
    std::thread::sleep(Duration::from_secs(2));
    let storm = in_pod(&client, move || async move {
        let mut tasks = Vec::new();
        for i in 0..STORM {
            let dst = if i % 2 == 0 { hbone } else { passthrough };
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(dst).await?;
                s.write_all(&[9u8; 32 * 1024]).await?;
                if i % 4 < 2 {
                    // Reset mid-transfer.
                    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                    drop(s);
                } else {
                    // Half-close and read what is left.
                    s.shutdown().await?;
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await?;
                }
                Ok::<(), std::io::Error>(())
            }));
        }
        let mut failed = 0;
        for t in tasks {
            if !matches!(t.await, Ok(Ok(()))) {
                failed += 1;
            }
        }
        failed
    });
    let storm_failed = storm.join().expect("storm");
    std::thread::sleep(Duration::from_secs(3));
    let left: usize = [&client, &server, &plain]
        .iter()
        .map(|p| lingering(p))
        .sum();
    row(
        &mut out,
        "(e) connections reset or half-closed / failed",
        format!("{STORM} / {storm_failed}"),
        "-",
    );
    row(
        &mut out,
        "(e) sockets left in CLOSE_WAIT or FIN_WAIT2 (client, server, plain pods)",
        left.to_string(),
        "0",
    );

    if !failures_a.is_empty() {
        out.push_str(&format!("\nFirst failures in (a): {failures_a:?}\n"));
    }
    out.push_str(&format!(
        "\nAgent binary: {}. Load: {LONG_LIVED} long-lived echo connections (HBONE, passthrough, inbound plaintext; each lives {LIFE:?}-{:?}, checked byte for byte), {CHURN_TASKS} streams of {CHURN_RATE} new connections/s.\n",
        ztunnel_e2e::agent::agent_binary().display(),
        LIFE * 2
    ));
    print!("{out}");
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/soak-results.md");
    if std::fs::write(&file, &out).is_ok() {
        println!("written to {}", file.display());
    }
    // Every agent's log, for whoever reads a failure above.
    for (name, a) in [
        ("gen-0", &agent),
        ("gen-1", &gen1),
        ("gen-2", &killed),
        ("gen-3", &restarted),
        ("node-2", &node2),
    ] {
        let log = file.with_file_name(format!("soak-agent-{name}.log"));
        let _ = std::fs::write(&log, a.log());
    }
    println!("agents' logs: target/soak-agent-*.log");
    drop(node2);
    drop(restarted);
    drop(killed);
    drop(gen1);
    drop(agent);
}
