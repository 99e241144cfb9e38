//! `kuasarctl`: the operator's CLI for kuasar-vmm.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = kuasarctl::args::Args::parse();
    match kuasarctl::run(args) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("kuasarctl: {}", kuasarctl::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}
