//! `cargo xtask bench`: direct TCP, agent TCP passthrough and agent HBONE measured in one run
//! on the same two-node network-namespace path, each figure with its ratio to direct TCP.
//! Not a test: figures vary with the machine; ratios in one run are what compare.
//!
//! For profiling, `ZTUNNEL_BENCH_PROFILE` runs one thing alone and exits: `bulk` or
//! `connections` (HBONE, four times, for `perf record -p` on the printed pids), or `memory`
//! (1,000 idle HBONE connections on fresh agents, which are killed while the connections are
//! held). For a heap profiler, point `ZTUNNEL_AGENT_BIN` at a wrapper that `exec`s the agent
//! (so the pid and the kill reach it) and records as it goes, as heaptrack's preload library
//! does (`LD_PRELOAD=.../libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=file`, on an agent
//! built with `--no-default-features`, i.e. glibc's malloc); a profiler that reports only at
//! exit loses its report to the kill.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::rss_kib;
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::in_netns;

const ECHO_PORT: u16 = 9000;
const SINK_PORT: u16 = 9001;
const RUN: Duration = Duration::from_secs(3);
/// Rounds per figure (the median is reported).
const ROUNDS: usize = 3;
const CONCURRENCY: usize = 16;
const IDLE_CONNECTIONS: usize = 1000;
/// How long after a burst of connections closed the agents' RSS is read again.
const SETTLE: Duration = Duration::from_secs(8);

/// Echo on 9000, count-and-discard on 9001, inside the pod (one thread, one runtime).
fn start_servers(pod: &Pod) {
    let netns = pod.netns_path();
    let ip = pod.ip4;
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            ztunnel_e2e::traffic::runtime().block_on(async move {
                let echo = tokio::net::TcpListener::bind((ip, ECHO_PORT))
                    .await
                    .expect("echo");
                let sink = tokio::net::TcpListener::bind((ip, SINK_PORT))
                    .await
                    .expect("sink");
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = sink.accept().await {
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 256 * 1024];
                            let mut total = 0u64;
                            while let Ok(n) = s.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                total += n as u64;
                            }
                            let _ = s.write_all(&total.to_be_bytes()).await;
                        });
                    }
                });
                while let Ok((mut s, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        })
    });
}

/// Single-stream bulk throughput in MB/s (bytes the server counted / time until it answered).
fn bulk(client: &Pod, dst: SocketAddr) -> f64 {
    in_netns(&client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(dst).expect("connect");
        let buf = vec![7u8; 256 * 1024];
        let start = Instant::now();
        while start.elapsed() < RUN {
            s.write_all(&buf).expect("write");
        }
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut count = [0u8; 8];
        s.read_exact(&mut count).expect("count");
        u64::from_be_bytes(count) as f64 / start.elapsed().as_secs_f64() / 1e6
    })
}

/// Runs `CONCURRENCY` client tasks inside the pod for `RUN`; each returns how many operations
/// it completed. Returns operations per second.
fn per_second<F, Fut>(client: &Pod, task: F) -> f64
where
    F: Fn(Instant) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = u64> + 'static,
{
    in_netns(&client.netns_path(), move || {
        ztunnel_e2e::traffic::runtime().block_on(async move {
            let start = Instant::now();
            let local = tokio::task::LocalSet::new();
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|_| local.spawn_local(task(start)))
                .collect();
            local
                .run_until(async {
                    let mut total = 0;
                    for t in tasks {
                        total += t.await.unwrap_or(0);
                    }
                    total as f64 / start.elapsed().as_secs_f64()
                })
                .await
        })
    })
}

/// New connections per second: 16 clients, each connect, 1-byte echo, close.
fn connections(client: &Pod, dst: SocketAddr) -> f64 {
    per_second(client, move |start| async move {
        let mut done = 0u64;
        while start.elapsed() < RUN {
            let Ok(mut s) = tokio::net::TcpStream::connect(dst).await else {
                continue;
            };
            let mut b = [1u8; 1];
            if s.write_all(&b).await.is_ok() && s.read_exact(&mut b).await.is_ok() {
                done += 1;
            }
        }
        done
    })
}

/// 1 KiB request/response rate over 16 persistent connections.
fn request_rate(client: &Pod, dst: SocketAddr) -> f64 {
    per_second(client, move |start| async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(dst).await else {
            return 0;
        };
        let _ = s.set_nodelay(true);
        let mut buf = [3u8; 1024];
        let mut done = 0u64;
        while start.elapsed() < RUN {
            if s.write_all(&buf).await.is_err() || s.read_exact(&mut buf).await.is_err() {
                break;
            }
            done += 1;
        }
        done
    })
}

/// p50 and p99 of a 1 KiB round trip on one connection, in microseconds.
fn latency(client: &Pod, dst: SocketAddr) -> (f64, f64) {
    in_netns(&client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(dst).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [5u8; 1024];
        let mut samples = Vec::with_capacity(5000);
        for _ in 0..5000 {
            let t = Instant::now();
            s.write_all(&buf).expect("write");
            s.read_exact(&mut buf).expect("read");
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(f64::total_cmp);
        (
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100],
        )
    })
}

/// Fixed offered load for the tail-latency figure: well below every path's saturation (the
/// HBONE request rate above is about ten times this here).
const FIXED_RATE: f64 = 2000.0;
const FIXED_RATE_RUN: Duration = Duration::from_secs(4);

/// 1 KiB round trips at [`FIXED_RATE`] requests per second in all, spread over `CONCURRENCY`
/// persistent connections with staggered schedules (open loop across connections: one
/// connection's slow reply does not hold back the others). Returns each round trip in
/// microseconds, timed from the write: the runtime's timer wakes up to a millisecond late,
/// which is not the path's. A connection has one request outstanding, so a stall longer than
/// its interval (8 ms) delays its next requests uncounted: the tail is a lower bound.
fn fixed_rate(client: &Pod, dst: SocketAddr) -> Vec<f64> {
    in_netns(&client.netns_path(), move || {
        ztunnel_e2e::traffic::runtime().block_on(async move {
            let interval = Duration::from_secs_f64(CONCURRENCY as f64 / FIXED_RATE);
            let start = tokio::time::Instant::now() + Duration::from_millis(50);
            let local = tokio::task::LocalSet::new();
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|i| {
                    local.spawn_local(async move {
                        let mut samples = Vec::new();
                        let Ok(mut s) = tokio::net::TcpStream::connect(dst).await else {
                            return samples;
                        };
                        let _ = s.set_nodelay(true);
                        let mut buf = [9u8; 1024];
                        let mut slot = start + interval.mul_f64(i as f64 / CONCURRENCY as f64);
                        while slot < start + FIXED_RATE_RUN {
                            tokio::time::sleep_until(slot).await;
                            let t = Instant::now();
                            if s.write_all(&buf).await.is_err()
                                || s.read_exact(&mut buf).await.is_err()
                            {
                                break;
                            }
                            samples.push(t.elapsed().as_secs_f64() * 1e6);
                            slot += interval;
                        }
                        samples
                    })
                })
                .collect();
            local
                .run_until(async {
                    let mut all = Vec::new();
                    for t in tasks {
                        all.extend(t.await.unwrap_or_default());
                    }
                    all
                })
                .await
        })
    })
}

/// The sample at quantile `q` of sorted, non-empty `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// CPU time in seconds since boot: the machine's (all CPUs) and the agents'.
#[derive(Clone, Copy, Default, Debug)]
struct Cpu {
    /// user + nice + system + irq + softirq, all CPUs.
    busy: f64,
    /// The agents' user time.
    agents_user: f64,
    /// The agents' kernel time.
    agents_kernel: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            busy: self.busy - o.busy,
            agents_user: self.agents_user - o.agents_user,
            agents_kernel: self.agents_kernel - o.agents_kernel,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, o: Cpu) {
        self.busy += o.busy;
        self.agents_user += o.agents_user;
        self.agents_kernel += o.agents_kernel;
    }
}

fn cpu_now(pids: &[u32]) -> Cpu {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = (field(0) + field(1) + field(2) + field(5) + field(6)) / hz;
    let (mut agents_user, mut agents_kernel) = (0.0, 0.0);
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            rest.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        agents_user += ticks(11) / hz;
        agents_kernel += ticks(12) / hz;
    }
    Cpu {
        busy,
        agents_user,
        agents_kernel,
    }
}

/// CPU seconds AES-128-GCM (ring, as the agents use it) spends per GB moved through HBONE:
/// each byte is sealed once (client node) and opened once (server node), in 16 KiB records.
/// The fastest of five short runs (noise only ever adds time).
fn aes_gcm_seconds_per_gb() -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    const RECORD: usize = 16 * 1024;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("AES key"));
    let mut record = Vec::with_capacity(RECORD + AES_128_GCM.tag_len());
    let mut best = f64::MAX;
    for _ in 0..5 {
        let (start, mut records) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_millis(300) {
            record.clear();
            record.resize(RECORD, 5);
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&records.to_be_bytes());
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut record,
            )
            .expect("seal");
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut record,
                )
                .expect("open");
            assert_eq!(plain.len(), RECORD);
            records += 1;
        }
        let per_gb = start.elapsed().as_secs_f64() / (records as f64 * RECORD as f64 / 1e9);
        best = best.min(per_gb);
    }
    best
}

/// Before the idle connections are measured: one connection from `client` to `echo` first
/// (certificates, the pooled tunnel: a one-time cost, not the idle connections'), then the
/// agents given time to return start-up's garbage.
fn warm_up_and_settle(client: &Pod, echo: SocketAddr) {
    in_netns(&client.netns_path(), move || {
        let _ = std::net::TcpStream::connect(echo);
    });
    std::thread::sleep(SETTLE);
}

/// KiB of RSS per idle connection: the growth from `before` to `after` (KiB) over
/// [`IDLE_CONNECTIONS`].
fn kib_per_connection(before: u64, after: u64) -> f64 {
    after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64
}

/// The agents' RSS together, in KiB.
fn agents_rss(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// Opens 1000 idle HBONE connections and returns the agents' RSS before and with them, in
/// KiB; `while_held` runs while they are open.
fn idle_rss(
    client: &Pod,
    dst: SocketAddr,
    agents: &[&Agent],
    while_held: impl FnOnce(),
) -> (u64, u64) {
    let pids: Vec<u32> = agents.iter().filter_map(|a| a.pid()).collect();
    let before = agents_rss(&pids);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let netns = client.netns_path();
    let holder = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
            for _ in 0..IDLE_CONNECTIONS {
                let mut s = std::net::TcpStream::connect(dst).expect("connect");
                let mut b = [1u8; 1];
                s.write_all(&b).expect("write");
                s.read_exact(&mut b).expect("read");
                conns.push(s);
            }
            opened_tx.send(()).expect("opened");
            let _ = rx.recv();
            drop(conns);
        })
    });
    opened_rx.recv().expect("connections opened");
    std::thread::sleep(Duration::from_millis(500));
    let after = agents_rss(&pids);
    while_held();
    let _ = tx.send(());
    let _ = holder.join();
    (before, after)
}

fn raise_fd_limit() {
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

/// CPU per GB of the bulk figure, per path, and what it implies for HBONE: the most any proxy
/// that encrypts in userspace could reach here if its own userspace work were AES alone (the
/// kernel's and the load generator's work per GB as measured on the HBONE path).
fn cpu_report(used: &[(Cpu, f64, f64); 3], direct: f64, aes: f64) -> String {
    let mut out = String::from(
        "\nCPU seconds per GB moved (bulk, all rounds; the machine has all its CPUs counted):\n\n| path | machine busy | agents' user | agents' kernel | busy CPUs |\n|---|---|---|---|---|\n",
    );
    for (name, (cpu, mb, secs)) in ["direct TCP", "passthrough", "HBONE"].iter().zip(used) {
        let gb = (mb / 1000.0).max(1e-9);
        out.push_str(&format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            cpu.busy / gb,
            cpu.agents_user / gb,
            cpu.agents_kernel / gb,
            cpu.busy / secs.max(1e-9),
        ));
    }
    let (cpu, mb, secs) = used[2];
    let gb = (mb / 1000.0).max(1e-9);
    let rest = (cpu.busy - cpu.agents_user) / gb;
    let busy_cpus = cpu.busy / secs.max(1e-9);
    let ceiling = busy_cpus / (rest + aes) * 1000.0;
    out.push_str(&format!(
        "\nAES-128-GCM (ring) seal + open: {aes:.2} CPU s per GB. HBONE ceiling if the agents' userspace did nothing but AES: {busy_cpus:.2} busy CPUs / ({rest:.2} s/GB kernel and load generator + {aes:.2} s/GB AES) = {ceiling:.0} MB/s, {:.2} of direct TCP.\n",
        ceiling / direct.max(1e-9)
    ));
    out
}

struct Row {
    name: &'static str,
    unit: &'static str,
    direct: f64,
    passthrough: f64,
    hbone: f64,
    target: Option<(&'static str, f64)>,
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the benchmark creates network namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    raise_fd_limit();
    let mut n1 = Topology::with_subnet("bn1", 1);
    let mut n2 = Topology::with_subnet("bn2", 2);
    Topology::link(&n1, &n2);
    let (dc, pc, hc) = (
        n1.add_pod("dclient", 10),
        n1.add_pod("pclient", 11),
        n1.add_pod("hclient", 12),
    );
    let (ds, ps, hs) = (
        n2.add_pod("dserver", 10),
        n2.add_pod("pserver", 11),
        n2.add_pod("hserver", 12),
    );
    // A third node whose agent has the kernel relay on (node 1 splices every passthrough
    // connection, the default): the relay measured on and off in the same run.
    let mut n3 = Topology::with_subnet("bn3", 3);
    Topology::link(&n3, &n2);
    let sc = n3.add_pod("sclient", 11);
    for s in [&ds, &ps, &hs] {
        start_servers(s);
    }
    // Rounds of the connection-rate figure open tens of thousands of connections between
    // the same addresses: without these, ports left in TIME_WAIT throttle later rounds.
    for pod in [&dc, &pc, &hc, &ds, &ps, &hs, &sc] {
        ztunnel_e2e::sh(
            "ip",
            &[
                "netns",
                "exec",
                &pod.netns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        );
    }
    let dir: PathBuf = std::env::temp_dir().join("zt-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml = mesh::yaml(
        &[
            Workload::hbone(&pc, "pclient", "node-1"),
            Workload::hbone(&hc, "hclient", "node-1"),
            // The passthrough server is outside the mesh's capture: TCP, not enrolled.
            Workload {
                protocol: "TCP",
                enrolled: false,
                ..Workload::hbone(&ps, "pserver", "node-2")
            },
            Workload::hbone(&hs, "hserver", "node-2"),
            Workload::hbone(&sc, "sclient", "node-3"),
        ],
        &[],
    );
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, yaml).expect("config");
    let (cfg, ca) = (
        config.display().to_string(),
        dir.join("ca").display().to_string(),
    );
    let mut a1 = Agent::start(
        &n1,
        &[
            // Production logging (the harness default adds the debug lines tests assert on).
            "--log",
            "info",
            "--node-name",
            "node-1",
            "--local-xds-path",
            &cfg,
            "--ca-dir",
            &ca,
        ],
    );
    let mut a2 = Agent::start(
        &n2,
        &[
            // Production logging (the harness default adds the debug lines tests assert on).
            "--log",
            "info",
            "--node-name",
            "node-2",
            "--local-xds-path",
            &cfg,
            "--ca-dir",
            &ca,
        ],
    );
    let mut a3 = Agent::start(
        &n3,
        &[
            "--log",
            "info",
            "--node-name",
            "node-3",
            "--local-xds-path",
            &cfg,
            "--ca-dir",
            &ca,
            // Off by default; measured here for what it gains.
            "--kernel-relay",
            "true",
        ],
    );
    a1.wait_ready();
    a2.wait_ready();
    a3.wait_ready();

    if let Some(what) = std::env::var_os("ZTUNNEL_BENCH_PROFILE") {
        // For `perf record -p <pids>`: one HBONE figure alone, for longer.
        println!("agent pids: {:?} {:?}", a1.pid(), a2.pid());
        std::thread::sleep(Duration::from_secs(2));
        if what == "memory" {
            // For a heap profiler around the agents (ZTUNNEL_AGENT_BIN a wrapper): the idle
            // connections alone, on fresh agents, as the memory figure below measures them.
            let echo = SocketAddr::new(hs.ip4, ECHO_PORT);
            warm_up_and_settle(&hc, echo);
            // The agents are killed while the connections are open: a heap profiler's
            // report then lists what each held connection holds as never freed.
            let (before, after) = idle_rss(&hc, echo, &[&a1, &a2], || {
                a1.signal(libc::SIGKILL);
                a2.signal(libc::SIGKILL);
            });
            println!(
                "agents' RSS {before} KiB before, {after} KiB with {IDLE_CONNECTIONS} idle HBONE connections: {:.1} KiB per connection",
                kib_per_connection(before, after)
            );
            return;
        }
        for _ in 0..4 {
            let figure = if what == "connections" {
                connections(&hc, SocketAddr::new(hs.ip4, ECHO_PORT))
            } else {
                bulk(&hc, SocketAddr::new(hs.ip4, SINK_PORT))
            };
            println!("hbone {}: {figure:.0}", what.to_string_lossy());
        }
        return;
    }
    let paths = [(&dc, &ds), (&pc, &ps), (&hc, &hs)];
    // Each figure: ROUNDS rounds, the three paths interleaved within a round, the median per
    // path (one run of direct TCP alone varies by a third on this machine).
    let pids: Vec<u32> = [a1.pid(), a2.pid()].into_iter().flatten().collect();
    // Also the CPU each path used over all its rounds, and the work done (figure x seconds).
    let measure =
        |f: &dyn Fn(&Pod, SocketAddr) -> f64, port: u16| -> ([f64; 3], [(Cpu, f64, f64); 3]) {
            let mut samples: [Vec<f64>; 3] = Default::default();
            let mut used: [(Cpu, f64, f64); 3] = Default::default();
            for _ in 0..ROUNDS {
                for (i, (c, s)) in paths.iter().enumerate() {
                    // Warm up (certificates, pooled connection), then measure.
                    let _ = std::net::TcpStream::connect(SocketAddr::new(s.ip4, port));
                    let (before, start) = (cpu_now(&pids), Instant::now());
                    let figure = f(c, SocketAddr::new(s.ip4, port));
                    let elapsed = start.elapsed().as_secs_f64();
                    used[i].0 += cpu_now(&pids) - before;
                    used[i].1 += figure * elapsed;
                    used[i].2 += elapsed;
                    samples[i].push(figure);
                }
            }
            eprintln!("  samples (direct, passthrough, HBONE): {samples:.0?}");
            let medians = samples.map(|mut v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            });
            (medians, used)
        };
    // Memory first, on fresh agents (as upstream's is measured side by side): after the
    // load figures, memory the allocator kept from them would serve the idle connections
    // and hide their cost.
    eprintln!("agent memory with {IDLE_CONNECTIONS} idle HBONE connections...");
    let echo = SocketAddr::new(hs.ip4, ECHO_PORT);
    warm_up_and_settle(&hc, echo);
    let hold = || idle_rss(&hc, echo, &[&a1, &a2], || {});
    let (before, after) = hold();
    // Memory given back once a burst is over: RSS a while after the connections closed,
    // after one burst and after three.
    let settled = || {
        std::thread::sleep(SETTLE);
        agents_rss(&pids)
    };
    let after_one = settled();
    hold();
    hold();
    let after_three = settled();
    eprintln!("bulk throughput...");
    let (bulk_r, bulk_cpu) = measure(&bulk, SINK_PORT);
    eprintln!("new connections per second...");
    let (cps_r, _) = measure(&connections, ECHO_PORT);
    eprintln!("1 KiB request/response rate...");
    let (rr_r, _) = measure(&request_rate, ECHO_PORT);
    eprintln!("AES-128-GCM cost...");
    let aes = aes_gcm_seconds_per_gb();
    eprintln!("latency...");
    let lat: Vec<(f64, f64)> = paths
        .iter()
        .map(|(c, s)| latency(c, SocketAddr::new(s.ip4, ECHO_PORT)))
        .collect();
    eprintln!("latency at a fixed rate of {FIXED_RATE} req/s...");
    let mut fixed: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (c, s)) in paths.iter().enumerate() {
            fixed[i].extend(fixed_rate(c, SocketAddr::new(s.ip4, ECHO_PORT)));
        }
    }
    for (v, path) in fixed.iter_mut().zip(["direct", "passthrough", "HBONE"]) {
        assert!(
            !v.is_empty(),
            "no fixed-rate round trip completed on the {path} path"
        );
        v.sort_by(f64::total_cmp);
    }
    eprintln!(
        "  samples (direct, passthrough, HBONE): {:?}",
        fixed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    eprintln!("passthrough with the kernel relay on and off...");
    let relay_paths = [&sc, &pc];
    let mut relay_rr: [Vec<f64>; 2] = Default::default();
    let mut relay_fixed: [Vec<f64>; 2] = Default::default();
    for _ in 0..ROUNDS {
        for (i, c) in relay_paths.iter().enumerate() {
            relay_rr[i].push(request_rate(c, SocketAddr::new(ps.ip4, ECHO_PORT)));
            relay_fixed[i].extend(fixed_rate(c, SocketAddr::new(ps.ip4, ECHO_PORT)));
        }
    }
    let relay_lat = relay_paths.map(|c| latency(c, SocketAddr::new(ps.ip4, ECHO_PORT)));
    for v in relay_rr.iter_mut().chain(relay_fixed.iter_mut()) {
        assert!(!v.is_empty(), "no sample on a kernel relay path");
        v.sort_by(f64::total_cmp);
    }
    let relay_rows = [
        (
            "1 KiB req/resp, 16 conns (req/s)",
            relay_rr.each_ref().map(|v| v[v.len() / 2]),
        ),
        ("latency p50, 1 KiB (us)", relay_lat.map(|l| l.0)),
        ("latency p99, 1 KiB (us)", relay_lat.map(|l| l.1)),
        (
            "fixed-rate p50, 1 KiB (us)",
            relay_fixed.each_ref().map(|v| quantile(v, 0.5)),
        ),
        (
            "fixed-rate p99, 1 KiB (us)",
            relay_fixed.each_ref().map(|v| quantile(v, 0.99)),
        ),
    ];

    let mut rows = vec![
        Row {
            name: "bulk throughput, 1 stream",
            unit: "MB/s",
            direct: bulk_r[0],
            passthrough: bulk_r[1],
            hbone: bulk_r[2],
            target: Some(("hbone >= 0.36, passthrough >= 0.75", 0.36)),
        },
        Row {
            name: "new connections, 16 clients",
            unit: "conn/s",
            direct: cps_r[0],
            passthrough: cps_r[1],
            hbone: cps_r[2],
            target: Some(("hbone >= 0.25", 0.25)),
        },
        Row {
            name: "1 KiB req/resp, 16 conns",
            unit: "req/s",
            direct: rr_r[0],
            passthrough: rr_r[1],
            hbone: rr_r[2],
            target: Some(("hbone >= 0.17", 0.17)),
        },
        Row {
            name: "latency p50, 1 KiB",
            unit: "us",
            direct: lat[0].0,
            passthrough: lat[1].0,
            hbone: lat[2].0,
            target: None,
        },
        Row {
            name: "latency p99, 1 KiB",
            unit: "us",
            direct: lat[0].1,
            passthrough: lat[1].1,
            hbone: lat[2].1,
            target: None,
        },
    ];
    rows.extend(
        [
            ("fixed-rate p50, 1 KiB", 0.5),
            ("fixed-rate p99, 1 KiB", 0.99),
            ("fixed-rate p99.9, 1 KiB", 0.999),
        ]
        .map(|(name, q)| Row {
            name,
            unit: "us",
            direct: quantile(&fixed[0], q),
            passthrough: quantile(&fixed[1], q),
            hbone: quantile(&fixed[2], q),
            target: None,
        }),
    );
    let mut out = String::new();
    out.push_str("| figure | unit | direct TCP | passthrough | ratio | HBONE | ratio | target |\n|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        let (pr, hr) = (r.passthrough / r.direct, r.hbone / r.direct);
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        let verdict = match r.target {
            Some((_, min)) if r.name.starts_with("bulk") => format!(
                "passthrough >= 0.75: {}; HBONE >= {min}: {}",
                met(pr >= 0.75),
                met(hr >= min)
            ),
            Some((_, min)) => format!("HBONE >= {min}: {}", met(hr >= min)),
            None => "-".to_string(),
        };
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {} |\n",
            r.name, r.unit, r.direct, r.passthrough, pr, r.hbone, hr, verdict
        ));
    }
    out.push_str("\nPassthrough, kernel relay on (node 3, `--kernel-relay true`) and off (node 1, the default), same server, same run:\n\n| figure | relay on | relay off (splice) | on/off |\n|---|---|---|---|\n");
    for (name, [on, off]) in relay_rows {
        out.push_str(&format!(
            "| {name} | {on:.0} | {off:.0} | {:.2} |\n",
            on / off
        ));
    }
    out.push_str(&format!(
        "\nAgents' RSS (both nodes, fresh): {before} KiB before, {after} KiB with {IDLE_CONNECTIONS} idle HBONE connections: {:.1} KiB per connection.\n",
        kib_per_connection(before, after)
    ));
    out.push_str(&format!(
        "Given back after the burst: {after_one} KiB {}s after the connections closed, {after_three} KiB after three such bursts ({:+} KiB against before the first).\n",
        SETTLE.as_secs(),
        after_three as i64 - before as i64
    ));
    out.push_str(&cpu_report(&bulk_cpu, bulk_r[0], aes));
    let workers = std::env::var("ZTUNNEL_WORKER_THREADS").unwrap_or_else(|_| "2 (default)".into());
    out.push_str(&format!(
        "Throughput and rates: median of {ROUNDS} rounds, paths interleaved. Fixed rate: {FIXED_RATE} req/s over {CONCURRENCY} connections, {} s x {ROUNDS} rounds. Agents' worker threads: {workers}.\n",
        FIXED_RATE_RUN.as_secs()
    ));
    print!("{out}");
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.md");
    if std::fs::write(&file, &out).is_ok() {
        println!("written to {}", file.display());
    }
    drop(a1);
    drop(a2);
    drop(a3);
}
