//! ztunnel-agent entry point: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use ztunnel_agent::cli::{Cli, Command, RedirectAction};
use ztunnel_agent::config::Config;
use ztunnel_agent::telemetry::{self, ErrorChain};

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
        Command::Config(args) => {
            use ztunnel_agent::ztunnel_config::{fetch, load, render, Filter};
            let dump = match &args.file {
                Some(path) => load(path),
                None => fetch(args.admin_address),
            };
            let filter = Filter {
                namespace: args.namespace.clone(),
                node: args.node.clone(),
                workload_name: args.workload_name.clone(),
            };
            match dump.and_then(|d| render(&d, args.section, args.output, &filter)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Diagnose(args) => diagnose(&args),
        Command::Redirect { action } => match action {
            RedirectAction::Dump(arg) => {
                match ztunnel_agent::redirect::dump::render(&arg.pin_dir) {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                }
            }
            RedirectAction::Uninstall(arg) => {
                match ztunnel_agent::redirect::uninstall(&arg.pin_dir) {
                    Ok(removed) => {
                        for p in &removed {
                            println!("removed {}", p.display());
                        }
                        println!(
                            "uninstalled: nothing is captured by {} any more",
                            arg.pin_dir.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                }
            }
        },
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", ErrorChain(e));
    ExitCode::FAILURE
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

/// `diagnose`: 0 healthy, 1 a broken link, 2 the agent could not be asked.
fn diagnose(args: &ztunnel_agent::cli::DiagnoseArgs) -> ExitCode {
    use ztunnel_agent::diagnose::{node_report, pod_report, Evidence};
    let target = match &args.pod {
        None => None,
        Some(pod) => match ztunnel_agent::diagnose::parse_pod_ref(pod) {
            Some(pod_ref) => Some(pod_ref),
            None => {
                eprintln!(
                    "error: {pod}: name the pod as <namespace>/<pod>, e.g. default/productpage-v1"
                );
                return ExitCode::from(2);
            }
        },
    };
    let mut path = format!("/debug/diagnose?window_ms={}", args.window_ms);
    if let Some((ns, name)) = &target {
        path.push_str(&format!("&pod={ns}/{name}"));
    }
    let evidence = match ztunnel_agent::ztunnel_config::fetch_json(args.admin_address, &path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "error: {}\nfirst broken link: agent: not answering; pods it enrolled stay captured but their connections fail until it is back (`ztunnel-agent redirect dump` shows what the kernel still captures)",
                ErrorChain(&e)
            );
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&evidence).unwrap_or_default()
        );
    }
    let evidence: Evidence = match serde_json::from_value(evidence) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: the agent at {} answered with evidence this command does not understand (a different version?): {e}", args.admin_address);
            return ExitCode::from(2);
        }
    };
    let report = match &target {
        Some((ns, name)) => pod_report(&evidence, ns, name),
        None => node_report(&evidence),
    };
    if !args.json {
        print!("{}", report.render());
    }
    if report.first_failure().is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
