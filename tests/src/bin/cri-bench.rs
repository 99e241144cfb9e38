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
//!   - warm start (`[pool]`): RunPodSandbox to ready and to the first log
//!     line in the podsandbox and zero-shim modes with the pool off and
//!     with a pool of 5 (each pod started while the pool is full); a
//!     waiting pooled VM's PSS and idle CPU; 20 pods requested at once
//!     with a pool of 5 (`KUASAR_BENCH_POOL_ONLY=1`: only this).
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

/// One pod start: (RunPodSandbox to ready, pod start to first log line,
/// container create sent to first log line).
fn one_run(b: &Bench, handler: &str, tag: &str) -> Result<(Duration, Duration, Duration), String> {
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
        let created = Instant::now();
        let id = b
            .cri
            .create_container(&pod, &c, &pod_cfg)
            .map_err(|e| format!("CreateContainer: {e}"))?;
        b.cri
            .start_container(&id)
            .map_err(|e| format!("StartContainer: {e}"))?;
        let path = log_dir.join(&c.log_path);
        wait_first_line(&path)?;
        Ok((ready, t0.elapsed(), created.elapsed()))
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
    if std::env::var("KUASAR_BENCH_POOL_ONLY").is_ok_and(|v| v == "1") {
        for line in warm_start(&b, runs)? {
            println!("{line}");
        }
        return Ok(());
    }
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
                let (r, f, _) = one_run(&b, handler, &i.to_string())?;
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
    failed |= !section(zero_shim_memory(&b), ZERO_HANDLER, &mut notes);
    if ctl_pods > 0 {
        println!();
        failed |= !section(kuasarctl_list(&b, ctl_pods), "kuasarctl", &mut notes);
    }
    println!();
    failed |= !section(warm_start(&b, runs), "warm start", &mut notes);
    for n in notes {
        println!("FAILED: {n}");
    }
    if failed {
        return Err("some measurements failed (see above)".into());
    }
    Ok(())
}

/// Prints a section's lines; a failed one is noted under `what` (false).
fn section(lines: Result<Vec<String>, String>, what: &str, notes: &mut Vec<String>) -> bool {
    match lines {
        Ok(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            true
        }
        Err(e) => {
            notes.push(format!("{what}: {e}"));
            false
        }
    }
}

/// Pool sizes of the warm-start measures.
const POOL: usize = 5;
const BURST: usize = 20;
const WARM_HANDLERS: &[&str] = &["kuasar-vmm", ZERO_HANDLER];

/// Restarts the environment's kuasar-vmm with a pool of `size` VMs and
/// waits until they are ready.
fn with_pool(b: &Bench, size: usize) -> Result<(), String> {
    let mut config = b.env.sandboxer_config();
    config.pool_size = Some(size as u32);
    b.env.start_sandboxer(config)?;
    wait_pool(b, size)
}

fn wait_pool(b: &Bench, size: usize) -> Result<(), String> {
    let full = kuasar_e2e::cmd::wait_until(Duration::from_secs(180), || b.env.pool_full(size));
    full.then_some(())
        .ok_or_else(|| format!("the pool did not fill to {size}"))
}

/// CPU time (utime + stime, clock ticks) of process `pid`.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split(' ').collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Medians of `runs` pod starts of each warm handler (after a warm-up).
fn pod_starts(b: &Bench, runs: usize, pool: usize, tag: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for handler in WARM_HANDLERS {
        let (mut ready, mut first, mut container) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=runs {
            if pool > 0 {
                wait_pool(b, pool)?;
            }
            let (r, f, c) = one_run(b, handler, &format!("{tag}{i}"))?;
            if i > 0 {
                ready.push(r);
                first.push(f);
                container.push(c);
            }
        }
        out.push(format!(
            "{handler:<18} pool {tag:<4} {:>8} ms {:>14} ms {:>17} ms   ready ({})",
            ms(median(ready.clone())),
            ms(median(first)),
            ms(median(container)),
            ready.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(" ")
        ));
    }
    Ok(out)
}

/// 20 pods requested at once (one thread each) with a pool of 5: every
/// RunPodSandbox's latency, p50/p90/max; all must be ready.
fn burst(b: &Bench) -> Result<String, String> {
    let address = b.env.address();
    let handles: Vec<_> = (0..BURST)
        .map(|i| {
            let name = b.env.unique_id(&format!("burst-{i}"));
            let log_dir = b.env.dir().join("bench-logs").join(&name);
            let _ = std::fs::create_dir_all(&log_dir);
            let address = address.clone();
            std::thread::spawn(move || {
                let cri = Cri::connect(&address)?.with_timeout(Duration::from_secs(300));
                let t0 = Instant::now();
                let id = cri
                    .run_pod(&spec::pod(&name, &log_dir), ZERO_HANDLER)
                    .map_err(|e| format!("RunPodSandbox: {e}"))?;
                let took = t0.elapsed();
                let ready = cri
                    .pod_status(&id)
                    .map(|s| s.state == PodSandboxState::SandboxReady as i32)
                    .unwrap_or(false);
                Ok::<_, String>((id, took, ready))
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect();
    let mut times = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok((id, took, ready)) => {
                if !ready {
                    errors.push(format!("{id} not ready"));
                }
                times.push(took);
                let _ = b.cri.stop_and_remove_pod(&id);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(format!(
        "{BURST} pods at once ({ZERO_HANDLER}), pool of {POOL}: all ready; RunPodSandbox p50 {} ms, p90 {} ms, max {} ms (all: {})",
        ms(at(0.5)),
        ms(at(0.9)),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
        times.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(" ")
    ))
}

/// The warm-start section: the pool off against a pool of 5, in one run.
fn warm_start(b: &Bench, runs: usize) -> Result<Vec<String>, String> {
    let mut out = vec![
        format!("Warm start: pool off against a pool of {POOL} (medians of {runs} runs after a warm-up; ms)"),
        format!(
            "{:<18} {:<9} {:>11} {:>17} {:>20}",
            "handler", "", "pod->ready", "pod->first line", "container->first line"
        ),
    ];
    with_pool(b, 0)?;
    out.extend(pod_starts(b, runs, 0, "off")?);
    with_pool(b, POOL)?;
    out.extend(pod_starts(b, runs, POOL, "on")?);
    wait_pool(b, POOL)?;
    // What a waiting VM costs: PSS, and CPU over 10 s.
    let pids = b.env.pooled_pids();
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    std::thread::sleep(Duration::from_secs(10));
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let mut pss: Vec<u64> = pids.iter().filter_map(|&p| mem(p).map(|m| m.1)).collect();
    pss.sort_unstable();
    // SAFETY: sysconf takes a constant and touches no memory.
    let tick = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    };
    let cpu_pct = (after - before) as f64 / tick / 10.0 / pids.len().max(1) as f64 * 100.0;
    out.push(format!(
        "a waiting pooled VM: PSS {} MB (median of {}), idle CPU {cpu_pct:.1}% of a core",
        pss.get(pss.len() / 2).map_or("?".into(), |k| mb(*k)),
        pss.len()
    ));
    out.push(burst(b)?);
    with_pool(b, 0)?;
    Ok(out)
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
