//! One module per verb.
pub mod config;
pub mod console;
pub mod exec;
pub mod inspect;
pub mod list;
pub mod version;

use std::io::Write;

use crate::error::CtlError;

/// Writes `text` to stdout (a closed pipe is an error, not a panic).
pub(crate) fn print(text: &[u8]) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text)
        .and_then(|()| out.flush())
        .map_err(CtlError::Output)
}

/// `value` as indented JSON and a newline.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CtlError> {
    let mut text = serde_json::to_vec_pretty(value).expect("plain data serializes");
    text.push(b'\n');
    print(&text)
}
