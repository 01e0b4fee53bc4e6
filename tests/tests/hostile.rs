//! Hostile peers on 15008: connections that never authenticate cost the log a bounded number
//! of lines, each with its real duration, and every one is still accounted for.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ztunnel_e2e::one_hop::OneHop;
use ztunnel_e2e::traffic::in_netns;
use ztunnel_e2e::{require_root, wait_for};

/// One test of this file at a time: they flood agents and measure latency, which another
/// test's flood running beside them would skew.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent writes at most this many refusal lines a second (the agent's constant).
const LINES_PER_SECOND: usize = 10;

fn duration_ms(line: &str) -> u64 {
    line.split("duration=\"")
        .nth(1)
        .and_then(|rest| rest.split("ms\"").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line}"))
}

/// The `left_out=N` of a warning line.
fn left_out(line: &str) -> usize {
    line.split("left_out=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no left_out in {line}"))
}

#[test]
fn unauthenticated_refusals_are_rate_limited_and_timed() {
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    let mut hop = OneHop::start(true, &[]);
    let stranger = hop.topo.add_pod("stranger", 12);
    let hbone: SocketAddr = SocketAddr::new(hop.server.ip4, 15008);
    let refused = format!("dst.addr={hbone}");

    // A peer that connects and says nothing for 1.5 s: its line has the real duration.
    in_netns(&stranger.netns_path(), move || {
        let s = TcpStream::connect_timeout(&hbone, Duration::from_secs(5)).expect("connect");
        std::thread::sleep(Duration::from_millis(1500));
        drop(s);
    });
    let line = hop.agent.wait_log(&["connection complete", &refused]);
    assert!(line.contains("\terror\taccess\t"), "{line}");
    assert!(duration_ms(&line) >= 1500, "{line}");

    // A flood of peers sending garbage instead of a TLS ClientHello.
    const FLOOD: usize = 60;
    in_netns(&stranger.netns_path(), move || {
        for _ in 0..FLOOD {
            let mut s =
                TcpStream::connect_timeout(&hbone, Duration::from_secs(5)).expect("connect");
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        }
    });
    // Past the one-second window, one more: written, after the count of what was left out.
    // Under load the flood may still be in the window: then another, a second later.
    let mut total = 1 + FLOOD;
    let mut accounted = None;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1100));
        in_netns(&stranger.netns_path(), move || {
            if let Ok(mut s) = TcpStream::connect_timeout(&hbone, Duration::from_secs(5)) {
                let _ = s.write_all(b"garbage");
            }
        });
        total += 1;
        // Every refusal is either written or counted as left out (one warning per window
        // that left some out).
        let settled = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < settled {
            let written = hop
                .agent
                .lines_with(&["connection complete", &refused])
                .len();
            let warnings = hop.agent.lines_with(&["were left out", "left_out="]);
            let left: usize = warnings.iter().map(|w| left_out(w)).sum();
            if written + left == total {
                accounted = Some((written, warnings));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if accounted.is_some() {
            break;
        }
    }
    let (written, warnings) = accounted.unwrap_or_else(|| {
        panic!(
            "not every one of {total} refusals was written or counted: {}",
            hop.agent.log()
        )
    });
    assert!(!warnings.is_empty());
    // The flood spans at most a few windows; far fewer lines than refusals.
    assert!(
        written <= total - FLOOD + 3 * LINES_PER_SECOND,
        "{written} lines for {total} refusals: {warnings:?}"
    );
    // The server's own traffic is unaffected.
    let got = ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), hop.dst(), "still")
        .expect("exchange");
    assert_eq!(got.response, "hello still");
}

/// Opens `n` connections to `dst` from inside `pod` that say nothing, held until the
/// returned sender is dropped; returns once all are connected.
fn stall(
    pod: &ztunnel_e2e::topology::Pod,
    dst: SocketAddr,
    n: usize,
) -> std::sync::mpsc::Sender<()> {
    let (hold, released) = std::sync::mpsc::channel::<()>();
    let (ready, connected) = std::sync::mpsc::channel();
    let netns = pod.netns_path();
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            // A connection the agent refuses may be reset before connect() returns: the
            // agent's log says what happened to each.
            let held: Vec<TcpStream> = (0..n)
                .filter_map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(5)).ok())
                .collect();
            let _ = ready.send(());
            let _ = released.recv();
            drop(held);
        })
    });
    connected
        .recv_timeout(Duration::from_secs(10))
        .expect("stalled connections open");
    hold
}

#[test]
fn limits_refuse_new_work_by_name_and_spare_everyone_else() {
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    let mut hop = OneHop::start(
        true,
        &[
            "--max-handshakes-per-peer",
            "2",
            // 2 stalled + the client's tunnel + its stream leave one to spare.
            "--max-connections-per-pod",
            "5",
            // The stalled handshakes must outlast the test.
            "--hbone-handshake-timeout",
            "120s",
        ],
    );
    let stranger = hop.topo.add_pod("stranger", 12);
    let other = hop.topo.add_pod("other", 13);
    let hbone = SocketAddr::new(hop.server.ip4, 15008);

    // A peer stalling two handshakes may not start a third; the refusal names the limit.
    let stalled = stall(&stranger, hbone, 2);
    let third = stall(&stranger, hbone, 1);
    let line = hop
        .agent
        .wait_log(&["connection complete", "limit handshakes_per_peer"]);
    assert!(
        line.contains("pod default/server") && line.contains("ZTUNNEL_MAX_HANDSHAKES_PER_PEER"),
        "{line}"
    );
    drop(third);
    // Another peer (the client pod over HBONE) is not affected.
    let got = ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), hop.dst(), "ok")
        .expect("exchange during the stall");
    assert_eq!(got.response, "hello ok");

    // The server pod holds the 2 stalled connections and the client's pooled HBONE one (if
    // its pool kept it): more connections fit until the fifth, then the next is over its
    // connection limit. They come from two peers in turn, since each peer may stall only 2.
    let another = hop.topo.add_pod("another", 14);
    let mut more = Vec::new();
    let mut refused_line = None;
    for i in 0..4 {
        more.push(stall(if i % 2 == 0 { &other } else { &another }, hbone, 1));
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while refused_line.is_none() && std::time::Instant::now() < until {
            refused_line = hop
                .agent
                .lines_with(&["connection complete", "limit connections_per_pod"])
                .into_iter()
                .next();
            std::thread::sleep(Duration::from_millis(50));
        }
        if refused_line.is_some() {
            break;
        }
    }
    let line =
        refused_line.unwrap_or_else(|| panic!("no connection-limit refusal: {}", hop.agent.log()));
    assert!(line.contains("5 inbound connections"), "{line}");
    drop(more);

    let metrics = hop.agent.scrape_metrics();
    for limit in ["connections_per_pod", "handshakes_per_peer"] {
        assert!(
            ztunnel_e2e::metric_sum(
                &metrics,
                "ztunnel_limit_refusals_total",
                &[&format!("limit=\"{limit}\"")]
            ) >= 1,
            "{limit}: {metrics}"
        );
    }
    // Once the stalls end, the pod takes connections again.
    drop(stalled);
    let got = wait_for(
        "a connection after the stalls",
        Duration::from_secs(10),
        || ztunnel_e2e::traffic::exchange(&other.netns_path(), hop.dst(), "again").ok(),
    );
    assert_eq!(got.response, "hello again");
}

/// A listener in `netns` on `addr` with a backlog of one that never accepts: connections to
/// it past the first wait in SYN_SENT (the application has stopped accepting).
fn stuck_listener(netns: &std::path::Path, addr: SocketAddr) -> socket2::Socket {
    in_netns(netns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&addr.into()).expect("bind");
        s.listen(0).expect("listen");
        s
    })
}

#[test]
fn hbone_peer_breaking_stream_limits_is_refused_and_spares_the_rest() {
    use ztunnel_e2e::raw_h2::{Outcome, RawHbone, REFUSED_STREAM};
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    const PER_PEER: usize = 30;
    const PER_CONNECTION: usize = 40;
    const PENDING: usize = 4;
    let mut hop = OneHop::start(
        true,
        &[
            "--hbone-max-streams-per-peer",
            &PER_PEER.to_string(),
            "--hbone-max-streams-per-connection",
            &PER_CONNECTION.to_string(),
            "--hbone-max-pending-connects-per-peer",
            &PENDING.to_string(),
        ],
    );
    let stranger = hop.topo.add_pod("stranger", 12);
    let other = hop.topo.add_pod("other", 13);
    let hbone = SocketAddr::new(hop.server.ip4, 15008);
    let ca_dir = hop.agent.dir().join("ca");
    let app = hop.dst().to_string();
    let _stuck = stuck_listener(
        &hop.server.netns_path(),
        SocketAddr::new(hop.server.ip4, 9999),
    );
    let server_id = "spiffe://cluster.local/ns/default/sa/server";

    // One connection: an oversized header block, then a flood of CONNECTs far past both the
    // per-connection (40) and the per-peer (30) stream limits, all left open; then a second
    // connection of the same peer, whose first CONNECT is over the per-peer limit.
    let ca = ca_dir.clone();
    let (flooding, (big, flood, goaway, across)) = in_netns(&stranger.netns_path(), move || {
        let rt = ztunnel_e2e::traffic::runtime();
        let (raw, outcomes) = rt.block_on(async move {
            let id = "spiffe://cluster.local/ns/default/sa/stranger";
            let mut raw = RawHbone::connect(&ca, id, hbone, server_id)
                .await
                .expect("mTLS to 15008");
            let big_value = "x".repeat(20_000);
            let big = raw
                .open(&app, &[("x-big", &big_value)])
                .await
                .expect("open");
            let big = raw
                .outcomes(&[big], Duration::from_secs(5))
                .await
                .expect("read")[&big];
            let mut ids = Vec::new();
            for _ in 0..150 {
                ids.push(raw.open(&app, &[]).await.expect("open"));
            }
            let got = raw
                .outcomes(&ids, Duration::from_secs(10))
                .await
                .expect("read");
            let flood: Vec<Option<Outcome>> = ids.iter().map(|id| got.get(id).copied()).collect();
            let goaway = raw.goaway;
            let mut second = RawHbone::connect(&ca, id, hbone, server_id)
                .await
                .expect("a second connection");
            let one = second.open(&app, &[]).await.expect("open");
            let across = second
                .outcomes(&[one], Duration::from_secs(5))
                .await
                .expect("read")
                .get(&one)
                .copied();
            ((raw, second), (big, flood, goaway, across))
        });
        // The connection (and its runtime) stays open, streams and all, until dropped.
        ((rt, raw), outcomes)
    });
    assert!(
        matches!(big, Outcome::Refused | Outcome::Reset(_)),
        "a 20 KB header block: {big:?}"
    );
    assert_eq!(goaway, None, "the connection itself is kept");
    assert!(
        flood.iter().all(Option::is_some),
        "every stream is answered: {flood:?}"
    );
    let count = |want: fn(&Outcome) -> bool| flood.iter().flatten().filter(|o| want(o)).count();
    let open = count(|o| *o == Outcome::Open);
    let refused = count(|o| *o == Outcome::Refused);
    let reset = count(|o| *o == Outcome::Reset(REFUSED_STREAM));
    assert_eq!(open + refused + reset, 150, "{flood:?}");
    // HTTP/2 itself refuses what is past the per-connection limit at any moment.
    assert!(
        reset > 0,
        "no REFUSED_STREAM past {PER_CONNECTION} streams: {flood:?}"
    );
    // The same peer's second connection shares the per-peer limit.
    assert_eq!(across, Some(Outcome::Refused), "across connections");
    // Ours are counted and logged by name; HTTP/2's own REFUSED_STREAMs are not ours to log.
    let line = hop
        .agent
        .wait_log(&["connection complete", "limit streams_per_peer"]);
    assert!(
        line.contains("ZTUNNEL_HBONE_MAX_STREAMS_PER_PEER")
            && line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/stranger\""),
        "{line}"
    );
    // (A connect that took over 100 ms under load may have met the pending limit instead,
    // freeing its stream slot after the flood had been answered.)
    let metrics = hop.agent.scrape_metrics();
    let refusals = |limit: &str| {
        ztunnel_e2e::metric_sum(
            &metrics,
            "ztunnel_limit_refusals_total",
            &[&format!("limit=\"{limit}\"")],
        )
    };
    let (per_peer, pending) = (
        refusals("streams_per_peer"),
        refusals("pending_connects_per_peer"),
    );
    assert_eq!(per_peer + pending, refused as u64 + 1, "{metrics}");
    assert!(
        open <= PER_PEER && open as u64 + pending >= PER_PEER as u64,
        "{open} open: {flood:?}"
    );

    // Another pod's traffic to the same pod is untouched while the 30 streams stay open.
    let got = ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), hop.dst(), "during")
        .expect("exchange during the flood");
    assert_eq!(got.response, "hello during");

    // An application that stopped accepting: a peer's CONNECTs to it wait, up to the
    // pending limit; past it they are refused at once, by name (in a new second of the
    // log's refusal budget, which the flood used up).
    std::thread::sleep(Duration::from_millis(1100));
    let stuck = SocketAddr::new(hop.server.ip4, 9999).to_string();
    let ca = ca_dir.clone();
    let (waiting, pending) = in_netns(&other.netns_path(), move || {
        let rt = ztunnel_e2e::traffic::runtime();
        let (raw, pending) = rt.block_on(async move {
            let id = "spiffe://cluster.local/ns/default/sa/other";
            let mut raw = RawHbone::connect(&ca, id, hbone, server_id)
                .await
                .expect("mTLS to 15008");
            let mut ids = Vec::new();
            for _ in 0..12 {
                ids.push(raw.open(&stuck, &[]).await.expect("open"));
            }
            // The refusals come at once; the waiting ones do not (their connect times out).
            let got = raw
                .outcomes(&ids, Duration::from_secs(3))
                .await
                .expect("read");
            (raw, got.values().copied().collect::<Vec<_>>())
        });
        ((rt, raw), pending)
    });
    let refused_pending = pending.iter().filter(|o| **o == Outcome::Refused).count();
    // At most the backlog's one connection plus PENDING waiting are not refused.
    assert!(
        refused_pending >= 12 - PENDING - 2,
        "{refused_pending} of 12 refused at once: {pending:?}"
    );
    let line = hop
        .agent
        .wait_log(&["connection complete", "limit pending_connects_per_peer"]);
    assert!(
        line.contains("ZTUNNEL_HBONE_MAX_PENDING_CONNECTS_PER_PEER"),
        "{line}"
    );
    let got = ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), hop.dst(), "after")
        .expect("exchange after the floods");
    assert_eq!(got.response, "hello after");
    drop((flooding, waiting));
}

/// Time of `n` request/answer exchanges from `netns` to `dst`, each on a new connection.
fn latencies(netns: &std::path::Path, dst: SocketAddr, n: usize) -> Vec<Duration> {
    use std::io::Read;
    in_netns(netns, move || {
        (0..n)
            .map(|i| {
                let started = std::time::Instant::now();
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("exchange {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                s.write_all(b"ping").expect("send");
                s.shutdown(std::net::Shutdown::Write).expect("half-close");
                let mut answer = String::new();
                s.read_to_string(&mut answer).expect("answer");
                assert_eq!(answer, "hello ping");
                started.elapsed()
            })
            .collect()
    })
}

/// The 99th percentile of `samples`.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Until `stop` is set (at most `max` times), connects from `netns` to `dst`, writes 4 KiB of
/// pseudo-random bytes and closes. Returns how many connections it made.
fn spray(
    netns: &std::path::Path,
    dst: SocketAddr,
    max: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            let mut made = 0;
            while made < max && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = noise(4096, u64::from(dst.port()) << 32 | made as u64);
                if let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
                    let _ = s.write_all(&bytes);
                    made += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            made
        })
    })
}

#[test]
fn floods_keep_another_pods_latency_and_the_agents_memory_bounded() {
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    const SAMPLES: usize = 300;
    const STALLED: usize = 1000;
    let mut hop = OneHop::start(
        true,
        &[
            // All 1,000 stalled handshakes are let in (one peer makes them) and outlast the
            // measurement.
            "--max-handshakes-per-peer",
            "1000",
            "--hbone-handshake-timeout",
            "120s",
        ],
    );
    let stranger = hop.topo.add_pod("stranger", 12);
    let pid = hop.agent.pid().expect("agent pid");
    let hbone = SocketAddr::new(hop.server.ip4, 15008);
    let client = hop.client.netns_path();

    latencies(&client, hop.dst(), 50);
    let rss_before = ztunnel_e2e::rss_kib(pid);
    let quiet = p99(latencies(&client, hop.dst(), SAMPLES));

    // 1. 1,000 connections to 15008 that never send a byte.
    let fds_before = ztunnel_e2e::open_fds(pid) as usize;
    let stalled = stall(&stranger, hbone, STALLED);
    wait_for(
        "the agent holding the stalled connections",
        Duration::from_secs(20),
        // (Less a few: connections of the quiet samples may still have been closing.)
        || (ztunnel_e2e::open_fds(pid) as usize + 10 >= fds_before + STALLED).then_some(()),
    );
    let during_stall = p99(latencies(&client, hop.dst(), SAMPLES));
    let rss_stall = ztunnel_e2e::rss_kib(pid);
    drop(stalled);

    // 2. Random bytes to a pod's 15008 (from outside) and to a pod's 15001 (from inside).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sprays = [
        spray(&stranger.netns_path(), hbone, 3000, stop.clone()),
        spray(
            &client,
            SocketAddr::from(([127, 0, 0, 1], 15001)),
            3000,
            stop.clone(),
        ),
    ];
    std::thread::sleep(Duration::from_millis(200));
    let during_garbage = p99(latencies(&client, hop.dst(), SAMPLES));
    let rss_garbage = ztunnel_e2e::rss_kib(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sprayed: Vec<usize> = sprays
        .into_iter()
        .map(|s| s.join().expect("spray"))
        .collect();

    // After: the stalled handshakes are gone and memory comes back down.
    wait_for(
        "the stalled connections closed",
        Duration::from_secs(20),
        || ((ztunnel_e2e::open_fds(pid) as usize) < fds_before + 50).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = ztunnel_e2e::rss_kib(pid);
    eprintln!(
        "p99 of {SAMPLES} exchanges: quiet {quiet:?}, {STALLED} stalled handshakes {during_stall:?} ({:.2}x), random bytes ({} to 15008, {} to 15001) {during_garbage:?} ({:.2}x); RSS KiB: before {rss_before}, stalled {rss_stall}, random {rss_garbage}, after {rss_after}",
        during_stall.as_secs_f64() / quiet.as_secs_f64(),
        sprayed[0],
        sprayed[1],
        during_garbage.as_secs_f64() / quiet.as_secs_f64(),
    );
    assert!(hop.agent.is_running());
    assert!(
        during_stall <= quiet * 3,
        "stalled handshakes: {during_stall:?} vs quiet {quiet:?}"
    );
    assert!(
        during_garbage <= quiet * 3,
        "random bytes: {during_garbage:?} vs quiet {quiet:?}"
    );
    // Each stalled handshake costs a bounded amount (a socket and a TLS acceptor).
    assert!(
        rss_stall - rss_before.min(rss_stall) < 64 * 1024,
        "{STALLED} stalled handshakes took {} KiB",
        rss_stall - rss_before
    );
    assert!(
        rss_after <= rss_stall.max(rss_garbage),
        "{rss_after} KiB after"
    );
    // Everything is visible: the refusals are counted, and the log says how many it left out.
    let metrics = hop.agent.scrape_metrics();
    let failed = ztunnel_e2e::metric_sum(
        &metrics,
        "istio_tcp_connections_failed_total",
        &["reporter=\"destination\""],
    );
    assert!(
        failed >= (STALLED + sprayed[0]) as u64,
        "{failed} failed: {metrics}"
    );
    hop.agent.wait_log(&["were left out", "left_out="]);
}

/// `n` pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn control_plane_sending_garbage_and_enormous_responses_is_survived() {
    use ztunnel_agent::xds::client::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
    use ztunnel_e2e::xds_mesh::{hbone_exchange, mesh_yaml, settings, start_cp, start_mesh};
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    let addr = format!("127.0.0.1:{}", ztunnel_e2e::xds_mesh::XDS_PORT);
    let mut m = start_mesh("hostile-xds", &addr);
    let cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    m.agent.wait_ready();
    let pid = m.agent.pid().expect("agent pid");
    let nack_for = |name: &str| {
        wait_for(
            &format!("a NACK naming {name}"),
            Duration::from_secs(10),
            || {
                cp.replies()
                    .into_iter()
                    .filter_map(|r| r.error)
                    .find(|e| e.contains(name))
            },
        )
    };

    // Bytes that are no protobuf at all, as an address and as a policy: NACKed by name.
    cp.inject(
        ADDRESS_TYPE,
        "cluster1//v1/Pod/default/noise",
        noise(4096, 1),
    );
    let nack = nack_for("cluster1//v1/Pod/default/noise");
    assert!(
        nack.contains("decode") || nack.contains("invalid"),
        "{nack}"
    );
    cp.inject(AUTHORIZATION_TYPE, "default/noise-policy", noise(4096, 2));
    nack_for("default/noise-policy");
    // A resource named with 1 MiB of characters: refused, and no log line carries it whole.
    let long_name = "n".repeat(1 << 20);
    cp.inject(ADDRESS_TYPE, &long_name, noise(64, 3));
    wait_for(
        "the long-named resource refused",
        Duration::from_secs(10),
        || {
            cp.replies()
                .into_iter()
                .filter_map(|r| r.error)
                .find(|e| e.contains("nnnnnnnn"))
        },
    );
    let longest = m.agent.log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 16 * 1024, "a log line of {longest} bytes");
    assert_eq!(hbone_exchange(&m, "after noise"), "hello after noise");

    // One response past the 200 MiB message limit: refused before it is read, the last state
    // is served, and the stream comes back once the control plane behaves.
    let rss_before = ztunnel_e2e::rss_kib(pid);
    let mark = m.agent.log_mark();
    cp.inject(
        ADDRESS_TYPE,
        "cluster1//v1/Pod/default/enormous",
        vec![0x0a; 201 << 20],
    );
    let line = m.agent.wait_log_after(mark, &["xDS stream failed"]);
    assert!(line.contains("too large"), "{line}");
    assert_eq!(hbone_exchange(&m, "during"), "hello during");
    let rss_during = ztunnel_e2e::rss_kib(pid);
    assert!(
        rss_during < rss_before + 64 * 1024,
        "the agent grew from {rss_before} to {rss_during} KiB"
    );
    for name in [
        "cluster1//v1/Pod/default/enormous",
        "cluster1//v1/Pod/default/noise",
        long_name.as_str(),
    ] {
        cp.remove_injected(ADDRESS_TYPE, name);
    }
    cp.remove_injected(AUTHORIZATION_TYPE, "default/noise-policy");
    // A change after the flood arrives: the stream is back.
    std::fs::write(&m.mesh_path, mesh_yaml(&m.client, &m.server, true, true)).expect("mesh");
    cp.reload();
    wait_for("the stream back", Duration::from_secs(40), || {
        let (_, dump) = m.agent.http("GET", 15000, "/config_dump");
        dump.contains("\"extra.default.svc.cluster.local\"")
            .then_some(())
    });
    eprintln!("RSS KiB: before {rss_before}, during the enormous responses {rss_during}");
    assert!(m.agent.is_running());
}

#[test]
fn zds_peer_sending_garbage_and_truncated_messages_is_answered_and_survived() {
    use prost::Message;
    use ztunnel_agent::zds_proto::{workload_request, AddWorkload, WorkloadInfo, WorkloadRequest};
    use ztunnel_e2e::topology::Topology;
    use ztunnel_e2e::traffic::{exchange, Server};
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    let _app = Server::start(
        server_pod.netns_path(),
        SocketAddr::new(server_pod.ip4, 9080),
    );
    let (cni, mut agent, _) = ztunnel_e2e::cni::start_with_agent(&topo, &[]);

    // A valid request cut at every length: each prefix is answered with a refusal (none
    // carries the namespace fd, so none may enroll anything). Not the empty prefix: on a
    // SOCK_SEQPACKET socket an empty message reads as the peer closing.)
    let valid = WorkloadRequest {
        payload: Some(workload_request::Payload::Add(AddWorkload {
            uid: "uid-client".into(),
            workload_info: Some(WorkloadInfo {
                name: "client".into(),
                namespace: "default".into(),
                service_account: "client".into(),
                windows_namespace: None,
            }),
        })),
    }
    .encode_to_vec();
    for len in 1..valid.len() {
        let answer = cni.send_raw(&valid[..len], None);
        assert!(!answer.is_empty(), "{len} bytes were accepted");
    }
    // Noise of every size up to 3 KB: answered, one by one (some noise is a valid request).
    let mut refused = 0;
    for i in 0..300u64 {
        let answer = cni.send_raw(&noise(1 + (i as usize * 37) % 3000, i + 7), None);
        refused += usize::from(!answer.is_empty());
    }
    assert!(
        refused > 250,
        "only {refused} of 300 noise messages refused"
    );
    // An fd that is no network namespace.
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let answer = cni.send_raw(&valid, Some(&null));
    assert!(
        answer.contains("default/client") && answer.contains("not a network namespace"),
        "{answer}"
    );
    // A message larger than any request: refused as truncated.
    let answer = cni.send_raw(&noise(100 * 1024, 5), None);
    assert!(
        answer.contains("truncated") || answer.contains("large"),
        "{answer}"
    );
    assert!(agent.is_running());

    // The session carries on: the pod is enrolled and its traffic captured.
    assert_eq!(cni.add("uid-client", "client", &client.netns_path()), "");
    assert_eq!(cni.snapshot_sent(), "");
    agent.wait_ready();
    let dst = SocketAddr::new(server_pod.ip4, 9080);
    let got = exchange(&client.netns_path(), dst, "zds").expect("captured connection");
    assert_eq!(got.response, "hello zds");
    agent.wait_log(&["captured connection", &format!("original_dst={dst}")]);
}

#[test]
fn outbound_connection_limit_refuses_the_pods_next_connection_only() {
    if !require_root() {
        return;
    }
    let _serial = one_at_a_time();
    let mut hop = OneHop::start(true, &["--max-connections-per-pod", "3"]);
    // A destination outside the mesh (passthrough): only the client's outbound side counts.
    let outside = hop.topo.add_pod("outside", 13);
    let dst = SocketAddr::new(outside.ip4, 9080);
    let _app = ztunnel_e2e::traffic::Server::start(outside.netns_path(), dst);

    let held = stall(&hop.client, dst, 3);
    let refused = ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), dst, "fourth");
    assert!(
        refused.as_ref().map_or(true, |e| e.response.is_empty()),
        "the fourth connection got through: {refused:?}"
    );
    let line = hop
        .agent
        .wait_log(&["connection complete", "limit connections_per_pod"]);
    assert!(
        line.contains("pod default/client already holds 3 outbound connections")
            && line.contains("direction=\"outbound\"")
            && line.contains(&format!("dst.addr={dst}")),
        "{line}"
    );
    // Another pod's outbound connections are its own to count.
    let got = ztunnel_e2e::traffic::exchange(&hop.server.netns_path(), dst, "server")
        .expect("another pod's connection");
    assert_eq!(got.response, "hello server");
    // And the pod's own come back once its connections end.
    drop(held);
    let got = wait_for(
        "the client's connection after its others ended",
        Duration::from_secs(10),
        || ztunnel_e2e::traffic::exchange(&hop.client.netns_path(), dst, "again").ok(),
    );
    assert_eq!(got.response, "hello again");
}
