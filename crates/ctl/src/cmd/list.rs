//! `kuasarctl list`: the node's sandboxes.
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::args::Output;
use crate::client::Client;
use crate::error::CtlError;
use crate::view::Sandbox;

pub fn run(socket: &Path, output: Output) -> Result<(), CtlError> {
    let sandboxes: Vec<Sandbox> = Client::connect(socket)?
        .list()?
        .into_iter()
        .map(Sandbox::from)
        .collect();
    match output {
        Output::Json => super::print_json(&sandboxes),
        Output::Table => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            super::print(crate::table::render(&sandboxes, now).as_bytes())
        }
    }
}
