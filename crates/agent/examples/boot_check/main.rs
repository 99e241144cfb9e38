//! Boots the guest image with the QEMU command line of docs/design.md and
//! drives kuasar-agent over the virtio-serial channel: Ping, a container
//! (`echo hello; uname -r; exit 7`), a long-running container with stdin,
//! an exec, a host reconnect, terminals, cgroup limits, seccomp, signals,
//! ListPids/Stats, removal and the OCI runtime's (crun's) errors.
//!
//! ```text
//! scripts/build-guest.sh /var/lib/kuasar
//! cargo run -p kuasar-agent --example boot_check -- [--image-dir DIR] [--kernel FILE] [--keep] [--append PARAMS]
//!   (--kernel: a file of the image dir, default vmlinux; vmlinux-debian is Debian's kernel)
//! cargo run -p kuasar-agent --example boot_check -- --boots 5   # boot-to-Ping timings only
//! cargo run -p kuasar-agent --example boot_check -- --reconnect-gap-ms 0   # instant reconnect
//! cargo run -p kuasar-agent --example boot_check -- --bench 10   # OCI runtime op timings only
//! ```
//! QEMU is killed and the work directory removed whatever happens (`--keep`
//! keeps the directory, with console.log, for inspection). Needs root,
//! busybox-static, runc (for `runc spec`, a containerd-like default spec) and
//! qemu-system-x86.
mod bench;
mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::AgentClient;
use kuasar_api::agent::*;
use kuasar_api::ttrpc::context::{self, Context};
use vm::{boot, connect, host_tsc_khz, make_rootfs, make_spec, Vm};

type Res<T> = Result<T, String>;

fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

async fn read_all(c: &AgentClient, id: &str, exec: &str, stderr: bool) -> Res<String> {
    let mut out = Vec::new();
    loop {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            len: 65536,
            ..Default::default()
        };
        let r = if stderr {
            c.read_stderr(ctx(), &req).await
        } else {
            c.read_stdout(ctx(), &req).await
        }
        .map_err(|e| format!("read {id}/{exec}: {e}"))?;
        if r.data.is_empty() {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend(r.data);
    }
}

async fn wait(c: &AgentClient, id: &str, exec: &str) -> Res<u32> {
    let req = ProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    };
    let r = c
        .wait_process(ctx(), &req)
        .await
        .map_err(|e| format!("wait {id}/{exec}: {e}"))?;
    Ok(r.exit_status)
}

fn check(cond: bool, what: String) -> Res<()> {
    if cond {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}"))
    }
}

async fn create(c: &AgentClient, dir: &Path, id: &str, args: &[&str], stdin: bool) -> Res<u32> {
    create_with(c, dir, id, args, stdin, false).await
}

async fn create_with(
    c: &AgentClient,
    dir: &Path,
    id: &str,
    args: &[&str],
    stdin: bool,
    terminal: bool,
) -> Res<u32> {
    create_spec(c, dir, id, make_spec(dir, args)?, stdin, terminal).await
}

async fn create_spec(
    c: &AgentClient,
    dir: &Path,
    id: &str,
    spec_json: Vec<u8>,
    stdin: bool,
    terminal: bool,
) -> Res<u32> {
    make_rootfs(&dir.join("shared").join(id).join("rootfs"))?;
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json,
        rootfs_path: format!("/run/kuasar/shared/{id}/rootfs"),
        stdin,
        stdout: true,
        stderr: !terminal,
        terminal,
        ..Default::default()
    };
    let r = c
        .create_container(ctx(), &req)
        .await
        .map_err(|e| format!("create {id}: {e}"))?;
    let cr = ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    c.start_container(ctx(), &cr)
        .await
        .map_err(|e| format!("start {id}: {e}"))?;
    Ok(r.pid)
}

/// Boots the VM and waits for a Ping answer; returns the client, the answer,
/// the milliseconds from QEMU spawn to the answer and the TSC kHz used.
async fn boot_and_ping(vm: &mut Vm, opts: &Opts) -> Res<(AgentClient, PingResponse, u128, u64)> {
    let dir = vm.dir.clone();
    std::fs::create_dir_all(dir.join("shared")).map_err(|e| e.to_string())?;
    let tsc = host_tsc_khz().ok_or("no 'tsc: Detected' line in dmesg")?;
    let t0 = Instant::now();
    vm.qemu = Some(boot(&opts.image_dir, &opts.kernel, &dir, tsc, &opts.extra)?);
    let c = connect(&dir.join("agent.sock"), t0 + Duration::from_secs(10)).await?;
    let ping = c
        .ping(ctx(), &Empty::new())
        .await
        .map_err(|e| format!("ping: {e}"))?;
    Ok((c, ping, t0.elapsed().as_millis(), tsc))
}

/// The agent's uptime stamp on its "guest ready" console line (containers
/// wait for it), once the line shows up.
async fn guest_ready_at(console: &Path) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("guest ready")) {
            let stamp = line.split_whitespace().next().unwrap_or("?");
            // The agent's own measure of the modules loaded before ready.
            let modules = text
                .lines()
                .find(|l| l.contains("modules loaded") && l.contains("ForContainers"))
                .and_then(|l| l.split("elapsed_ms=").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("?");
            return Some(format!("{stamp} (loading them took {modules} ms)"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Command line options.
struct Opts {
    image_dir: PathBuf,
    /// The kernel: a file of `image_dir` (`vmlinux`, `vmlinux-debian`) or a path.
    kernel: PathBuf,
    keep: bool,
    extra: String,
    boots: usize,
    bench: usize,
    reconnect_gap_ms: u64,
}

#[allow(clippy::too_many_lines)] // the check's steps, read top to bottom
async fn run(vm: &mut Vm, opts: &Opts) -> Res<()> {
    let dir = vm.dir.clone();
    let (c, ping, boot_ms, tsc) = boot_and_ping(vm, opts).await?;
    println!(
        "boot: QEMU spawn -> Ping answered in {boot_ms} ms (agent {}, kernel {}, tsc_early_khz={tsc})",
        ping.agent_version, ping.kernel_release
    );
    if opts.bench > 0 {
        return bench::run(&c, &dir, opts.bench).await;
    }

    // 1. A container that prints and exits 7.
    let t = Instant::now();
    let pid = create(
        &c,
        &dir,
        "c1",
        &["sh", "-c", "echo hello; uname -r; exit 7"],
        false,
    )
    .await?;
    let out = read_all(&c, "c1", "", false).await?;
    let status = wait(&c, "c1", "").await?;
    println!(
        "c1: pid {pid}, create+start+run {} ms",
        t.elapsed().as_millis()
    );
    check(
        out == format!("hello\n{}\n", ping.kernel_release),
        format!("c1 stdout {out:?}"),
    )?;
    check(status == 7, format!("c1 exit status {status}"))?;
    // After the exit, reads still end cleanly and wait answers again.
    check(
        read_all(&c, "c1", "", false).await?.is_empty(),
        "c1 stdout at EOF".into(),
    )?;
    check(wait(&c, "c1", "").await? == 7, "c1 second wait".into())?;

    // 2. A long-running container fed through stdin.
    create(
        &c,
        &dir,
        "c2",
        &[
            "sh",
            "-c",
            "read line; echo got $line; read line; echo got2 $line; exec sleep 1000",
        ],
        true,
    )
    .await?;
    let w = WriteStreamRequest {
        container_id: "c2".into(),
        data: b"ping\n".to_vec(),
        ..Default::default()
    };
    c.write_stdin(ctx(), &w)
        .await
        .map_err(|e| format!("write stdin: {e}"))?;
    let r = ReadStreamRequest {
        container_id: "c2".into(),
        len: 100,
        ..Default::default()
    };
    let got = c
        .read_stdout(ctx(), &r)
        .await
        .map_err(|e| format!("read c2: {e}"))?;
    check(
        got.data == b"got ping\n",
        format!("c2 echoed {:?}", String::from_utf8_lossy(&got.data)),
    )?;

    // 3. The host disconnects (with a read pending) and reconnects: the
    // container lives on, and the abandoned read takes no output.
    let pending = {
        let c = c.clone();
        let r = r.clone();
        tokio::spawn(async move { c.read_stdout(ctx(), &r).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    pending.abort();
    let _ = pending.await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(opts.reconnect_gap_ms)).await;
    let t = Instant::now();
    let c = connect(
        &dir.join("agent.sock"),
        Instant::now() + Duration::from_secs(5),
    )
    .await?;
    c.ping(ctx(), &Empty::new())
        .await
        .map_err(|e| format!("ping after reconnect: {e}"))?;
    println!(
        "reconnect: Ping answered {} ms after reconnecting",
        t.elapsed().as_millis()
    );
    let cr = ContainerRequest {
        container_id: "c2".into(),
        ..Default::default()
    };
    let pids = c
        .list_pids(ctx(), &cr)
        .await
        .map_err(|e| format!("list pids: {e}"))?;
    check(!pids.pids.is_empty(), format!("c2 pids {:?}", pids.pids))?;
    let w = WriteStreamRequest {
        container_id: "c2".into(),
        data: b"two\n".to_vec(),
        ..Default::default()
    };
    c.write_stdin(ctx(), &w)
        .await
        .map_err(|e| format!("write stdin: {e}"))?;
    let got = c
        .read_stdout(ctx(), &r)
        .await
        .map_err(|e| format!("read c2 after reconnect: {e}"))?;
    check(
        got.data == b"got2 two\n",
        format!(
            "c2 output after reconnect {:?}",
            String::from_utf8_lossy(&got.data)
        ),
    )?;

    // 4. An exec in the running container.
    let process = serde_json::json!({
        "args": ["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"],
        "cwd": "/", "env": ["PATH=/bin:/usr/bin"], "user": {"uid": 0, "gid": 0}
    });
    let t = Instant::now();
    let e = ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: "e1".into(),
        process_json: serde_json::to_vec(&process).map_err(|e| e.to_string())?,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    c.exec_process(ctx(), &e)
        .await
        .map_err(|e| format!("exec: {e}"))?;
    let out = read_all(&c, "c2", "e1", false).await?;
    let err = read_all(&c, "c2", "e1", true).await?;
    let status = wait(&c, "c2", "e1").await?;
    println!("exec: {} ms", t.elapsed().as_millis());
    check(
        out == "exec-out\n" && err == "exec-err\n",
        format!("exec out {out:?} err {err:?}"),
    )?;
    check(status == 3, format!("exec exit status {status}"))?;
    // containerd deletes an exec when it ends: its id can be used again.
    let again = c.exec_process(ctx(), &e).await;
    check(
        again.is_ok(),
        format!("reusing an exited exec's id: {again:?}"),
    )?;
    let out = read_all(&c, "c2", "e1", false).await?;
    let status = wait(&c, "c2", "e1").await?;
    check(
        out == "exec-out\n" && status == 3,
        format!("reused exec out {out:?} status {status}"),
    )?;

    // 5. An exec with a terminal: resize, input echo, output with CRLF.
    let process = serde_json::json!({
        "args": ["sh", "-c", "read x; echo \"x=$x\"; stty size; tty; exit 5"],
        "cwd": "/", "env": ["PATH=/bin:/usr/bin", "TERM=xterm"], "user": {"uid": 0, "gid": 0}
    });
    let e = ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: "tty1".into(),
        process_json: serde_json::to_vec(&process).map_err(|e| e.to_string())?,
        stdin: true,
        stdout: true,
        terminal: true,
        ..Default::default()
    };
    c.exec_process(ctx(), &e)
        .await
        .map_err(|e| format!("exec tty: {e}"))?;
    let rs = ResizeTtyRequest {
        container_id: "c2".into(),
        exec_id: "tty1".into(),
        width: 100,
        height: 40,
        ..Default::default()
    };
    c.resize_tty(ctx(), &rs)
        .await
        .map_err(|e| format!("resize: {e}"))?;
    let w = WriteStreamRequest {
        container_id: "c2".into(),
        exec_id: "tty1".into(),
        data: b"hi\n".to_vec(),
        ..Default::default()
    };
    c.write_stdin(ctx(), &w)
        .await
        .map_err(|e| format!("write tty: {e}"))?;
    let out = read_all(&c, "c2", "tty1", false).await?;
    let status = wait(&c, "c2", "tty1").await?;
    check(
        out.contains("x=hi\r\n") && out.contains("40 100\r\n") && out.contains("/dev/pts/"),
        format!("tty exec output {out:?}"),
    )?;
    check(status == 5, format!("tty exec exit status {status}"))?;
    check(
        read_all(&c, "c2", "tty1", true).await?.is_empty(),
        "tty exec has no separate stderr".into(),
    )?;
    create_with(&c, &dir, "c4", &["sh", "-c", "tty; exit 4"], false, true).await?;
    let out = read_all(&c, "c4", "", false).await?;
    let status = wait(&c, "c4", "").await?;
    check(
        out.starts_with("/dev/pts/") && status == 4,
        format!("tty container output {out:?}, exit status {status}"),
    )?;

    // 6. cgroup limits: the values reach the container's cgroup (seen through
    // a cgroup namespace) and are enforced: forks beyond pids.max fail, a
    // process growing past memory.max is OOM-killed.
    let mut spec: serde_json::Value =
        serde_json::from_slice(&make_spec(&dir, &["sh", "-c", LIMITS_SCRIPT])?)
            .map_err(|e| e.to_string())?;
    spec["linux"]["resources"]["memory"] = serde_json::json!({ "limit": 32 << 20 });
    spec["linux"]["resources"]["pids"] = serde_json::json!({ "limit": 8 });
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.push(serde_json::json!({ "type": "cgroup" }));
    }
    let spec = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    create_spec(&c, &dir, "c5", spec, false, false).await?;
    let out = read_all(&c, "c5", "", false).await?;
    let status = wait(&c, "c5", "").await?;
    check(
        out == format!("{}\n8\nforks=2\npids=7\nawk=137\n", 32 << 20) && status == 0,
        format!("c5 limits output {out:?}, exit status {status}"),
    )?;
    let s = c
        .stats(
            ctx(),
            &ContainerRequest {
                container_id: "c5".into(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("stats c5: {e}"))?;
    check(
        s.memory_limit_bytes == 32 << 20,
        format!("c5 stats memory limit {}", s.memory_limit_bytes),
    )?;

    // A seccomp profile (as containerd's default spec has one): crun applies
    // it with libseccomp; mkdir fails with EPERM where it would work.
    let mut spec: serde_json::Value = serde_json::from_slice(&make_spec(
        &dir,
        &[
            "sh",
            "-c",
            "mkdir /dev/shm/x 2>/dev/null; echo mkdir=$?; echo ok",
        ],
    )?)
    .map_err(|e| e.to_string())?;
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
    });
    let spec = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    create_spec(&c, &dir, "c7", spec, false, false).await?;
    let out = read_all(&c, "c7", "", false).await?;
    let status = wait(&c, "c7", "").await?;
    check(
        out == "mkdir=1\nok\n" && status == 0,
        format!("c7 seccomp output {out:?}, exit status {status}"),
    )?;

    // 7. A signal to all of a container's processes, by number (a real-time
    // one: no name), through the OCI runtime's `kill --all`.
    create(
        &c,
        &dir,
        "c6",
        &[
            "sh",
            "-c",
            "trap 'echo got-40; exit 3' 40; echo ready; sleep 1000 & wait",
        ],
        false,
    )
    .await?;
    let r6 = ReadStreamRequest {
        container_id: "c6".into(),
        len: 100,
        ..Default::default()
    };
    let ready = c
        .read_stdout(ctx(), &r6)
        .await
        .map_err(|e| format!("read c6: {e}"))?;
    check(ready.data == b"ready\n", "c6 ready".into())?;
    let sig = SignalProcessRequest {
        container_id: "c6".into(),
        signal: 40,
        all: true,
        ..Default::default()
    };
    c.signal_process(ctx(), &sig)
        .await
        .map_err(|e| format!("signal all: {e}"))?;
    let out = read_all(&c, "c6", "", false).await?;
    let status = wait(&c, "c6", "").await?;
    check(
        out == "got-40\n" && status == 3,
        format!("c6 signal 40 to all: output {out:?}, exit status {status}"),
    )?;

    // 8. Stats, signal, removal, errors.
    let s = c
        .stats(ctx(), &cr)
        .await
        .map_err(|e| format!("stats: {e}"))?;
    println!(
        "stats c2: memory {} B (limit {}), cpu {} ns, pids {}",
        s.memory_usage_bytes, s.memory_limit_bytes, s.cpu_usage_ns, s.pids_current
    );
    check(
        s.memory_usage_bytes > 0 && s.pids_current >= 1,
        "c2 stats non-zero".into(),
    )?;
    let sig = SignalProcessRequest {
        container_id: "c2".into(),
        signal: 9,
        ..Default::default()
    };
    c.signal_process(ctx(), &sig)
        .await
        .map_err(|e| format!("signal: {e}"))?;
    let status = wait(&c, "c2", "").await?;
    check(status == 137, format!("c2 killed, exit status {status}"))?;
    for id in ["c1", "c2", "c4", "c5", "c6", "c7"] {
        let cr = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        c.remove_container(ctx(), &cr)
            .await
            .map_err(|e| format!("remove {id}: {e}"))?;
    }
    let gone = c
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "c1".into(),
                ..Default::default()
            },
        )
        .await;
    check(
        matches!(&gone, Err(kuasar_api::ttrpc::Error::RpcStatus(s)) if s.code() == kuasar_api::ttrpc::Code::NOT_FOUND),
        "removed container is NotFound".into(),
    )?;
    let bad = c
        .remove_container(
            ctx(),
            &ContainerRequest {
                container_id: "../x".into(),
                ..Default::default()
            },
        )
        .await;
    check(
        matches!(&bad, Err(kuasar_api::ttrpc::Error::RpcStatus(s)) if s.code() == kuasar_api::ttrpc::Code::INVALID_ARGUMENT),
        "bad id is InvalidArgument".into(),
    )?;
    let bad_json = CreateContainerRequest {
        container_id: "c3".into(),
        spec_json: b"{not json".to_vec(),
        rootfs_path: "/run/kuasar/shared/c3/rootfs".into(),
        ..Default::default()
    };
    let res = c.create_container(ctx(), &bad_json).await;
    check(
        matches!(&res, Err(kuasar_api::ttrpc::Error::RpcStatus(s)) if s.code() == kuasar_api::ttrpc::Code::INVALID_ARGUMENT),
        "bad spec JSON is InvalidArgument".into(),
    )?;
    // The OCI runtime's own failure comes back as Internal with crun's
    // message, and leaves no container behind.
    let res = create(&c, &dir, "c3", &["/no/such/binary"], false).await;
    check(
        matches!(&res, Err(e) if e.contains("crun create failed: ")
            && e.contains("/no/such/binary")
            && e.to_lowercase().contains("no such file")),
        format!("crun failure reported: {res:?}"),
    )?;
    let cr3 = ContainerRequest {
        container_id: "c3".into(),
        ..Default::default()
    };
    let gone = c.stats(ctx(), &cr3).await;
    check(
        matches!(&gone, Err(kuasar_api::ttrpc::Error::RpcStatus(s)) if s.code() == kuasar_api::ttrpc::Code::NOT_FOUND),
        "failed container is NotFound".into(),
    )?;
    Ok(())
}

/// c5's script: prints memory.max and pids.max; a shell forks sleeps until
/// a fork fails (the shell, its 6 sleeps and c5's init make 8: the shell
/// exits 2), then awk grows past memory.max. (`read` is a builtin.)
const LIMITS_SCRIPT: &str = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max
sh -c 'i=0; while [ $i -lt 12 ]; do sleep 2 & i=$((i+1)); done' 2>/dev/null; echo forks=$?
read n < /sys/fs/cgroup/pids.current; echo pids=$n
sleep 3
awk 'BEGIN { x = sprintf(\"%60000000s\", \"\"); print length(x) }'; echo awk=$?
";

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::too_many_lines)] // the check's steps, read top to bottom
async fn main() {
    let mut opts = Opts {
        image_dir: PathBuf::from("/var/lib/kuasar"),
        kernel: PathBuf::from("vmlinux"),
        keep: false,
        extra: String::new(),
        boots: 0,
        bench: 0,
        reconnect_gap_ms: 200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--image-dir" => opts.image_dir = PathBuf::from(value()),
            "--kernel" => opts.kernel = PathBuf::from(value()),
            "--keep" => opts.keep = true,
            "--append" => opts.extra = value(),
            "--boots" => opts.boots = value().parse().unwrap_or(5),
            "--bench" => opts.bench = value().parse().unwrap_or(10).max(1),
            "--reconnect-gap-ms" => opts.reconnect_gap_ms = value().parse().unwrap_or(200),
            _ => {
                eprintln!(
                    "usage: boot_check [--image-dir DIR] [--kernel FILE] [--keep] [--append KERNEL_PARAMS] \
                     [--boots N] [--bench N] [--reconnect-gap-ms MS]"
                );
                std::process::exit(2);
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("kuasar-boot-check-{}", std::process::id()));
    if opts.boots > 0 {
        let boots = opts.boots;
        let mut times = Vec::new();
        for i in 0..boots {
            let mut vm = Vm {
                dir: dir.join(i.to_string()),
                qemu: None,
                keep: false,
            };
            match boot_and_ping(&mut vm, &opts).await {
                Ok((_, _, ms, _)) => {
                    let ready = guest_ready_at(&vm.dir.join("console.log")).await;
                    println!(
                        "boot {}: QEMU spawn -> Ping answered in {ms} ms; guest ready (modules \
                         for containers loaded) at agent uptime {}",
                        i + 1,
                        ready.as_deref().unwrap_or("(not seen within 10 s)")
                    );
                    times.push(ms);
                }
                Err(e) => {
                    eprintln!("boot {} FAILED: {e}", i + 1);
                    std::process::exit(1);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        times.sort();
        println!(
            "boot-to-Ping over {boots} boots: median {} ms, min {} ms, max {} ms",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
        return;
    }
    let mut vm = Vm {
        dir,
        qemu: None,
        keep: opts.keep,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let res = tokio::select! {
        res = run(&mut vm, &opts) => res,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        _ = term.recv() => Err("terminated".to_string()),
    };
    if let Err(e) = &res {
        eprintln!("FAILED: {e}");
        let console = std::fs::read_to_string(vm.dir.join("console.log")).unwrap_or_default();
        let qemu = std::fs::read_to_string(vm.dir.join("qemu.log")).unwrap_or_default();
        eprintln!("--- console.log ---\n{console}--- qemu.log ---\n{qemu}");
    }
    drop(vm);
    if res.is_err() {
        std::process::exit(1);
    }
    println!("boot_check: all ok");
}
