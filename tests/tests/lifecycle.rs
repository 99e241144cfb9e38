//! Containers in microVMs through `ctr` against a private containerd and the
//! real kuasar-vmm: guest kernel, exit codes, exec, stdin, several sandboxes.
//! All tests share one environment (one containerd, one kuasar-vmm) and run
//! one at a time; each leaves no VM, shim or sandbox state behind.
use std::time::Duration;

use kuasar_e2e::env::CTR_TIMEOUT;
use kuasar_e2e::{cmd, paths, procs, shared, EnvOptions, BUSYBOX, RUNTIME};

fn env() -> kuasar_e2e::env::Shared {
    shared(EnvOptions { sandboxer: true })
}

#[test]
fn container_sees_the_guest_kernel() {
    let env = env();
    let id = env.unique_id("kernel");
    let _g = env.guard(&id);
    let out = env.run_vm(&id, &["uname", "-r"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    let guest = paths::guest_kernel_release();
    assert_eq!(out.stdout.trim(), guest, "{out}");
    // kernel-release must describe the kernel file the sandboxer boots (the
    // default `vmlinux`): its banner names the same release.
    let kernel = paths::image_dir().join("vmlinux");
    let image = std::fs::read(&kernel).unwrap_or_else(|e| panic!("read {}: {e}", kernel.display()));
    let banner = format!("Linux version {guest} (");
    assert!(
        image.windows(banner.len()).any(|w| w == banner.as_bytes()),
        "{} has no banner {banner:?}: kernel-release does not match it",
        kernel.display()
    );

    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if host.trim() == guest {
        // Same release string on both sides: tell them apart by the kernel
        // command line, which the sandboxer sets for the guest.
        let id = env.unique_id("cmdline");
        let _g = env.guard(&id);
        let out = env.run_vm(&id, &["cat", "/proc/cmdline"]);
        assert!(out.success(), "{out}\n{}", env.diagnostics());
        let host_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        assert_ne!(out.stdout.trim(), host_cmdline.trim(), "{out}");
        assert!(out.stdout.contains("console=ttyS0"), "{out}");
    }
    env.assert_clean();
}

/// Puts the environment's default sandboxer back when dropped.
struct DefaultSandboxer<'a>(&'a kuasar_e2e::env::Shared);

impl Drop for DefaultSandboxer<'_> {
    fn drop(&mut self) {
        let env = self.0;
        if let Err(e) = env.start_sandboxer(env.sandboxer_config()) {
            eprintln!("restarting the default kuasar-vmm: {e}");
        }
    }
}

#[test]
fn fallback_kernel_is_selectable() {
    let env = env();
    let release = paths::fallback_kernel_release();
    assert_ne!(release, paths::guest_kernel_release());
    let mut config = env.sandboxer_config();
    config.kernel = Some("vmlinux-debian".into());
    let _restore = DefaultSandboxer(&env);
    env.start_sandboxer(config)
        .unwrap_or_else(|e| panic!("{e}"));
    let id = env.unique_id("fallback");
    let _g = env.guard(&id);
    let out = env.run_vm(&id, &["uname", "-r"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert_eq!(out.stdout.trim(), release, "{out}");
    env.assert_clean();
}

#[test]
fn exit_code_is_propagated() {
    let env = env();
    let id = env.unique_id("exit7");
    let _g = env.guard(&id);
    let out = env.run_vm(&id, &["sh", "-c", "exit 7"]);
    assert_eq!(out.code, Some(7), "{out}\n{}", env.diagnostics());
    assert!(!env.containers().contains(&id), "--rm left the container");
    env.assert_clean();
}

#[test]
fn sigkill_from_another_ctr_gives_137() {
    let env = env();
    let id = env.unique_id("kill137");
    let _g = env.guard(&id);
    let mut run = env.ctr_spawn(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "300",
    ]);
    // Until the task runs, or `ctr run` gave up.
    cmd::wait_until(CTR_TIMEOUT, || {
        !run.is_running() || env.task_status(&id).as_deref() == Some("RUNNING")
    });
    if env.task_status(&id).as_deref() != Some("RUNNING") {
        let out = run.wait(Duration::from_secs(1));
        panic!("task never ran:\n{out}\n{}", env.diagnostics());
    }
    assert_eq!(env.qemu_count(), 1, "{}", env.diagnostics());
    let kill = env.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    assert!(kill.success(), "{kill}");
    let out = run.wait(Duration::from_secs(60));
    assert_eq!(out.code, Some(137), "{out}\n{}", env.diagnostics());
    assert!(!env.containers().contains(&id), "--rm left the container");
    env.assert_clean();
}

#[test]
fn detached_task_killed_reports_137() {
    let env = env();
    let id = env.unique_id("det137");
    let (_g, out) = env.run_vm_detached(&id, &["sleep", "300"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert!(
        env.wait_task_status(&id, "RUNNING", Duration::from_secs(30)),
        "{}",
        env.diagnostics()
    );
    env.ctr(&["tasks", "kill", "-s", "SIGKILL", &id])
        .expect_success();
    assert!(
        env.wait_task_status(&id, "STOPPED", Duration::from_secs(30)),
        "task not STOPPED after SIGKILL: {:?}\n{}",
        env.task_status(&id),
        env.diagnostics()
    );
    // ctr reports a non-zero exit status when the task is deleted.
    let rm = env.ctr(&["tasks", "rm", &id]);
    assert!(rm.success(), "{rm}");
    assert!(rm.combined().contains("137"), "exit status not 137: {rm}");
    env.ctr(&["containers", "rm", &id]).expect_success();
    assert!(!env.containers().contains(&id));
    env.assert_clean();
}

#[test]
fn exec_stdio_exit_code_and_cleanup() {
    let env = env();
    let id = env.unique_id("exec");
    // The container's init exits 42 on SIGTERM (PID 1 ignores signals it
    // has no handler for).
    let (_g, out) =
        env.run_vm_detached(&id, &["sh", "-c", "trap 'exit 42' TERM; sleep 300 & wait"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert!(
        env.wait_task_status(&id, "RUNNING", Duration::from_secs(30)),
        "{}",
        env.diagnostics()
    );
    let exec = env.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(exec.code, Some(3), "{exec}\n{}", env.diagnostics());
    assert_eq!(exec.stdout, "out\n", "{exec}");
    assert!(exec.stderr.contains("err"), "{exec}");

    env.ctr(&["tasks", "kill", &id]).expect_success();
    assert!(
        env.wait_task_status(&id, "STOPPED", Duration::from_secs(30)),
        "task not STOPPED after SIGTERM: {:?}\n{}",
        env.task_status(&id),
        env.diagnostics()
    );
    let rm = env.ctr(&["tasks", "rm", &id]);
    assert!(rm.success(), "{rm}");
    assert!(rm.combined().contains("42"), "exit status not 42: {rm}");
    env.ctr(&["containers", "rm", &id]).expect_success();
    assert!(!env.containers().contains(&id));
    env.assert_clean();
}

#[test]
fn exec_id_is_reusable_after_the_exec_ended() {
    let env = env();
    let id = env.unique_id("reuse");
    let (guard, out) = env.run_vm_detached(&id, &["sleep", "300"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert!(
        env.wait_task_status(&id, "RUNNING", Duration::from_secs(30)),
        "{}",
        env.diagnostics()
    );
    // `ctr tasks exec` deletes its process when it ended (as runc's shim
    // allows, the id is free again).
    for round in 1..=2 {
        let out = env.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "exit 5",
        ]);
        assert_eq!(
            out.code,
            Some(5),
            "round {round}: {out}\n{}",
            env.diagnostics()
        );
    }
    drop(guard);
    env.assert_clean();
}

#[test]
fn stdin_reaches_the_container() {
    let env = env();
    let id = env.unique_id("stdin");
    let _g = env.guard(&id);
    // `read` ends on the newline: no reliance on EOF, which ctr delivers
    // only when its stdin ends after the task was created.
    let out = env.run_vm_with(
        &id,
        &["sh", "-c", "read line; echo \"got $line\""],
        Some(b"hi\n"),
        CTR_TIMEOUT,
    );
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    assert_eq!(out.stdout.trim(), "got hi", "{out}");
    env.assert_clean();
}

#[test]
fn three_sandboxes_one_sandboxer() {
    let env = env();
    let ids: Vec<String> = (0..3).map(|_| env.unique_id("multi")).collect();
    let guards: Vec<_> = ids.iter().map(|id| env.guard(id)).collect();
    // Start all three at once.
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            env.ctr_spawn(&[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                BUSYBOX,
                id,
                "sleep",
                "300",
            ])
        })
        .collect();
    for r in runs {
        let out = r.wait(CTR_TIMEOUT);
        assert!(out.success(), "{out}\n{}", env.diagnostics());
    }
    for id in &ids {
        assert!(
            env.wait_task_status(id, "RUNNING", Duration::from_secs(30)),
            "{id} not RUNNING\n{}",
            env.diagnostics()
        );
    }
    assert_eq!(env.qemu_count(), 3, "QEMU processes\n{}", env.diagnostics());
    assert_eq!(env.shim_count(), 3, "shims\n{}", env.diagnostics());
    assert_eq!(
        env.sandboxer_count(),
        1,
        "kuasar-vmm processes\n{}",
        env.diagnostics()
    );
    assert_eq!(
        env.state_entries().len(),
        3,
        "state dirs: {:?}",
        env.state_entries()
    );

    for id in &ids {
        env.ctr(&["tasks", "kill", "-s", "SIGKILL", id])
            .expect_success();
    }
    for id in &ids {
        assert!(env.wait_task_status(id, "STOPPED", Duration::from_secs(30)));
        env.ctr(&["tasks", "rm", id]).expect_success();
        env.ctr(&["containers", "rm", id]).expect_success();
    }
    drop(guards);
    env.assert_clean();
    assert_eq!(
        procs::count(env.dir(), procs::SANDBOXER),
        1,
        "the sandboxer stays up"
    );
}

#[test]
fn a_dying_vm_stops_only_its_own_tasks() {
    let env = env();
    let dead = env.unique_id("dies");
    let alive = env.unique_id("lives");
    let (_g1, out) = env.run_vm_detached(&dead, &["sleep", "300"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    let (_g2, out) = env.run_vm_detached(&alive, &["sleep", "300"]);
    assert!(out.success(), "{out}\n{}", env.diagnostics());
    for id in [&dead, &alive] {
        assert!(
            env.wait_task_status(id, "RUNNING", Duration::from_secs(30)),
            "{id} not RUNNING\n{}",
            env.diagnostics()
        );
    }
    let marker = format!("kuasar-{dead},");
    let qemu = procs::find(env.dir(), &[procs::QEMU])
        .into_iter()
        .find(|p| p.cmdline.contains(&marker))
        .unwrap_or_else(|| panic!("no QEMU for {dead}\n{}", env.diagnostics()));
    procs::signal(qemu.pid, 9);

    assert!(
        env.wait_task_status(&dead, "STOPPED", Duration::from_secs(10)),
        "task of the killed VM not STOPPED: {:?}\n{}",
        env.task_status(&dead),
        env.diagnostics()
    );
    // What the VM held on the host is released before containerd deletes it.
    let dir = env.state_dir().join(&dead);
    assert!(
        cmd::wait_until(Duration::from_secs(10), || {
            ["shared", "agent.sock", "qmp.sock"]
                .iter()
                .all(|f| !dir.join(f).exists())
        }),
        "{} still holds resources",
        dir.display()
    );
    // The other sandbox is untouched.
    assert_eq!(env.task_status(&alive).as_deref(), Some("RUNNING"));
    let exec = env.ctr(&["tasks", "exec", "--exec-id", "still", &alive, "echo", "up"]);
    assert!(exec.success() && exec.stdout.trim() == "up", "{exec}");

    let rm = env.ctr(&["tasks", "rm", &dead]);
    assert!(rm.success(), "{rm}");
    assert!(
        rm.combined().contains("255") || rm.combined().contains("137"),
        "exit status of a killed VM: {rm}"
    );
    env.ctr(&["containers", "rm", &dead]).expect_success();
    env.ctr(&["tasks", "kill", "-s", "SIGKILL", &alive])
        .expect_success();
    assert!(env.wait_task_status(&alive, "STOPPED", Duration::from_secs(30)));
    env.ctr(&["tasks", "rm", &alive]).expect_success();
    env.ctr(&["containers", "rm", &alive]).expect_success();
    env.assert_clean();
}
