//! ztunnel-agent entry point: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use ztunnel_agent::cli::{self, fail, Cli, Command};
use ztunnel_agent::config::Config;
use ztunnel_agent::telemetry;

/// jemalloc rather than glibc's malloc: after a burst of connections glibc keeps the freed
/// memory in its per-thread arenas (RSS stays up), where jemalloc's background thread hands
/// unused pages back to the kernel within seconds. Measured with `cargo xtask bench`; the
/// README has the figures.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start-up (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them): a background thread returns unused pages to the kernel, a freed
/// page stays cached for reuse at most about 3 s and is then returned outright
/// (`MADV_DONTNEED`: no "muzzy" stage, whose lazily freed pages still count in RSS), and no
/// transparent huge pages (a 2 MiB page would keep a mostly idle heap resident).
// Read by jemalloc (tikv-jemalloc-sys prefixes its symbols with `_rjem_`) as its
// `const char *malloc_conf` before `main`: a `'static`, NUL-terminated string.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_OPTIONS: &u8 =
    &b"background_thread:true,dirty_decay_ms:3000,muzzy_decay_ms:0,thp:never\0"[0];

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    match cli.command {
        Command::Run(args) => {
            telemetry::init(&args.log_filter, args.log_format);
            let config = match Config::from_args(&args) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(args.worker_threads))
                .enable_all()
                .thread_name("ztunnel")
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match runtime.block_on(ztunnel_agent::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.as_ref()),
            }
        }
        Command::Config(args) => cli::config::run(&args),
        Command::Diagnose(args) => cli::diagnose::run(&args),
        Command::BugReport(args) => cli::bug_report::run(&args),
        Command::Redirect { action } => cli::redirect::run(&action),
    }
}

/// Every proxied connection costs two descriptors (more with HBONE); the default soft limit
/// of 1024 would cap a node at a few hundred connections. Raise it to the hard limit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
