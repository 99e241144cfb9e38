//! What every sandbox shares: the configuration, the host's facts resolved
//! once at start-up, the event publisher.
use crate::config::{Accelerator, Config};
use crate::events::Publisher;
use crate::vmm::host as probe;
use crate::vmm::qemu::Accel;

pub struct Host {
    pub config: Config,
    pub accel: Accel,
    pub tsc_khz: Option<u64>,
    pub publisher: Publisher,
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
        tracing::info!(?accel, ?tsc_khz, "host probed");
        Host {
            config,
            accel,
            tsc_khz,
            publisher: Publisher::default(),
        }
    }
}
