//! `kuasar-vmm`: the resident sandboxer daemon.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Runs every sandbox of this node in its own microVM.
#[derive(Debug, Parser)]
#[command(name = "kuasar-vmm", version)]
struct Args {
    /// Configuration file (TOML). Without it, the documented defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the containerd configuration (runtime handlers of the three
    /// modes, the zero-shim mode's proxy plugin) for this configuration, and exit.
    #[arg(long)]
    print_containerd_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match kuasar_vmm::config::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kuasar-vmm: {}", kuasar_vmm::error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if args.print_containerd_config {
        print!("{}", kuasar_vmm::containerd_config::render(&config));
        return ExitCode::SUCCESS;
    }
    let filter = std::env::var("KUASAR_LOG")
        .ok()
        .and_then(|text| kuasar_vmm::config::log_filter(&text))
        .or_else(|| kuasar_vmm::config::log_filter(&config.log_level))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd stderr is the journal, which
    // would otherwise store (and journalctl print) the raw escape sequences.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    for note in &config.deprecated {
        tracing::warn!("configuration: {note}");
    }
    match kuasar_vmm::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", kuasar_vmm::error::chain(e.as_ref()));
            eprintln!("kuasar-vmm: {}", kuasar_vmm::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
