//! Pod networking with Kubernetes CNI semantics, without CRI: a network
//! namespace holding a veth `eth0` with the pod's address (as the CNI bridge
//! plugin leaves it; here the host end of the veth holds the gateway
//! address instead of a bridge), and a pod of two containers joined to it
//! through the annotations CRI writes. The VM must own the pod's address:
//! the host reaches a server in the pod, the pod reaches the host, and the
//! pod's containers talk over 127.0.0.1.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kuasar_e2e::{cmd, shared, EnvOptions, BUSYBOX, RUNTIME};

const CMD_TIMEOUT: Duration = Duration::from_secs(20);
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const POD_PAGE: &str = "hello-from-pod";
const HOST_PAGE: &str = "hello-from-host";

fn ip(args: &[&str]) -> Result<String, String> {
    let out = cmd::run(Command::new("ip").args(args), None, CMD_TIMEOUT);
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(format!("{out}"))
    }
}

/// A CNI-like pod network: namespace `name` with `eth0` = `pod_ip`/24 and a
/// default route via `host_ip`, which the veth's host end holds. Removed on
/// drop (also when the test fails).
struct PodNetwork {
    name: String,
    host_if: String,
    host_ip: String,
    pod_ip: String,
}

impl PodNetwork {
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        // A /24 of its own per test process.
        let subnet = format!("10.231.{}", 10 + pid % 240);
        let net = PodNetwork {
            name: format!("kuasar-e2e-net-{pid}"),
            host_if: format!("kne{}", pid % 1_000_000),
            host_ip: format!("{subnet}.1"),
            pod_ip: format!("{subnet}.2"),
        };
        let ns = net.name.as_str();
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            "name",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip),
            "dev",
            &net.host_if,
        ])?;
        ip(&["link", "set", "dev", &net.host_if, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", net.pod_ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "dev", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &net.host_ip])?;
        Ok(net)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // Deleting the namespace deletes eth0 and with it its peer.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", "dev", &self.host_if]);
    }
}

/// Serves `HOST_PAGE` on the host end of the pod network, for the rest of
/// the test process.
fn host_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("bind the host server");
    let addr = listener.local_addr().expect("host server address");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{HOST_PAGE}",
                HOST_PAGE.len()
            );
        }
    });
    addr
}

/// GETs `path` from `addr` until it answers or `timeout` passes.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            Ok(page)
        };
        match attempt() {
            Ok(page) if page.contains("200 OK") => return Ok(page),
            Ok(page) => last = page,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "GET http://{addr}{path}: no answer within {timeout:?}; last: {last}"
    ))
}

fn skip_reason() -> Option<&'static str> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("no `ip` (iproute2)");
    }
    None
}

#[test]
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn pod_ip_belongs_to_the_vm_and_its_containers_share_it() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP pod network test: {why}");
        return;
    }
    let env = shared(EnvOptions { sandboxer: true });
    let net = PodNetwork::create().unwrap_or_else(|e| panic!("create the pod network: {e}"));
    let pod = env.unique_id("netpod");
    let app = env.unique_id("netapp");
    // Dropped in reverse order: the app container goes first, then the pod.
    let _pod_guard = env.guard(&pod);
    let _app_guard = env.guard(&app);
    let with_ns = format!("network:{}", net.path());
    let sandbox_annotations = [
        format!("{CONTAINER_TYPE}=sandbox"),
        format!("{SANDBOX_ID}={pod}"),
    ];

    // The pod's sandbox container serves a page on port 80.
    let serve = format!(
        "mkdir -p /www && echo {POD_PAGE} > /www/index.html && exec httpd -f -p 80 -h /www"
    );
    let out = env.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        "--annotation",
        &sandbox_annotations[0],
        "--annotation",
        &sandbox_annotations[1],
        BUSYBOX,
        &pod,
        "sh",
        "-c",
        &serve,
    ]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert!(
        env.wait_task_status(&pod, "RUNNING", Duration::from_secs(60)),
        "{}",
        env.diagnostics()
    );

    // The pod's namespace now ties eth0 to a tap.
    let links = ip(&["-n", &net.name, "link", "show"]).unwrap();
    assert!(links.contains("tap0_kuasar"), "{links}");

    // 1. The host reaches the server at the pod's IP.
    let pod_addr: SocketAddr = format!("{}:80", net.pod_ip).parse().unwrap();
    let page = http_get(pod_addr, "/index.html", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", env.diagnostics()));
    assert!(page.contains(POD_PAGE), "{page}");

    // 2. The pod reaches the host end of its network, and has the pod's
    //    address on eth0 (the guest NIC, renamed and configured).
    let host_addr = host_server(&net.host_ip);
    let out = env.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "wget-host",
        &pod,
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{host_addr}/"),
    ]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert_eq!(out.stdout.trim(), HOST_PAGE, "{out}");
    let out = env.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "addr",
        &pod,
        "ip",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(
        out.stdout.contains(&format!("inet {}/24", net.pod_ip)),
        "{out}"
    );

    // 3. A second container of the pod reaches the first over 127.0.0.1:
    //    both run in the VM's network namespace.
    let out = env.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        "--annotation",
        &format!("{CONTAINER_TYPE}=container"),
        "--annotation",
        &sandbox_annotations[1],
        BUSYBOX,
        &app,
        "wget",
        "-q",
        "-O",
        "-",
        "http://127.0.0.1/index.html",
    ]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert_eq!(out.stdout.trim(), POD_PAGE, "{out}");
    assert_eq!(
        env.qemu_count(),
        1,
        "one VM for the pod\n{}",
        env.diagnostics()
    );

    // Stopping the pod gives the namespace back as CNI left it: no tap, no
    // tc qdisc on eth0; the namespace itself stays (it is CNI's).
    env.force_remove(&app);
    env.force_remove(&pod);
    env.assert_clean();
    let links = ip(&["-n", &net.name, "link", "show"]).unwrap();
    assert!(!links.contains("_kuasar"), "{links}");
    let qdiscs = cmd::run(
        Command::new("tc").args(["-n", &net.name, "qdisc", "show", "dev", "eth0"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(!qdiscs.stdout.contains("ingress"), "{qdiscs}");
    assert!(Path::new(&net.path()).exists());
}
