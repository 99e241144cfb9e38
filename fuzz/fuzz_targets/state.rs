//! The sandboxer's state file (`<state_dir>/<id>/state.json`), read back at
//! start-up to recover sandboxes.
#![no_main]

use kuasar_vmm::state::SandboxRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = SandboxRecord::parse(data, "state.json") {
        // What parses must survive a save/load round trip unchanged.
        let bytes = serde_json::to_vec_pretty(&record).expect("a record always serialises");
        let again = SandboxRecord::parse(&bytes, "state.json").expect("re-parse");
        assert_eq!(record, again);
    }
});
