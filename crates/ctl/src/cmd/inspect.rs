//! `kuasarctl inspect ID`: one sandbox as JSON.
use std::path::Path;

use crate::client::Client;
use crate::error::CtlError;
use crate::view::Sandbox;

pub fn run(socket: &Path, id: &str) -> Result<(), CtlError> {
    let sandbox = Sandbox::from(Client::connect(socket)?.sandbox(id)?);
    super::print_json(&sandbox)
}
