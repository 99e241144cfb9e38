//! CRI start-up times and memory, runc against kuasar-vmm, in one private
//! environment (containerd + kuasar-vmm under /run/kuasar-e2e-<pid>, removed
//! at the end):
//!   - RunPodSandbox until the pod is ready;
//!   - pod start (RunPodSandbox sent) until the first line of a container's
//!     output is in its CRI log;
//!     medians of `KUASAR_BENCH_RUNS` (default 5) after one warm-up run;
//!   - RSS and PSS (/proc/PID/smaps_rollup) of the shims and of kuasar-vmm
//!     with 5 pods of each handler running;
//!   - the zero-shim mode (handler `kuasar-vmm-zero`): the processes with 5
//!     pods running (no shim, one kuasar-vmm, five QEMUs) and kuasar-vmm's
//!     RSS/PSS then and with no pod (`KUASAR_BENCH_ZERO_ONLY=1`: only this);
//!   - `kuasarctl list` (table and `-o json`) with `KUASAR_BENCH_CTL_PODS`
//!     (default 20) pods running, each with a container: wall time of the
//!     whole command, as an operator's shell sees it, median and max of 20
//!     (`KUASAR_BENCH_CTL_ONLY=1`: only this; 0 pods: skipped).
//!
//! Run by scripts/bench.sh (`make bench`); needs `make build guest images`.
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kuasar_e2e::cri::proto::PodSandboxState;
use kuasar_e2e::cri::{logs, spec, Cri};
use kuasar_e2e::{procs, Env, EnvOptions, BUSYBOX};

const HANDLERS: &[&str] = &["runc", "kuasar-vmm"];
const MEMORY_PODS: usize = 5;
const LOG_TIMEOUT: Duration = Duration::from_secs(120);
/// Timed runs of each kuasarctl command.
const CTL_RUNS: usize = 20;

struct Bench {
    env: Env,
    cri: Cri,
}

/// One pod start: (RunPodSandbox to ready, pod start to first log line).
fn one_run(b: &Bench, handler: &str, tag: &str) -> Result<(Duration, Duration), String> {
    let name = b.env.unique_id(&format!("bench-{handler}-{tag}"));
    let log_dir = b.env.dir().join("bench-logs").join(&name);
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod_cfg = spec::pod(&name, &log_dir);
    let t0 = Instant::now();
    let pod = b
        .cri
        .run_pod(&pod_cfg, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let result = (|| {
        let st = b.cri.pod_status(&pod).map_err(|e| e.to_string())?;
        if st.state != PodSandboxState::SandboxReady as i32 {
            return Err(format!("pod not ready after RunPodSandbox: {st:?}"));
        }
        let ready = t0.elapsed();
        let c = spec::container("first", BUSYBOX, &["echo", "first-line"]);
        let id = b
            .cri
            .create_container(&pod, &c, &pod_cfg)
            .map_err(|e| format!("CreateContainer: {e}"))?;
        b.cri
            .start_container(&id)
            .map_err(|e| format!("StartContainer: {e}"))?;
        let path = log_dir.join(&c.log_path);
        wait_first_line(&path)?;
        Ok((ready, t0.elapsed()))
    })();
    b.cri
        .stop_and_remove_pod(&pod)
        .map_err(|e| format!("removing pod {pod}: {e}"))?;
    result
}

/// Polls (every 2 ms) until the log has a full stdout line.
fn wait_first_line(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + LOG_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(entries) = logs::read(path) {
            if !logs::lines(&entries, logs::LogStream::Stdout).is_empty() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(format!(
        "no log line in {} after {LOG_TIMEOUT:?}",
        path.display()
    ))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// (Rss, Pss) in kB.
fn mem(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// Memory of `name` processes of the environment: per process (median) and total.
fn mem_row(b: &Bench, label: &str, name: &str) -> String {
    let mut rss = Vec::new();
    let mut pss = Vec::new();
    for p in procs::find(b.env.dir(), &[name]) {
        if let Some((r, s)) = mem(p.pid) {
            rss.push(r);
            pss.push(s);
        }
    }
    if rss.is_empty() {
        return format!("{label:<44} {:>9} {:>9} {:>11}", "-", "-", "-");
    }
    rss.sort_unstable();
    pss.sort_unstable();
    format!(
        "{label:<44} {:>9} {:>9} {:>11}   ({} processes)",
        mb(rss[rss.len() / 2]),
        mb(pss[pss.len() / 2]),
        mb(pss.iter().sum()),
        rss.len()
    )
}

/// The zero-shim handler (kuasar-vmm as containerd's sandbox controller).
const ZERO_HANDLER: &str = "kuasar-vmm-zero";

/// kuasar-vmm's (RSS, PSS) in kB; its pid from the environment's processes.
fn sandboxer_mem(b: &Bench) -> Result<(u64, u64), String> {
    let p = procs::find(b.env.dir(), &[procs::SANDBOXER]);
    let [one] = p.as_slice() else {
        return Err(format!("{} kuasar-vmm processes, expected one", p.len()));
    };
    mem(one.pid).ok_or_else(|| format!("no smaps_rollup for kuasar-vmm {}", one.pid))
}

/// The zero-shim mode with MEMORY_PODS pods: what runs, and kuasar-vmm's
/// memory with none and with them.
fn zero_shim_memory(b: &Bench) -> Result<Vec<String>, String> {
    let (idle_rss, idle_pss) = sandboxer_mem(b)?;
    let mut pods = Vec::new();
    let started = (|| {
        for i in 0..MEMORY_PODS {
            let name = b.env.unique_id(&format!("zero-{i}"));
            let log_dir = b.env.dir().join("bench-logs").join(&name);
            let _ = std::fs::create_dir_all(&log_dir);
            let cfg = spec::pod(&name, &log_dir);
            let id = b
                .cri
                .run_pod(&cfg, ZERO_HANDLER)
                .map_err(|e| format!("RunPodSandbox ({ZERO_HANDLER}): {e}"))?;
            pods.push(id.clone());
            let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
            b.cri
                .create_container(&id, &c, &cfg)
                .and_then(|cid| b.cri.start_container(&cid))
                .map_err(|e| format!("container in {ZERO_HANDLER} pod {}: {e}", i + 1))?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let count = |name| procs::find(b.env.dir(), &[name]).len();
        let (rss, pss) = sandboxer_mem(b)?;
        Ok::<_, String>(vec![
            format!(
                "processes with {MEMORY_PODS} {ZERO_HANDLER} pods: containerd-shim-kuasar-vmm-v2 {}, kuasar-vmm {}, qemu-system-x86_64 {}",
                count(procs::SHIM),
                count(procs::SANDBOXER),
                count(procs::QEMU)
            ),
            format!(
                "kuasar-vmm with 0 pods: RSS {} MB, PSS {} MB; with {MEMORY_PODS} pods: RSS {} MB, PSS {} MB",
                mb(idle_rss),
                mb(idle_pss),
                mb(rss),
                mb(pss)
            ),
        ])
    })();
    for id in &pods {
        let _ = b.cri.stop_and_remove_pod(id);
    }
    started
}

/// `kuasarctl list` against kuasar-vmm holding `count` running pods: one
/// line per output format with the median and max wall time of CTL_RUNS runs.
fn kuasarctl_list(b: &Bench, count: usize) -> Result<Vec<String>, String> {
    let mut pods = Vec::new();
    let measured = (|| {
        for i in 0..count {
            let name = b.env.unique_id(&format!("ctl-{i}"));
            let log_dir = b.env.dir().join("bench-logs").join(&name);
            let _ = std::fs::create_dir_all(&log_dir);
            let cfg = spec::pod(&name, &log_dir);
            let id = b
                .cri
                .run_pod(&cfg, "kuasar-vmm")
                .map_err(|e| format!("RunPodSandbox {}: {e}", i + 1))?;
            pods.push(id.clone());
            let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
            b.cri
                .create_container(&id, &c, &cfg)
                .and_then(|cid| b.cri.start_container(&cid))
                .map_err(|e| format!("container in pod {}: {e}", i + 1))?;
            eprintln!("cri-bench: kuasarctl: pod {} of {count} running", i + 1);
        }
        let socket = b.env.vmm_socket();
        let mut lines = Vec::new();
        for format in [&[][..], &["-o", "json"][..]] {
            let mut times = Vec::new();
            for _ in 0..CTL_RUNS {
                let started = Instant::now();
                let out = std::process::Command::new(kuasar_e2e::paths::kuasarctl())
                    .arg("--socket")
                    .arg(&socket)
                    .arg("list")
                    .args(format)
                    .output()
                    .map_err(|e| format!("run kuasarctl: {e}"))?;
                times.push(started.elapsed());
                if !out.status.success() {
                    return Err(format!(
                        "kuasarctl list: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                let stdout = String::from_utf8_lossy(&out.stdout);
                let listed = pods
                    .iter()
                    .filter(|id| stdout.contains(id.get(..12).unwrap_or(id)))
                    .count();
                if listed < count {
                    return Err(format!(
                        "kuasarctl list showed {listed} of {count} pods ({}):\n{stdout}",
                        pods.join(" ")
                    ));
                }
            }
            let max = times.iter().max().copied().unwrap_or_default();
            let ms1 = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
            lines.push(format!(
                "kuasarctl {:<12} with {count} pods: median {} ms, max {} ms ({CTL_RUNS} runs; target < 50 ms)",
                ["list"].iter().chain(format).copied().collect::<Vec<_>>().join(" "),
                ms1(median(times)),
                ms1(max)
            ));
        }
        Ok(lines)
    })();
    for id in &pods {
        let _ = b.cri.stop_and_remove_pod(id);
    }
    measured
}

#[allow(clippy::too_many_lines)] // the benchmark's steps, read top to bottom
fn run() -> Result<(), String> {
    let runs: usize = std::env::var("KUASAR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let env = Env::start(EnvOptions { sandboxer: true })?;
    let cri = Cri::connect(&env.address())?;
    let b = Bench { env, cri };
    if std::env::var("KUASAR_BENCH_ZERO_ONLY").is_ok_and(|v| v == "1") {
        println!("Zero-shim mode ({ZERO_HANDLER})");
        for line in zero_shim_memory(&b)? {
            println!("{line}");
        }
        return Ok(());
    }
    let ctl_pods: usize = std::env::var("KUASAR_BENCH_CTL_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    if std::env::var("KUASAR_BENCH_CTL_ONLY").is_ok_and(|v| v == "1") {
        for line in kuasarctl_list(&b, ctl_pods)? {
            println!("{line}");
        }
        return Ok(());
    }

    // A handler that fails is reported as such; the others are still measured.
    let mut rows = Vec::new();
    let mut failed = false;
    for handler in HANDLERS {
        let timed = (|| {
            one_run(&b, handler, "warm")?;
            let (mut ready, mut first) = (Vec::new(), Vec::new());
            for i in 0..runs {
                let (r, f) = one_run(&b, handler, &i.to_string())?;
                eprintln!(
                    "cri-bench: {handler} run {}: ready {} ms, first log line {} ms",
                    i + 1,
                    ms(r),
                    ms(f)
                );
                ready.push(r);
                first.push(f);
            }
            Ok::<_, String>((ready, first))
        })();
        if let Err(e) = &timed {
            eprintln!("cri-bench: {handler}: {e}");
            failed = true;
        }
        rows.push((handler, timed));
    }

    // Memory with MEMORY_PODS pods of each handler, each running a container.
    let mut pods = Vec::new();
    let mut notes = Vec::new();
    for handler in HANDLERS {
        for i in 0..MEMORY_PODS {
            let name = b.env.unique_id(&format!("mem-{handler}-{i}"));
            let log_dir = b.env.dir().join("bench-logs").join(&name);
            let _ = std::fs::create_dir_all(&log_dir);
            let cfg = spec::pod(&name, &log_dir);
            let started = b.cri.run_pod(&cfg, handler).and_then(|id| {
                pods.push(id.clone());
                let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
                b.cri
                    .create_container(&id, &c, &cfg)
                    .and_then(|cid| b.cri.start_container(&cid))
            });
            if let Err(e) = started {
                notes.push(format!("{handler} pod {}: {}", i + 1, e.message()));
                failed = true;
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let memory = [
        mem_row(&b, "containerd-shim-runc-v2 (runc pods)", procs::RUNC_SHIM),
        mem_row(
            &b,
            "containerd-shim-kuasar-vmm-v2 (kuasar pods)",
            procs::SHIM,
        ),
        mem_row(&b, "kuasar-vmm (one per node)", procs::SANDBOXER),
        mem_row(&b, "qemu-system-x86_64 (one per kuasar pod)", procs::QEMU),
    ];
    for id in &pods {
        let _ = b.cri.stop_and_remove_pod(id);
    }

    println!();
    println!("CRI benchmark: {runs} runs per handler after a warm-up, medians (all runs in ms)");
    println!(
        "{:<12} {:>22} {:>26}",
        "handler", "RunPodSandbox->ready", "pod start->first log line"
    );
    for (h, timed) in rows {
        let all = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(" ");
        match timed {
            Ok((ready, first)) => println!(
                "{h:<12} {:>19} ms {:>23} ms   ready ({}) first line ({})",
                ms(median(ready.clone())),
                ms(median(first.clone())),
                all(&ready),
                all(&first)
            ),
            Err(e) => println!("{h:<12} FAILED: {e}"),
        }
    }
    println!();
    println!(
        "Memory with {MEMORY_PODS} pods of each handler running (MB; median per process, PSS summed)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>11}",
        "process", "RSS", "PSS", "PSS total"
    );
    for row in memory {
        println!("{row}");
    }
    println!();
    println!("Zero-shim mode ({ZERO_HANDLER})");
    match zero_shim_memory(&b) {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            notes.push(format!("{ZERO_HANDLER}: {e}"));
            failed = true;
        }
    }
    if ctl_pods > 0 {
        println!();
        match kuasarctl_list(&b, ctl_pods) {
            Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
            Err(e) => {
                notes.push(format!("kuasarctl: {e}"));
                failed = true;
            }
        }
    }
    for n in notes {
        println!("FAILED: {n}");
    }
    if failed {
        return Err("some measurements failed (see above)".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cri-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
