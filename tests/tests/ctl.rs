//! `kuasarctl` against a private containerd + kuasar-vmm: one container in
//! its microVM (`ctr run -d`), then the CLI's list, inspect by prefix,
//! console, exec in the guest, its errors (unknown id, nothing listening),
//! version and config; CRI pods of the zero-shim and shim modes, with their
//! mode and addresses.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kuasar_e2e::cri::{spec, Cri, PodGuard};
use kuasar_e2e::{cmd, paths, shared, EnvOptions, Output, BUSYBOX};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

fn kuasarctl(socket: &Path, args: &[&str]) -> Output {
    kuasarctl_with(socket, args, None)
}

fn kuasarctl_with(socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(paths::kuasarctl());
    c.arg("--socket").arg(socket).args(args);
    cmd::run(&mut c, stdin, CLI_TIMEOUT)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn env() -> kuasar_e2e::env::Shared {
    let cli = paths::kuasarctl();
    assert!(
        cli.is_file(),
        "{} is missing: run `cargo build --release --workspace --exclude kuasar-agent`",
        cli.display()
    );
    shared(EnvOptions { sandboxer: true })
}

#[test]
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn kuasarctl_lists_inspects_and_reads_the_console() {
    let env = env();
    let socket = env.vmm_socket();
    let id = env.unique_id("ctl");
    let (guard, out) = env.run_vm_detached(&id, &["sleep", "3600"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());

    // list: the sandbox, its running VMM and its one container.
    let out = kuasarctl(&socket, &["list"]);
    assert!(out.success(), "{out}");
    eprintln!("kuasarctl list:\n{}", out.stdout);
    let short: String = id.chars().take(12).collect();
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&short))
        .unwrap_or_else(|| panic!("no row for {id}: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "podsandbox", "{row}");
    assert_eq!(cells[2], "running", "{row}");
    let pid: i32 = cells[3]
        .parse()
        .unwrap_or_else(|_| panic!("VMM pid in {row}"));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(comm.contains("qemu"), "pid {pid} is {comm:?}, not the VMM");
    assert_eq!(cells[6], "1", "containers: {row}");

    let out = kuasarctl(&socket, &["list", "-o", "json"]);
    assert!(out.success(), "{out}");
    let all = json(&out);
    let s = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not listed: {out}"));
    assert_eq!(s["vmm_pid"], pid, "{s}");
    assert_eq!(s["containers"][0]["id"], id.as_str(), "{s}");
    assert_eq!(s["containers"][0]["state"], "running", "{s}");

    // inspect by a unique prefix.
    let prefix = &id[..id.len() - 1];
    let out = kuasarctl(&socket, &["inspect", prefix]);
    assert!(out.success(), "{out}");
    eprintln!("kuasarctl inspect {prefix}:\n{}", out.stdout);
    let one = json(&out);
    assert_eq!(one["id"], id.as_str(), "{one}");
    let console_log = one["files"]["console_log"].as_str().unwrap_or_default();
    assert!(Path::new(console_log).is_file(), "{one}");
    assert!(one["vcpus"].as_u64().unwrap_or(0) >= 1, "{one}");

    // console: what the guest printed.
    let out = kuasarctl(&socket, &["console", &id]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("agent ready"), "{out}");
    let on_disk = std::fs::read(console_log).unwrap_or_default();
    assert!(
        on_disk.starts_with(&out.raw_stdout) || out.raw_stdout.starts_with(&on_disk),
        "console output differs from {console_log}"
    );

    let pid = one["containers"][0]["pid"].as_u64().unwrap_or(0);
    exec_runs_in_the_guest_outside_the_container(&socket, &id, pid);

    // An unknown id: exit 1, the id named.
    let out = kuasarctl(&socket, &["inspect", "no-such-sandbox"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no sandbox no-such-sandbox"), "{out}");
    let out = kuasarctl(&socket, &["console", "no-such-sandbox"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no-such-sandbox"), "{out}");

    // version: both sides.
    let out = kuasarctl(&socket, &["version"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("kuasarctl "), "{out}");
    assert!(out.stdout.contains("kuasar-vmm "), "{out}");

    // A socket nobody listens on (bound once, then closed), and none at all.
    let dead = env.dir().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind a socket"));
    for socket in [dead.clone(), env.dir().join("missing.sock")] {
        let out = kuasarctl(&socket, &["list"]);
        assert_eq!(out.code, Some(1), "{out}");
        let expected = format!("cannot reach kuasar-vmm at {}", socket.display());
        assert!(out.stderr.contains(&expected), "{out}");
        assert!(out.stderr.contains("is it running?"), "{out}");
    }
    let _ = std::fs::remove_file(&dead);

    // config containerd needs no daemon.
    let out = kuasarctl(&dead, &["config", "containerd"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("sandboxer = \"podsandbox\""), "{out}");

    // console --follow ends when the sandbox is gone.
    let mut c = Command::new(paths::kuasarctl());
    c.arg("--socket")
        .arg(&socket)
        .args(["console", "--follow", &id]);
    let follow = cmd::spawn(&mut c, None);
    std::thread::sleep(Duration::from_secs(1));
    drop(guard);
    let out = follow.wait(CLI_TIMEOUT);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("agent ready"), "{out}");
    env.assert_clean();
}

/// `kuasarctl exec` in the VM of sandbox `id`, whose one container runs
/// `sleep 3600` as guest pid `pid`.
fn exec_runs_in_the_guest_outside_the_container(socket: &Path, id: &str, pid: u64) {
    assert!(pid > 1, "no guest pid for the container of {id}");
    // The guest's PID 1 is the agent (/init), by a unique prefix of the id.
    let prefix = &id[..id.len() - 1];
    let out = kuasarctl(socket, &["exec", prefix, "--", "cat", "/proc/1/comm"]);
    eprintln!("kuasarctl exec {prefix} -- cat /proc/1/comm:\n{out}");
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout, "init\n", "{out}");

    // Outside the container: another mount namespace than its process's,
    // the guest's own root (crun is there, not in the container), and the
    // container's processes in view.
    let script = format!(
        "readlink /proc/self/ns/mnt; readlink /proc/{pid}/ns/mnt; cat /proc/{pid}/comm; \
         test -e /usr/bin/crun && echo guest-root; \
         test -e /proc/{pid}/root/usr/bin/crun || echo not-the-container-root"
    );
    let out = kuasarctl(socket, &["exec", id, "--", "sh", "-c", &script]);
    eprintln!("kuasarctl exec {id} -- sh -c '...':\n{out}");
    assert!(out.success(), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("mnt:["), "{out}");
    assert_ne!(
        lines[0], lines[1],
        "the same mount namespace as the container: {out}"
    );
    assert_eq!(
        lines[2..],
        ["sleep", "guest-root", "not-the-container-root"],
        "{out}"
    );

    // The exit status and stderr pass through.
    let out = kuasarctl(
        socket,
        &["exec", id, "--", "sh", "-c", "echo oops >&2; exit 3"],
    );
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("", "oops\n"),
        "{out}"
    );

    // stdin with -i, none without.
    let input = b"hello from the host\n";
    let out = kuasarctl_with(socket, &["exec", "-i", id, "--", "cat"], Some(input));
    assert!(out.success(), "{out}");
    assert_eq!(out.raw_stdout, input, "{out}");
    let out = kuasarctl_with(socket, &["exec", id, "--", "cat"], Some(input));
    assert!(out.success() && out.stdout.is_empty(), "{out}");

    // The timeout kills the command.
    let out = kuasarctl(
        socket,
        &["exec", "--timeout", "2", id, "--", "sleep", "100"],
    );
    eprintln!("kuasarctl exec --timeout 2 {id} -- sleep 100:\n{out}");
    assert_eq!(out.code, Some(137), "{out}");
    assert!(
        out.stderr.contains("killed after its timeout of 2 s"),
        "{out}"
    );
    assert!(out.elapsed < Duration::from_secs(20), "{out}");

    // A program the guest does not have; a sandbox nobody knows.
    let out = kuasarctl(socket, &["exec", id, "--", "no-such-program"]);
    eprintln!("kuasarctl exec {id} -- no-such-program:\n{out}");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("no-such-program: no such program in the guest"),
        "{out}"
    );
    let out = kuasarctl(socket, &["exec", "no-such-sandbox", "--", "true"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no sandbox no-such-sandbox"), "{out}");
}

#[test]
fn kuasarctl_shows_the_mode_of_a_pod() {
    let env = env();
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    // One pod at a time: one VM at a time.
    for (handler, mode) in [
        ("kuasar-vmm-zero", "zero-shim"),
        ("kuasar-vmm-shim", "shim"),
    ] {
        let name = env.unique_id("ctl-pod");
        let log_dir = env.dir().join("pod-logs").join(&name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let pod = PodGuard::run(&cri, spec::pod(&name, &log_dir), handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
        let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
        let cid = cri
            .create_container(&pod.id, &c, &pod.config)
            .expect("CreateContainer");
        cri.start_container(&cid).expect("StartContainer");

        let out = kuasarctl(&env.vmm_socket(), &["list"]);
        assert!(out.success(), "{out}");
        eprintln!("kuasarctl list ({handler}):\n{}", out.stdout);
        let out = kuasarctl(&env.vmm_socket(), &["inspect", &pod.id[..12]]);
        assert!(out.success(), "{out}");
        let one = json(&out);
        assert_eq!(one["id"], pod.id.as_str(), "{one}");
        assert_eq!(one["mode"], mode, "{one}");
        assert_eq!(one["state"], "running", "{one}");
        assert!(!one["ips"].as_array().unwrap().is_empty(), "{one}");
        assert_eq!(
            one["files"]["task_socket"].is_string(),
            mode == "zero-shim",
            "{one}"
        );
        let containers = one["containers"].as_array().unwrap();
        assert!(
            containers
                .iter()
                .any(|c| c["id"] == cid.as_str() && c["state"] == "running"),
            "{one}"
        );
        pod.remove().expect("remove the pod");
    }
    env.assert_clean();
}
