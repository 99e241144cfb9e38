//! The optional Prometheus endpoint (`[metrics] address`, off by default;
//! docs/operations.md lists the families). What happens is counted as it
//! happens (VM boots, pod starts, agent calls, recoveries); what is (the
//! sandboxes by mode and state, each VMM's memory and CPU time) is read at
//! each scrape. When the endpoint is off no [`Metrics`] exists: the hooks
//! hold an `Option<Arc<Metrics>>` and do nothing.
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::agent::AgentError;
use crate::recovery::Recovered;
use crate::sandbox::{Mode, Sandbox, SandboxState};

pub mod procfs;
mod server;

pub use server::{bind, serve};

/// Bounds (s) of the boot and pod start histograms: a KVM boot takes a
/// fraction of a second, a TCG one several; the boot timeout is 30 s.
const START_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
];
/// Bounds (s) of the agent call histogram: most calls take milliseconds
/// (tens under TCG); the waits by design take seconds.
const CALL_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Recovery outcomes, always exported (0 until one happens).
const RECOVERY_OUTCOMES: [&str; 3] = ["adopted", "stopped", "unreadable"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxKindLabels {
    mode: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    sandbox: String,
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS)
}

/// The exposition format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (the default: curl, most scrapers).
    Prometheus,
    /// OpenMetrics 1.0 text, for an `Accept` asking for it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Everything counted while kuasar-vmm runs.
pub struct Metrics {
    registry: Registry,
    vm_boot: Histogram,
    pod_start: Histogram,
    agent_calls: Family<MethodLabels, Histogram, fn() -> Histogram>,
    agent_errors: Family<ErrorLabels, Counter>,
    recoveries: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            vm_boot: Histogram::new(START_BUCKETS),
            pod_start: Histogram::new(START_BUCKETS),
            agent_calls: Family::new_with_constructor(call_histogram),
            agent_errors: Family::default(),
            recoveries: Family::default(),
        };
        let r = &mut m.registry;
        r.register_with_unit(
            "kuasar_vm_boot",
            "From the VMM's spawn to the guest agent's first answer",
            Unit::Seconds,
            m.vm_boot.clone(),
        );
        r.register_with_unit(
            "kuasar_pod_start",
            "From a sandbox's start (its first container in the podsandbox mode) to its VM being ready: sized, network attached, booted, guest set up",
            Unit::Seconds,
            m.pod_start.clone(),
        );
        r.register_with_unit(
            "kuasar_agent_call",
            "Calls to guest agents by method, errors included (the waits by design, WaitProcess and the Read calls, last until the guest has something to say)",
            Unit::Seconds,
            m.agent_calls.clone(),
        );
        r.register(
            "kuasar_agent_call_errors",
            "Failed calls to guest agents by method and kind (timeout, transport, protocol, or the status code the agent answered)",
            m.agent_errors.clone(),
        );
        r.register(
            "kuasar_recoveries",
            "Sandboxes found at start-up by outcome: adopted (VM running on), stopped (VM gone), unreadable (state removed)",
            m.recoveries.clone(),
        );
        for outcome in RECOVERY_OUTCOMES {
            let _ = m.recoveries.get_or_create(&OutcomeLabels { outcome });
        }
        m
    }

    pub fn observe_vm_boot(&self, took: Duration) {
        self.vm_boot.observe(took.as_secs_f64());
    }

    pub fn observe_pod_start(&self, took: Duration) {
        self.pod_start.observe(took.as_secs_f64());
    }

    /// One agent call (see `crate::agent`, where every call passes).
    pub fn observe_agent_call(
        &self,
        method: &'static str,
        took: Duration,
        error: Option<&AgentError>,
    ) {
        self.agent_calls
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            let kind = e.kind();
            self.agent_errors
                .get_or_create(&ErrorLabels { method, kind })
                .inc();
        }
    }

    /// What recovery found at start-up.
    pub fn count_recoveries(&self, found: &Recovered) {
        let counts = [found.adopted.len(), found.stopped.len(), found.unreadable];
        for (outcome, n) in RECOVERY_OUTCOMES.into_iter().zip(counts) {
            self.recoveries
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(n as u64);
        }
    }

    /// The exposition of everything, `sandboxes` read now.
    pub fn render(
        &self,
        sandboxes: &[Arc<Sandbox>],
        pool: Option<&crate::pool::Pool>,
        format: Format,
    ) -> Result<String, std::fmt::Error> {
        let mut snapshot = Snapshot::take(sandboxes);
        snapshot.pool_ready = pool.map(|p| p.ready_count() as i64);
        self.encode(snapshot, format)
    }

    /// The exposition of the counted metrics and of `snapshot`.
    pub fn encode(&self, snapshot: Snapshot, format: Format) -> Result<String, std::fmt::Error> {
        let mut now = Registry::default();
        now.register_collector(Box::new(snapshot));
        let mut text = String::new();
        match format {
            Format::Prometheus => {
                use prometheus_client::encoding::prometheus_text::encode;
                encode(&mut text, &self.registry)?;
                encode(&mut text, &now)?;
            }
            Format::OpenMetrics => {
                use prometheus_client::encoding::text::{encode_eof, encode_registry};
                encode_registry(&mut text, &self.registry)?;
                encode_registry(&mut text, &now)?;
                encode_eof(&mut text)?;
            }
        }
        Ok(text)
    }
}

/// One sandbox as a scrape sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSample {
    pub id: String,
    pub mode: Mode,
    pub state: SandboxState,
    /// Its VMM's footprint (None: no VMM, or it is gone).
    pub vmm: Option<procfs::ProcUsage>,
}

/// The sandboxes as they are at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sandboxes: Vec<SandboxSample>,
    /// VMs waiting in the pool (None: `[pool]` is off).
    pub pool_ready: Option<i64>,
}

impl Snapshot {
    /// Reads `sandboxes` (each VMM's footprint from /proc).
    pub fn take(sandboxes: &[Arc<Sandbox>]) -> Self {
        let sandboxes = sandboxes
            .iter()
            .map(|s| {
                let pid = s.vmm_pid();
                SandboxSample {
                    id: s.info.id.clone(),
                    mode: s.mode(),
                    state: s.state(),
                    vmm: (pid != 0).then(|| procfs::read(pid).ok()).flatten(),
                }
            })
            .collect();
        Snapshot {
            sandboxes,
            pool_ready: None,
        }
    }

    /// How many sandboxes have `mode` and `state`.
    fn count(&self, mode: Mode, state: SandboxState) -> i64 {
        let n = self
            .sandboxes
            .iter()
            .filter(|s| s.mode == mode && s.state == state)
            .count();
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "kuasar_sandboxes",
            "Sandboxes by mode (podsandbox, shim, zero-shim) and state (created, running, stopped)",
            None,
            gauge.metric_type(),
        )?;
        for mode in Mode::ALL {
            for state in SandboxState::ALL {
                let labels = SandboxKindLabels {
                    mode: mode.as_str(),
                    state: state.as_str(),
                };
                ConstGauge::new(self.count(mode, state)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut running = Vec::new();
        for s in &self.sandboxes {
            if let Some(usage) = s.vmm {
                let sandbox = s.id.clone();
                running.push((SandboxLabels { sandbox }, usage));
            }
        }
        let mut family = encoder.encode_descriptor(
            "kuasar_vm_memory",
            "Resident memory (RSS) of each sandbox's VMM process",
            Some(&Unit::Bytes),
            gauge.metric_type(),
        )?;
        for (labels, usage) in &running {
            ConstGauge::new(usage.rss_bytes).encode(family.encode_family(labels)?)?;
        }
        let counter = ConstCounter::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "kuasar_vm_cpu",
            "CPU time (user + system) used by each sandbox's VMM process",
            Some(&Unit::Seconds),
            counter.metric_type(),
        )?;
        for (labels, usage) in &running {
            ConstCounter::new(usage.cpu_time.as_secs_f64())
                .encode(family.encode_family(labels)?)?;
        }
        if let Some(ready) = self.pool_ready {
            let family = encoder.encode_descriptor(
                "kuasar_pool_ready_vms",
                "Booted VMs waiting in the pool for a pod",
                None,
                gauge.metric_type(),
            )?;
            ConstGauge::new(ready).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, mode: Mode, state: SandboxState, rss: u64) -> SandboxSample {
        SandboxSample {
            id: id.into(),
            mode,
            state,
            vmm: (rss > 0).then_some(procfs::ProcUsage {
                rss_bytes: rss,
                cpu_time: Duration::from_millis(1500),
            }),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            sandboxes: vec![
                sample("pod-a", Mode::ZeroShim, SandboxState::Running, 200 << 20),
                sample("pod-b", Mode::ZeroShim, SandboxState::Running, 100 << 20),
                sample("pod-c", Mode::PodSandbox, SandboxState::Stopped, 0),
            ],
            pool_ready: Some(2),
        }
    }

    #[test]
    fn a_fresh_endpoint_exports_every_family_it_can() {
        let text = Metrics::new()
            .encode(Snapshot::default(), Format::Prometheus)
            .unwrap();
        for line in [
            "# TYPE kuasar_vm_boot_seconds histogram",
            "kuasar_vm_boot_seconds_count 0",
            "kuasar_pod_start_seconds_bucket{le=\"0.05\"} 0",
            "kuasar_recoveries_total{outcome=\"unreadable\"} 0",
            "kuasar_sandboxes{mode=\"podsandbox\",state=\"created\"} 0",
            "kuasar_sandboxes{mode=\"zero-shim\",state=\"stopped\"} 0",
            "# TYPE kuasar_vm_memory_bytes gauge",
            "# TYPE kuasar_vm_cpu_seconds_total counter",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        // Nothing counted yet: no agent call series; no pool, no pool gauge.
        assert!(!text.contains("kuasar_agent_call_seconds_count"), "{text}");
        assert!(!text.contains("kuasar_pool"), "{text}");
    }

    #[test]
    fn counted_and_scraped_values_show() {
        let m = Metrics::new();
        m.observe_vm_boot(Duration::from_millis(2500));
        m.observe_pod_start(Duration::from_secs(4));
        m.observe_agent_call("Stats", Duration::from_millis(3), None);
        let timeout = AgentError::Timeout {
            method: "Stats",
            after: Duration::from_secs(30),
        };
        m.observe_agent_call("Stats", Duration::from_secs(30), Some(&timeout));
        m.count_recoveries(&Recovered {
            unreadable: 3,
            ..Default::default()
        });
        let text = m.encode(snapshot(), Format::Prometheus).unwrap();
        for line in [
            "kuasar_vm_boot_seconds_bucket{le=\"2\"} 0",
            "kuasar_vm_boot_seconds_bucket{le=\"3\"} 1",
            "kuasar_vm_boot_seconds_sum 2.5",
            "kuasar_pod_start_seconds_count 1",
            "kuasar_agent_call_seconds_bucket{method=\"Stats\",le=\"0.005\"} 1",
            "kuasar_agent_call_seconds_count{method=\"Stats\"} 2",
            "kuasar_agent_call_errors_total{method=\"Stats\",kind=\"timeout\"} 1",
            "kuasar_recoveries_total{outcome=\"adopted\"} 0",
            "kuasar_recoveries_total{outcome=\"unreadable\"} 3",
            "kuasar_sandboxes{mode=\"zero-shim\",state=\"running\"} 2",
            "kuasar_sandboxes{mode=\"podsandbox\",state=\"stopped\"} 1",
            "kuasar_pool_ready_vms 2",
            "kuasar_sandboxes{mode=\"shim\",state=\"running\"} 0",
            "kuasar_vm_memory_bytes{sandbox=\"pod-a\"} 209715200",
            "kuasar_vm_cpu_seconds_total{sandbox=\"pod-b\"} 1.5",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        // A sandbox without a VMM has no VM series.
        assert!(!text.contains("sandbox=\"pod-c\""), "{text}");
    }

    #[test]
    fn openmetrics_has_units_and_an_end() {
        let text = Metrics::new()
            .encode(snapshot(), Format::OpenMetrics)
            .unwrap();
        assert!(
            text.contains("# UNIT kuasar_vm_memory_bytes bytes"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT kuasar_vm_boot_seconds seconds"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }

    #[test]
    fn the_format_follows_accept() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
    }
}
