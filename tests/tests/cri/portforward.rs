//! CRI PortForward (`kubectl port-forward`): containerd dials 127.0.0.1:PORT
//! in the pod's network namespace. Under runc the container listens there;
//! in a VM pod kuasar-vmm's relay answers (a netfilter redirect of every
//! loopback port to a listener on 127.0.0.1 in that namespace) and carries
//! the bytes to 127.0.0.1:PORT in the guest.
use std::process::Command;
use std::time::Duration;

use kuasar_e2e::cri::proto::ContainerState;
use kuasar_e2e::cri::{spec, PortForwardSession};
use kuasar_e2e::netns::{
    in_netns, output_text, recorded_netns, relay_socket, PORTFORWARD_CHAIN as CHAIN,
};
use kuasar_e2e::BUSYBOX;

use super::Handler;

/// An echo server (`nc -ll -e cat`) on every address.
const ECHO_PORT: i32 = 18080;
/// An HTTP server on 127.0.0.1 only.
const HTTP_PORT: i32 = 18081;
/// Nobody listens here.
const CLOSED_PORT: i32 = 18082;
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

const SERVERS: &str = "mkdir -p /www && echo pf-page > /www/index.html \
     && httpd -p 127.0.0.1:18081 -h /www && exec nc -ll -p 18080 -e cat";
/// Both servers listen (ports 0x46A0 and 0x46A1 in /proc/net/tcp or tcp6,
/// state 0A; busybox nc listens on `::`).
const WAIT_LISTENING: &str = "for i in $(seq 200); do \
     t=$(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null); \
     echo \"$t\" | grep -qiE ':46A0 [0-9A-F]+:0000 0A' && \
     echo \"$t\" | grep -qiE ':46A1 [0-9A-F]+:0000 0A' && exit 0; sleep 0.1; done; \
     cat /proc/net/tcp /proc/net/tcp6; exit 1";

/// A payload that shows reordering or loss: 200 KiB of numbered lines.
fn payload() -> Vec<u8> {
    let mut p = Vec::new();
    let mut n = 0;
    while p.len() < 200 << 10 {
        p.extend_from_slice(format!("line {n:06}\n").as_bytes());
        n += 1;
    }
    p
}

/// Whether kuasar-vmm holds the socket with inode `ino`.
fn sandboxer_holds(h: &Handler, ino: &str) -> bool {
    let pid = h.env.sandboxer_pid().expect("kuasar-vmm runs");
    let wanted = format!("socket:[{ino}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == wanted))
        })
        .unwrap_or(false)
}

fn forward(h: &Handler, pod_id: &str, port: i32) -> PortForwardSession {
    let url = h
        .cri
        .port_forward(pod_id, &[port])
        .unwrap_or_else(|e| panic!("PortForward {port}: {e:?}\n{}", h.diag()));
    PortForwardSession::open(&url, SESSION_TIMEOUT)
        .unwrap_or_else(|e| panic!("open the port-forward session: {e}\n{}", h.diag()))
}

/// Bytes both ways through PortForward to a server on every address and to
/// one on 127.0.0.1 only; a port nobody listens on ends the session without
/// data; in a VM pod the relay listens in the pod's namespace only, and
/// nothing of it is left once the pod is removed.
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
pub fn port_forward(h: &Handler) {
    let pod = h.own_pod("portforward");
    let pod_ref = (pod.id.clone(), pod.config.clone());
    let server = h.start(
        &pod_ref,
        &spec::container("pf-servers", BUSYBOX, &["sh", "-c", SERVERS]),
    );
    h.wait_state(&server.id, ContainerState::ContainerRunning);
    h.sh(&server.id, WAIT_LISTENING);

    let sent = payload();
    let mut s = forward(h, &pod.id, ECHO_PORT);
    s.send(&sent).expect("send to the echo server");
    let got = s
        .read_until(SESSION_TIMEOUT, |f| f.data.len() >= sent.len())
        .unwrap_or_else(|e| panic!("{e}\n{}", h.diag()))
        .clone();
    assert!(
        got.data == sent,
        "echo of {} bytes: got {} bytes, error {:?}",
        sent.len(),
        got.data.len(),
        got.error
    );
    s.close();
    eprintln!(
        "PortForward ({}) {ECHO_PORT}: {} bytes echoed",
        h.name,
        sent.len()
    );

    let mut s = forward(h, &pod.id, HTTP_PORT);
    s.send(b"GET / HTTP/1.0\r\n\r\n").expect("send the request");
    let got = s
        .read_until(SESSION_TIMEOUT, |f| {
            String::from_utf8_lossy(&f.data).contains("pf-page")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", h.diag()))
        .clone();
    let page = String::from_utf8_lossy(&got.data);
    assert!(
        page.contains("pf-page"),
        "HTTP through PortForward: {page:?} {:?}",
        got.error
    );
    s.close();

    let mut s = forward(h, &pod.id, CLOSED_PORT);
    let got = s
        .read_until(SESSION_TIMEOUT, |_| false)
        .unwrap_or_else(|e| panic!("a refused port must end the session: {e}\n{}", h.diag()))
        .clone();
    assert!(
        got.data.is_empty(),
        "data from a closed port: {:?}",
        got.data
    );
    eprintln!(
        "PortForward ({}) {CLOSED_PORT} (nobody listens): session ended, error {:?}",
        h.name, got.error
    );

    if !h.vm {
        return;
    }
    let netns = recorded_netns(&h.env.state_dir(), &pod.id);
    let ino = relay_socket(&netns)
        .unwrap_or_else(|| panic!("no relay listener of kuasar-vmm in {netns}"));
    let rules = in_netns(&netns, "iptables", &["-t", "nat", "-S"]);
    assert!(rules.contains(&format!("-A OUTPUT -j {CHAIN}")), "{rules}");
    let root = output_text(Command::new("ss").arg("-Htlnp"));
    assert!(
        !root.contains("kuasar-vmm"),
        "kuasar-vmm listens on TCP in the host's namespace:\n{root}"
    );
    assert!(sandboxer_holds(h, &ino));

    drop(server);
    h.cri
        .stop_pod(&pod.id)
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e:?}\n{}", h.diag()));
    let netns_left = std::path::Path::new(&netns).exists();
    if netns_left {
        let rules = in_netns(&netns, "iptables", &["-t", "nat", "-S"]);
        assert!(
            !rules.contains(CHAIN),
            "the redirect outlived the pod's stop: {rules}"
        );
    }
    eprintln!(
        "PortForward ({}): after StopPodSandbox the relay socket is closed; the pod's netns {}",
        h.name,
        if netns_left {
            "has no redirect left"
        } else {
            "is gone"
        }
    );
    assert!(
        !sandboxer_holds(h, &ino),
        "the relay listener outlived the pod's stop"
    );
    pod.remove()
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e:?}\n{}", h.diag()));
    assert!(
        !sandboxer_holds(h, &ino),
        "the relay listener outlived the pod"
    );
}
