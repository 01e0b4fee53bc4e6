//! `ztunnel-agent redirect dump|uninstall`: the pinned kernel state, read or removed.

use std::process::ExitCode;

use super::RedirectAction;

/// Runs `ztunnel-agent redirect ...`.
pub fn run(action: &RedirectAction) -> ExitCode {
    match action {
        RedirectAction::Dump(arg) => match crate::redirect::dump::render(&arg.pin_dir) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => super::fail(&e),
        },
        RedirectAction::Uninstall(arg) => match crate::redirect::uninstall(&arg.pin_dir) {
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
            Err(e) => super::fail(&e),
        },
    }
}
