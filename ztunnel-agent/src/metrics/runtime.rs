//! `tokio_*`: the proxy runtime's figures under upstream ztunnel's names (read at scrape
//! time from the runtime handle the agent registers at start): a saturated
//! runtime (busy workers, a growing global queue) shows before latency does.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: usize,
}

/// The families this collector writes: (name, type, help), upstream's help texts.
pub const FAMILIES: &[(&str, MetricType, &str)] = &[
    (
        "tokio_num_workers",
        MetricType::Gauge,
        "the number of worker threads used by the runtime",
    ),
    (
        "tokio_global_queue_depth",
        MetricType::Gauge,
        "the number of tasks currently scheduled in the runtime's global queue",
    ),
    (
        "tokio_num_alive_tasks",
        MetricType::Gauge,
        "the number of alive tasks in the runtime",
    ),
    (
        "tokio_worker_total_busy_duration_seconds",
        MetricType::Counter,
        "the amount of time worker threads have been busy",
    ),
    (
        "tokio_worker_park_count",
        MetricType::Counter,
        "the total number of times the given worker thread has parked",
    ),
    (
        "tokio_worker_park_unpark_count",
        MetricType::Counter,
        "the total number of times the given worker thread has parked and unparked",
    ),
];

/// `tokio_*` families of the proxy runtime (set at start; before that, the runtime serving
/// the scrape, if any). Descriptors are always written.
#[derive(Debug, Default, Clone)]
pub struct RuntimeCollector(pub Arc<OnceLock<tokio::runtime::Handle>>);

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = match self.0.get() {
            Some(handle) => Some(handle.metrics()),
            None => tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| h.metrics()),
        };
        for &(name, kind, help) in FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            let Some(m) = &metrics else { continue };
            let workers = m.num_workers();
            match name {
                "tokio_num_workers" => ConstGauge::new(workers as i64).encode(family)?,
                "tokio_global_queue_depth" => {
                    ConstGauge::new(m.global_queue_depth() as i64).encode(family)?
                }
                "tokio_num_alive_tasks" => {
                    ConstGauge::new(m.num_alive_tasks() as i64).encode(family)?
                }
                _ => {
                    for worker in 0..workers {
                        let labels = WorkerLabels { worker };
                        let sample = family.encode_family(&labels)?;
                        match name {
                            "tokio_worker_total_busy_duration_seconds" => ConstCounter::new(
                                m.worker_total_busy_duration(worker).as_secs_f64(),
                            )
                            .encode(sample)?,
                            "tokio_worker_park_count" => {
                                ConstCounter::new(m.worker_park_count(worker)).encode(sample)?
                            }
                            _ => ConstCounter::new(m.worker_park_unpark_count(worker))
                                .encode(sample)?,
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
