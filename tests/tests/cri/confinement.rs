//! The VM's QEMU confined on the node: it parses the untrusted guest's
//! device traffic, so it runs under its own seccomp filter.
use super::Handler;

/// A pod's QEMU runs in seccomp filter mode (`Seccomp: 2` in its
/// /proc status), with the pod working as usual (the suite's other tests run
/// through the same QEMU: 9p, the agent's channel, networking, fd passing).
pub fn qemu_is_confined(h: &Handler) {
    if !h.vm {
        eprintln!("{}: skipped: no VM, no QEMU to confine", h.name);
        return;
    }
    let (pod, _) = h.shared_pod();
    let pid_file = h.env.state_dir().join(&pod).join("qemu.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {}: {e}\n{}", h.name, pid_file.display(), h.diag()));
    let status_path = format!("/proc/{}/status", pid.trim());
    let status = std::fs::read_to_string(&status_path)
        .unwrap_or_else(|e| panic!("{}: {status_path}: {e}", h.name));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: no {name} in {status_path}", h.name))
            .to_owned()
    };
    assert_eq!(field("Seccomp:"), "2", "{}: QEMU's seccomp mode", h.name);
    let filters: u32 = field("Seccomp_filters:").parse().unwrap_or(0);
    assert!(filters >= 1, "{}: QEMU has no seccomp filter", h.name);
    eprintln!(
        "{}: QEMU pid {} runs with Seccomp 2 ({filters} filters)",
        h.name,
        pid.trim()
    );
}
