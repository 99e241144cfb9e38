//! The sandboxer's configuration file: TOML text into `Config`, then the
//! value checks `Config::load` runs (not the file-existence checks).
#![no_main]

use kuasar_vmm::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let _ = config.validate_values();
        let _ = (config.kernel_path(), config.initrd_path());
    }
});
