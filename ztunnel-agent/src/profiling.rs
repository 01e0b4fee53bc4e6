//! Profiles on the admin port, as upstream ztunnel serves them:
//! `/debug/pprof/profile?seconds=N&frequency=HZ` samples the agent's CPU (every thread) for N
//! seconds and answers a pprof protobuf (`go tool pprof`, `pprof -http`, Grafana Pyroscope
//! read it). `/debug/pprof/heap` needs jemalloc's profiler, which this build does not use: it
//! says so and what to look at instead.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use crate::admin::{query_param, AdminHandler, Responding};
use crate::http::text;

/// Upstream's defaults and bounds.
const DEFAULT_SECONDS: u64 = 10;
const MAX_SECONDS: u64 = 300;
const DEFAULT_FREQUENCY: i32 = 100;
const MAX_FREQUENCY: i32 = 1000;

/// Why a profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A query parameter out of range.
    #[error("invalid {name} value `{value}`; expected {range}")]
    BadParameter {
        /// The parameter.
        name: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        range: &'static str,
    },
    /// The profiler refused (another profile is running, or the timer failed).
    #[error(
        "the CPU profiler could not run (one profile at a time: retry when the running one ends)"
    )]
    Profiler(#[from] pprof::Error),
    /// The sampling task ended abnormally.
    #[error("the profiling task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The parameters of a CPU profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileRequest {
    /// How long to sample.
    pub duration: Duration,
    /// Samples per second.
    pub frequency: i32,
}

impl ProfileRequest {
    /// From the query's `seconds` (1-300, default 10) and `frequency` (1-1000 Hz, default
    /// 100).
    pub fn parse(seconds: Option<&str>, frequency: Option<&str>) -> Result<Self, Error> {
        let seconds = match seconds {
            None => DEFAULT_SECONDS,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=MAX_SECONDS).contains(s))
                .ok_or_else(|| Error::BadParameter {
                    name: "seconds",
                    value: v.to_string(),
                    range: "1-300",
                })?,
        };
        let frequency = match frequency {
            None => DEFAULT_FREQUENCY,
            Some(v) => v
                .parse::<i32>()
                .ok()
                .filter(|f| (1..=MAX_FREQUENCY).contains(f))
                .ok_or_else(|| Error::BadParameter {
                    name: "frequency",
                    value: v.to_string(),
                    range: "1-1000",
                })?,
        };
        Ok(Self {
            duration: Duration::from_secs(seconds),
            frequency,
        })
    }
}

/// Samples the whole process for `request.duration`; returns the pprof protobuf. Runs on a
/// blocking thread (sampling sleeps, symbolizing is CPU work), so the proxy runtime is not
/// held up.
pub async fn cpu_profile(request: ProfileRequest) -> Result<Vec<u8>, Error> {
    let task = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Error> {
        use pprof::protos::Message;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(request.frequency)
            // Frames inside these libraries cannot be unwound safely from a signal handler.
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()?;
        std::thread::sleep(request.duration);
        let profile = guard.report().build()?.pprof()?;
        Ok(profile.encode_to_vec())
    });
    task.await.map_err(Error::Task)?
}

/// `/debug/pprof/profile`.
pub struct CpuProfileHandler;

impl AdminHandler for CpuProfileHandler {
    fn path(&self) -> &'static str {
        "/debug/pprof/profile"
    }

    fn description(&self) -> &'static str {
        "capture a CPU profile (pprof protobuf); params: seconds (1-300, default 10), frequency in Hz (1-1000, default 100)"
    }

    fn handle(&self, req: Request<Incoming>) -> Responding<'_> {
        let request =
            ProfileRequest::parse(query_param(&req, "seconds"), query_param(&req, "frequency"));
        Box::pin(async move {
            let result = match request {
                Ok(request) => cpu_profile(request).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(bytes) => {
                    let mut response = text(StatusCode::OK, bytes);
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                Err(e @ Error::BadParameter { .. }) => {
                    text(StatusCode::BAD_REQUEST, format!("{e}\n"))
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{}\n", crate::telemetry::ErrorChain(&e)),
                ),
            }
        })
    }
}

/// `/debug/pprof/heap`.
pub struct HeapProfileHandler;

impl AdminHandler for HeapProfileHandler {
    fn path(&self) -> &'static str {
        "/debug/pprof/heap"
    }

    fn description(&self) -> &'static str {
        "heap profile (needs jemalloc's heap profiler, which this build leaves out, and says so)"
    }

    fn handle(&self, _req: Request<Incoming>) -> Responding<'_> {
        Box::pin(async move {
            let why = if cfg!(feature = "jemalloc") {
                "this build's jemalloc is built without its heap profiler"
            } else {
                "this build uses the system allocator (built without the `jemalloc` feature), and heap profiles need jemalloc's heap profiler"
            };
            text(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "heap profiling is not available: {why}. \
                     Look at process_resident_memory_bytes on :15020/metrics for the total, and /debug/pprof/profile for where CPU goes.\n"
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_upstreams_defaults_and_bounds() {
        assert_eq!(
            ProfileRequest::parse(None, None).expect("defaults"),
            ProfileRequest {
                duration: Duration::from_secs(10),
                frequency: 100
            }
        );
        assert_eq!(
            ProfileRequest::parse(Some("2"), Some("997")).expect("given"),
            ProfileRequest {
                duration: Duration::from_secs(2),
                frequency: 997
            }
        );
        for (s, f) in [(Some("0"), None), (Some("301"), None), (Some("x"), None)] {
            let e = ProfileRequest::parse(s, f).expect_err("refused");
            assert!(e.to_string().contains("expected 1-300"), "{e}");
        }
        let e = ProfileRequest::parse(None, Some("1001")).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "invalid frequency value `1001`; expected 1-1000"
        );
    }

    #[test]
    fn a_cpu_profile_of_a_busy_thread_has_samples_and_names_its_function() {
        use pprof::protos::Message;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = stop.clone();
        #[inline(never)]
        fn burn_cpu_for_the_profile_test(stop: &std::sync::atomic::AtomicBool) -> u64 {
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            x
        }
        let busy = std::thread::spawn(move || burn_cpu_for_the_profile_test(&spin));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let bytes = runtime
            .block_on(cpu_profile(ProfileRequest {
                duration: Duration::from_secs(1),
                frequency: 200,
            }))
            .expect("profile");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().expect("busy thread");
        let profile = pprof::protos::Profile::decode(bytes.as_slice()).expect("a pprof protobuf");
        let samples: i64 = profile.sample.iter().flat_map(|s| s.value.first()).sum();
        // About 200 at 200 Hz for one busy second; a loaded machine gives fewer.
        assert!(samples >= 20, "{samples} samples");
        let names: Vec<&str> = profile
            .function
            .iter()
            .filter_map(|f| profile.string_table.get(usize::try_from(f.name).ok()?))
            .map(String::as_str)
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("burn_cpu_for_the_profile_test")),
            "functions: {names:?}"
        );
    }
}
