//! Drains aya-log records from the kernel programs into `log`, which tracing-subscriber
//! forwards to tracing (filter them with e.g. `RUST_LOG=ztunnel=debug`).

use aya::Ebpf;
use tokio::io::unix::AsyncFd;

/// Starts a task that forwards kernel log records whenever the ring buffer has data.
/// Without a log map (a build without log statements) it only notes so.
pub fn start(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::debug!(error = %e, "eBPF debug logs unavailable");
            return;
        }
    };
    // SAFETY: the AsyncFd owns the logger and with it the ring buffer's fd, which stays open
    // until the AsyncFd is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        tracing::warn!("eBPF debug logs unavailable: cannot poll the log ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
