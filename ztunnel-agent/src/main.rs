//! ztunnel-agent entry point: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use ztunnel_agent::cli::{self, fail, Cli, Command};
use ztunnel_agent::config::Config;
use ztunnel_agent::telemetry;

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
