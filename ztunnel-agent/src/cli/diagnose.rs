//! `ztunnel-agent diagnose [<ns>/<pod>]`: asks the agent for its evidence and prints the
//! report (`crate::diagnose::report`).

use std::process::ExitCode;

use super::DiagnoseArgs;
use crate::diagnose::{node_report, parse_pod_ref, pod_report, Evidence};
use crate::telemetry::ErrorChain;

/// `diagnose`: 0 healthy, 1 a broken link, 2 the agent could not be asked.
pub fn run(args: &DiagnoseArgs) -> ExitCode {
    let target = match &args.pod {
        None => None,
        Some(pod) => match parse_pod_ref(pod) {
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
    if let Some(pod) = &target {
        path.push_str(&format!("&pod={pod}"));
    }
    let evidence = match super::admin_client::fetch_json(args.admin_address, &path) {
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
        Some(pod) => pod_report(&evidence, &pod.namespace, &pod.name),
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
