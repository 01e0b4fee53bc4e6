//! `ztunnel-agent diagnose [<ns>/<pod>]`: asks the agent for its evidence and prints the
//! report (`crate::diagnose::report`).

use std::process::ExitCode;

use super::{DiagnoseArgs, DiagnoseQuestion, FlowArgs};
use crate::diagnose::flow::{split_destination, Flow};
use crate::diagnose::{node_report, parse_pod_ref, pod_report, Evidence};
use crate::telemetry::ErrorChain;

/// `diagnose`: 0 healthy, 1 a broken link, 2 the agent could not be asked.
pub fn run(args: &DiagnoseArgs) -> ExitCode {
    if let Some(DiagnoseQuestion::Flow(flow)) = &args.question {
        return run_flow(flow);
    }
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

/// `diagnose flow`: 0 it would flow, 1 a step fails, 2 the agent could not be asked.
fn run_flow(args: &FlowArgs) -> ExitCode {
    if parse_pod_ref(&args.pod).is_none() {
        eprintln!(
            "error: {}: name the pod as <namespace>/<pod>, e.g. default/productpage-v1",
            args.pod
        );
        return ExitCode::from(2);
    }
    if split_destination(&args.destination).is_none() {
        eprintln!(
            "error: {}: give the destination as <host-or-ip>:<port>, e.g. reviews:9080, 10.96.0.14:9080 or [fd00::1]:9080",
            args.destination
        );
        return ExitCode::from(2);
    }
    let encode = |v: &str| {
        percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let path = format!(
        "/debug/flow?pod={}&dst={}",
        encode(&args.pod),
        encode(&args.destination)
    );
    let answer = match super::admin_client::fetch_json(args.admin_address, &path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {}", ErrorChain(&e));
            return ExitCode::from(2);
        }
    };
    let flow: Flow = match serde_json::from_value(answer.clone()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: the agent at {} answered with an explanation this command does not understand (a different version?): {e}", args.admin_address);
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    } else {
        print!("{}", flow.render());
    }
    if flow.first_failure().is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
