//! The process's own figures, read from /proc at scrape time under the names Prometheus'
//! process collectors use (upstream ztunnel exports the two descriptor ones): descriptor
//! exhaustion, memory and CPU are visible before they bite.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// What /proc/self/stat says (the fields the collector exports).
#[derive(Debug, Default, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    threads: i64,
    start_time_seconds: f64,
    virtual_bytes: i64,
    resident_bytes: i64,
}

/// Parses /proc/self/stat; `ticks` per second, `page` bytes, `boot_time` seconds since the
/// epoch (proc(5) field numbers below).
fn parse_stat(stat: &str, ticks: f64, page: i64, boot_time: f64) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3 (state); field n is at index n - 3.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<f64>().ok();
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) / ticks,
        threads: field(20)?.parse().ok()?,
        start_time_seconds: boot_time + num(22)? / ticks,
        virtual_bytes: field(23)?.parse().ok()?,
        resident_bytes: field(24)?.parse::<i64>().ok()? * page,
    })
}

/// What does not change while the process runs: clock ticks per second, page size, boot
/// time (seconds since the epoch). Read once, on the first scrape (/proc/stat is long on
/// a many-CPU node).
fn constants() -> Option<(f64, i64, f64)> {
    static CONSTANTS: std::sync::OnceLock<Option<(f64, i64, f64)>> = std::sync::OnceLock::new();
    *CONSTANTS.get_or_init(|| {
        use nix::unistd::{sysconf, SysconfVar};
        let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten()?;
        let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        Some((ticks.max(1) as f64, page.max(1), boot_time))
    })
}

fn read_stat() -> Option<Stat> {
    let (ticks, page, boot_time) = constants()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat, ticks, page, boot_time)
}

fn open_fds() -> Option<i64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    // Minus the descriptor read_dir itself holds.
    Some(entries.count() as i64 - 1)
}

fn max_fds() -> Option<i64> {
    let (soft, _hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some(i64::try_from(soft).unwrap_or(i64::MAX))
}

/// `process_*` families.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// The families this collector writes: (name, type, help).
pub const FAMILIES: &[(&str, MetricType, &str)] = &[
    (
        "process_open_fds",
        MetricType::Gauge,
        "Number of open file descriptors",
    ),
    (
        "process_max_fds",
        MetricType::Gauge,
        "Maximum number of file descriptors",
    ),
    (
        "process_cpu_seconds",
        MetricType::Counter,
        "Total user and system CPU time spent in seconds",
    ),
    (
        "process_resident_memory_bytes",
        MetricType::Gauge,
        "Resident memory size in bytes",
    ),
    (
        "process_virtual_memory_bytes",
        MetricType::Gauge,
        "Virtual memory size in bytes",
    ),
    (
        "process_start_time_seconds",
        MetricType::Gauge,
        "Start time of the process since unix epoch in seconds",
    ),
    (
        "process_threads",
        MetricType::Gauge,
        "Number of OS threads in the process",
    ),
];

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = read_stat();
        for &(name, kind, help) in FAMILIES {
            let value: Option<f64> = match name {
                "process_open_fds" => open_fds().map(|v| v as f64),
                "process_max_fds" => max_fds().map(|v| v as f64),
                "process_cpu_seconds" => stat.as_ref().map(|s| s.cpu_seconds),
                "process_resident_memory_bytes" => stat.as_ref().map(|s| s.resident_bytes as f64),
                "process_virtual_memory_bytes" => stat.as_ref().map(|s| s.virtual_bytes as f64),
                "process_start_time_seconds" => stat.as_ref().map(|s| s.start_time_seconds),
                "process_threads" => stat.as_ref().map(|s| s.threads as f64),
                _ => None,
            };
            let metric = encoder.encode_descriptor(name, help, None, kind)?;
            match (value, kind) {
                (Some(v), MetricType::Counter) => ConstCounter::new(v).encode(metric)?,
                (Some(v), _) if v.fract() == 0.0 => ConstGauge::new(v as i64).encode(metric)?,
                (Some(v), _) => ConstGauge::new(v).encode(metric)?,
                (None, _) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime
        // vsize rss ...
        let line = "42 (zt (agent) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let stat = parse_stat(line, 100.0, 4096, 1_700_000_000.0).expect("parsed");
        assert_eq!(
            stat,
            Stat {
                cpu_seconds: 4.0,
                threads: 7,
                start_time_seconds: 1_700_000_010.0,
                virtual_bytes: 123_456_789,
                resident_bytes: 300 * 4096,
            }
        );
        assert!(parse_stat("garbage", 100.0, 4096, 0.0).is_none());
    }

    #[test]
    fn this_process_reads() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.threads >= 1 && stat.resident_bytes > 0, "{stat:?}");
        assert!(open_fds().expect("fds") >= 3);
    }
}
