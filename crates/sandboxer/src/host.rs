//! What every sandbox shares: the configuration, the host's facts resolved
//! once at start-up, the event publisher.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{Accelerator, Channel, Config};
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::pod::HostCapacity;
use crate::vmm::probe;
use crate::vmm::qemu::{Accel, AgentChannel};

pub struct Host {
    pub config: Config,
    pub accel: Accel,
    pub tsc_khz: Option<u64>,
    /// True: agents are reached over vsock; false: over virtio-serial.
    pub vsock: bool,
    pub publisher: Publisher,
    /// The most one VM can have: the host's memory and CPUs.
    pub capacity: HostCapacity,
    /// What the metrics endpoint exports (None: it is off).
    pub metrics: Option<Arc<Metrics>>,
    next_cid: AtomicU32,
}

impl Host {
    pub fn new(config: Config) -> Self {
        let accel = match config.qemu.accelerator {
            Accelerator::Kvm => Accel::Kvm,
            Accelerator::Tcg => Accel::Tcg,
            Accelerator::Auto if probe::kvm_usable() => Accel::Kvm,
            Accelerator::Auto => Accel::Tcg,
        };
        let tsc_khz = match config.qemu.tsc_khz {
            0 => probe::tsc_khz(),
            khz => Some(khz),
        };
        let vsock = match config.qemu.channel {
            Channel::Vsock => true,
            Channel::Serial => false,
            Channel::Auto => std::path::Path::new("/dev/vhost-vsock").exists(),
        };
        let capacity = HostCapacity::probe();
        tracing::info!(
            ?accel,
            ?tsc_khz,
            vsock,
            memory_mib = capacity.memory_mib,
            cpus = capacity.cpus,
            "host probed"
        );
        // Guest CIDs are host-wide: start from a per-process offset so that
        // two sandboxers (or a restart) are unlikely to collide.
        let first_cid = 3 + (std::process::id() % 1000) * 1000;
        let metrics = config
            .metrics
            .is_enabled()
            .then(|| Arc::new(Metrics::new()));
        Host {
            config,
            accel,
            tsc_khz,
            vsock,
            publisher: Publisher::default(),
            capacity,
            metrics,
            next_cid: AtomicU32::new(first_cid),
        }
    }

    /// A host for unit tests: state under `dir`, TCG, the serial channel,
    /// nothing probed that a test machine may lack.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path) -> Self {
        Host::new(Config {
            state_dir: dir.join("vmm"),
            qemu: crate::config::QemuConfig {
                accelerator: Accelerator::Tcg,
                channel: Channel::Serial,
                tsc_khz: 1,
                ..Default::default()
            },
            ..Default::default()
        })
    }

    /// The channel for a new VM.
    pub fn agent_channel(&self) -> AgentChannel {
        if self.vsock {
            AgentChannel::Vsock {
                cid: self.next_cid.fetch_add(1, Ordering::Relaxed),
            }
        } else {
            AgentChannel::Serial
        }
    }
}
