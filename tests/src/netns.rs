//! Looking into a pod's network namespace from the host: what kuasar-vmm
//! recorded for it, and its port-forwarding relay.
use std::path::Path;
use std::process::Command;

/// The nat chain of kuasar-vmm's port-forwarding relay in a pod's netns.
pub const PORTFORWARD_CHAIN: &str = "KUASAR-PORTFORWARD";

/// Runs `cmd`; its stdout then its stderr.
pub fn output_text(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// In the network namespace at `netns`: `prog args`; stdout then stderr.
pub fn in_netns(netns: &str, prog: &str, args: &[&str]) -> String {
    output_text(
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg(prog)
            .args(args),
    )
}

/// The pod's netns as kuasar-vmm recorded it in `<state_dir>/<pod>/state.json`.
pub fn recorded_netns(state_dir: &Path, pod_id: &str) -> String {
    let path = state_dir.join(pod_id).join("state.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("state.json is JSON");
    v.pointer("/net/netns")
        .and_then(|n| n.as_str())
        .unwrap_or_else(|| panic!("no netns in {text}"))
        .to_owned()
}

/// The inode of kuasar-vmm's listening socket in `netns` (from `ss`), if it
/// has one; panics when it listens anywhere but on loopback.
pub fn relay_socket(netns: &str) -> Option<String> {
    let ss = in_netns(netns, "ss", &["-Htlnpe"]);
    let line = ss.lines().find(|l| l.contains("kuasar-vmm"))?;
    assert!(
        line.contains("127.0.0.1:"),
        "the relay listens on loopback only: {line}"
    );
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("ino:"))
        .map(str::to_owned)
}
