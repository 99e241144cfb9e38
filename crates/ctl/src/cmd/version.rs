//! `kuasarctl version`: this CLI's version and, when reachable, kuasar-vmm's.
use std::path::Path;

use crate::client::Client;
use crate::error::CtlError;

pub fn run(socket: &Path) -> Result<(), CtlError> {
    super::print(format!("kuasarctl {}\n", env!("CARGO_PKG_VERSION")).as_bytes())?;
    match Client::connect(socket).and_then(|c| c.ping()) {
        Ok(ping) => super::print(
            format!(
                "kuasar-vmm {} at {} ({} sandboxes)\n",
                ping.version,
                socket.display(),
                ping.sandboxes
            )
            .as_bytes(),
        ),
        Err(e) => {
            eprintln!("kuasarctl: {}", crate::error::chain(&e));
            Ok(())
        }
    }
}
