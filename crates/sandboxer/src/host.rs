//! What every sandbox shares: the configuration, the host's facts resolved
//! once at start-up, the event publisher.
use std::sync::Arc;

use crate::config::Config;
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::pod::HostCapacity;
use crate::vmm::qemu::Qemu;
use crate::vmm::Hypervisor;

pub struct Host {
    pub config: Config,
    /// Makes the VMs and takes them back after a restart.
    pub hypervisor: Box<dyn Hypervisor>,
    pub publisher: Publisher,
    /// The most one VM can have: the host's memory and CPUs.
    pub capacity: HostCapacity,
    /// What the metrics endpoint exports (None: it is off).
    pub metrics: Option<Arc<Metrics>>,
    /// How the host's cgroups are laid out (the VMMs' cgroups go there).
    pub cgroups: crate::cgroup::Layout,
    /// Booted VMs pods take instead of booting one (None: `[pool]` is off).
    pub pool: Option<Arc<crate::pool::Pool>>,
}

impl Host {
    pub fn new(config: Config) -> Self {
        let hypervisor = Box::new(Qemu::new(&config));
        let capacity = HostCapacity::probe();
        tracing::info!(
            memory_mib = capacity.memory_mib,
            cpus = capacity.cpus,
            "host probed"
        );
        let metrics = config
            .metrics
            .is_enabled()
            .then(|| Arc::new(Metrics::new()));
        let pool = crate::pool::Pool::new(&config);
        Host {
            pool,
            config,
            hypervisor,
            publisher: Publisher::default(),
            capacity,
            metrics,
            cgroups: crate::cgroup::Layout::probe(std::path::Path::new(crate::cgroup::ROOT)),
        }
    }

    /// A host for unit tests: state under `dir`, TCG, the serial channel,
    /// nothing probed that a test machine may lack.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path) -> Self {
        Host::new(Config {
            state_dir: dir.join("vmm"),
            qemu: crate::config::QemuConfig {
                accelerator: crate::config::Accelerator::Tcg,
                channel: crate::config::Channel::Serial,
                tsc_khz: 1,
                confine: false,
                ..Default::default()
            },
            ..Default::default()
        })
    }
}
