//! kuasar-vmm's Prometheus endpoint (`[metrics] address`) against a
//! private containerd + kuasar-vmm: a scrape before any VM and after one
//! container runs in its microVM (the families, that sandbox's VMM memory
//! and CPU time, its boot and the agent calls it took), what else the
//! endpoint answers; no TCP port at all without the setting; a taken or
//! bad address stops kuasar-vmm at start-up naming the setting.
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use kuasar_e2e::sandboxer::{run_expecting_exit, SandboxerConfig};
use kuasar_e2e::{shared, EnvOptions};

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A port nothing listens on now (bound once, then closed).
fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
}

/// `GET path` on `address`: the status line and the body.
fn get(address: SocketAddr, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {address}: {e}"));
    conn.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("read the answer to GET {path}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

fn scrape(address: SocketAddr) -> String {
    let (status, body) = get(address, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// The value of the sample `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// TCP ports process `pid` listens on (its sockets in LISTEN state).
fn listening_ports(pid: i32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode (field 9).
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or_default();
                ports.extend(u16::from_str_radix(port, 16).ok());
            }
        }
    }
    ports
}

#[test]
fn a_scrape_shows_a_running_sandbox() {
    let env = shared(EnvOptions { sandboxer: false });
    let address = free_address();
    let mut config = env.sandboxer_config();
    config.metrics_address = Some(address.to_string());
    env.start_sandboxer(config).expect("start kuasar-vmm");
    let pid = env.sandboxer_pid().expect("kuasar-vmm's pid");
    assert!(
        listening_ports(pid).contains(&address.port()),
        "kuasar-vmm does not listen on {address}"
    );

    let before = scrape(address);
    for series in [
        "kuasar_sandboxes{mode=\"podsandbox\",state=\"running\"}",
        "kuasar_recoveries_total{outcome=\"adopted\"}",
        "kuasar_vm_boot_seconds_count",
        "kuasar_pod_start_seconds_count",
    ] {
        assert_eq!(value(&before, series), Some(0.0), "{series}:\n{before}");
    }

    let id = env.unique_id("metrics");
    let (guard, out) = env.run_vm_detached(&id, &["sleep", "3600"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    let text = scrape(address);
    eprintln!("GET /metrics with one VM:\n{text}");
    let running = "kuasar_sandboxes{mode=\"podsandbox\",state=\"running\"}";
    assert_eq!(value(&text, running), Some(1.0), "{text}");
    let memory = value(
        &text,
        &format!("kuasar_vm_memory_bytes{{sandbox=\"{id}\"}}"),
    );
    assert!(
        memory.is_some_and(|m| m > 1e6),
        "VMM memory {memory:?}:\n{text}"
    );
    let cpu = value(
        &text,
        &format!("kuasar_vm_cpu_seconds_total{{sandbox=\"{id}\"}}"),
    );
    assert!(cpu.is_some_and(|c| c > 0.0), "VMM CPU {cpu:?}:\n{text}");
    for series in [
        "kuasar_vm_boot_seconds_count",
        "kuasar_pod_start_seconds_count",
        "kuasar_agent_call_seconds_count{method=\"Ping\"}",
        "kuasar_agent_call_seconds_count{method=\"CreateContainer\"}",
    ] {
        let n = value(&text, series);
        assert!(n.is_some_and(|n| n >= 1.0), "{series} = {n:?}:\n{text}");
    }
    let boot = value(&text, "kuasar_vm_boot_seconds_sum").unwrap_or(0.0);
    let start = value(&text, "kuasar_pod_start_seconds_sum").unwrap_or(0.0);
    assert!(
        boot > 0.0 && start >= boot,
        "boot {boot} s, pod start {start} s"
    );

    // Nothing but GET /metrics.
    let (status, _) = get(address, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // A sandbox gone has no series left.
    drop(guard);
    env.assert_clean();
    let text = scrape(address);
    assert!(!text.contains(&format!("sandbox=\"{id}\"")), "{text}");
    assert_eq!(value(&text, running), Some(0.0), "{text}");
}

#[test]
fn without_the_setting_nothing_listens() {
    let env = shared(EnvOptions { sandboxer: false });
    // The log holds every run of this environment: this run's is the end.
    let earlier = env.sandboxer_log().len();
    env.start_sandboxer(env.sandboxer_config())
        .expect("start kuasar-vmm");
    let pid = env.sandboxer_pid().expect("kuasar-vmm's pid");
    assert_eq!(
        listening_ports(pid),
        Vec::<u16>::new(),
        "TCP ports of kuasar-vmm"
    );
    let log = env.sandboxer_log();
    let this_run = log.get(earlier..).unwrap_or_default();
    assert!(!this_run.contains("metrics endpoint"), "{this_run}");
}

#[test]
fn a_taken_or_bad_address_stops_kuasar_vmm_naming_the_setting() {
    let env = shared(EnvOptions { sandboxer: false });
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken_address = taken.local_addr().unwrap().to_string();
    for (name, address) in [
        ("taken", taken_address.as_str()),
        ("hostname", "localhost:9464"),
    ] {
        let mut config = SandboxerConfig::for_dir(env.dir());
        config.socket = env.dir().join("bad.sock");
        config.state_dir = env.dir().join("bad");
        config.metrics_address = Some(address.to_owned());
        let file = format!("metrics-{name}");
        let out = run_expecting_exit(env.dir(), &config, &file, Duration::from_secs(20));
        println!("{out}");
        assert!(
            !out.timed_out && out.code.is_some_and(|c| c != 0),
            "kuasar-vmm with a {name} metrics address did not refuse to start:\n{out}"
        );
        let text = out.combined();
        assert!(text.contains("`metrics.address`"), "{out}");
        if name == "taken" {
            assert!(text.contains(address), "{out}");
        }
        assert!(!config.socket.exists(), "{out}");
    }
    drop(taken);
}
