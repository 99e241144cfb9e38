//! `kuasarctl config containerd`: containerd's configuration for
//! kuasar-vmm, rendered by the same function `kuasar-vmm
//! --print-containerd-config` uses.
use std::path::Path;

use crate::error::CtlError;

pub fn containerd(config: Option<&Path>) -> Result<(), CtlError> {
    let config = kuasar_vmm::config::Config::load(config).map_err(CtlError::Config)?;
    super::print(kuasar_vmm::containerd_config::render(&config).as_bytes())
}
