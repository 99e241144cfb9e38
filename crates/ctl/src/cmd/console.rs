//! `kuasarctl console ID [--follow]`: the guest's console log, as
//! kuasar-vmm serves it.
use std::path::Path;
use std::time::Duration;

use crate::client::Client;
use crate::error::CtlError;

/// How often `--follow` asks for more.
const POLL: Duration = Duration::from_millis(500);
/// How much one call asks for.
const CHUNK: u32 = 256 * 1024;

pub fn run(socket: &Path, id: &str, follow: bool) -> Result<(), CtlError> {
    let client = Client::connect(socket)?;
    let id = client.sandbox(id)?.id;
    let mut offset = 0;
    loop {
        let read = match client.read_console(&id, offset, CHUNK) {
            Ok(read) => read,
            // The sandbox went away while followed: its log ends there.
            Err(CtlError::Call { .. }) if follow && offset > 0 && gone(&client, &id) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if !read.data.is_empty() {
            super::print(&read.data)?;
        }
        let more = read.next_offset < read.size;
        offset = read.next_offset;
        if more {
            continue;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

fn gone(client: &Client, id: &str) -> bool {
    client
        .list()
        .map(|all| all.iter().all(|s| s.id != id))
        .unwrap_or(false)
}
