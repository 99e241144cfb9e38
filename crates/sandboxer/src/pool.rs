//! Warm start: a pool of booted, agent-ready VMs that pods take instead of
//! booting their own (`[pool]`, off by default).
//!
//! A pooled VM is booted with nothing of any pod: its own name
//! (`pool-<kuasar-vmm pid>-<n>`), its directory under `<state_dir>/.pool/`,
//! one NIC on a tap in the pool's network namespace, no cgroup of a pod,
//! and a lower CPU priority. A pod whose VM size fits takes one
//! ([`Pool::take`]); the sandbox then attaches everything of the pod
//! (`sandbox/vm.rs`, `assign`): directory, cgroup, priority, network, host
//! name, sysctls. A VM serves one pod only: it is destroyed with it, never
//! returned. The pool refills in the background, `refill_concurrency` boots
//! at a time. Pooled VMs do not survive kuasar-vmm: they are stopped at
//! shutdown, and whatever a crash left is removed at the next start
//! ([`clean_leftovers`]).
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::agent::Agent;
use crate::host::Host;
use crate::net::pooled::PoolNetns;
use crate::vmm::{PlanNic, StartVmError, VmPlan, Vmm, VM_NAME_FILE};

/// The pool's directory inside the state directory (no sandbox id starts
/// with a dot).
pub const POOL_DIR: &str = ".pool";
/// How long a stopping kuasar-vmm waits for pooled VMs still booting.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// How long the refill waits after a failed boot before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A booted VM waiting for its pod.
pub struct PooledVm {
    /// What its VMM process is recognised by (its `-name`).
    pub name: String,
    /// Its directory under `<state_dir>/.pool/`.
    pub dir: PathBuf,
    pub vm: Box<dyn Vmm>,
    pub agent: Agent,
    /// Its tap in the pool's namespace (name, a queue fd of it).
    pub tap: (String, OwnedFd),
    /// The guest NIC's MAC until the pod gives it the pod interface's.
    pub mac: String,
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl PooledVm {
    fn alive(&self) -> bool {
        self.vm.exited().borrow().is_none()
    }
}

pub struct Pool {
    size: usize,
    concurrency: usize,
    vcpus: u32,
    memory_mib: u32,
    dir: PathBuf,
    netns: PoolNetns,
    ready: Mutex<Vec<PooledVm>>,
    booting: AtomicUsize,
    wake: Notify,
    seq: AtomicU64,
    /// Set at shutdown: nothing more is booted.
    closed: std::sync::atomic::AtomicBool,
}

impl Pool {
    /// The pool `[pool]` asks for, or None when it is off (size 0) or its
    /// network namespace cannot be made (logged; pods then boot cold).
    pub fn new(config: &crate::config::Config) -> Option<Arc<Pool>> {
        if config.pool.size == 0 {
            return None;
        }
        let netns = match PoolNetns::create() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("the VM pool is off: create its network namespace: {e}");
                return None;
            }
        };
        let (vcpus, memory_mib) = config.pool_vm();
        Some(Arc::new(Pool {
            size: config.pool.size as usize,
            concurrency: config.pool.refill_concurrency as usize,
            vcpus,
            memory_mib,
            dir: config.state_dir.join(POOL_DIR),
            netns,
            ready: Mutex::new(Vec::new()),
            booting: AtomicUsize::new(0),
            wake: Notify::new(),
            seq: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<PooledVm>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool's network namespace (where pooled VMs' taps wait).
    pub fn netns(&self) -> PathBuf {
        self.netns.path()
    }

    /// How many VMs are ready now.
    pub fn ready_count(&self) -> usize {
        self.ready().len()
    }

    /// Whether [`Pool::take`] would find a VM with at least `vcpus` and
    /// `memory_mib` now (another pod may still take it first).
    pub fn has(&self, vcpus: u32, memory_mib: u32) -> bool {
        self.fits(vcpus, memory_mib) && !self.ready().is_empty()
    }

    /// Whether the pooled VMs are big enough for `vcpus` and `memory_mib`.
    fn fits(&self, vcpus: u32, memory_mib: u32) -> bool {
        vcpus <= self.vcpus && memory_mib <= self.memory_mib
    }

    /// A ready VM with at least `vcpus` and `memory_mib`, taken out of the
    /// pool for good (the refill starts at once); None when none fits.
    pub fn take(&self, vcpus: u32, memory_mib: u32) -> Option<PooledVm> {
        if !self.fits(vcpus, memory_mib) {
            return None;
        }
        self.prune();
        let taken = {
            let mut ready = self.ready();
            (!ready.is_empty()).then(|| ready.remove(0))
        };
        self.wake.notify_one();
        taken
    }

    /// Drops the waiting VMs that died (logged, their directory removed).
    fn prune(&self) {
        let dead: Vec<PooledVm> = {
            let mut ready = self.ready();
            let (alive, dead) = ready.drain(..).partition(PooledVm::alive);
            *ready = alive;
            dead
        };
        for d in dead {
            tracing::warn!(vm = %d.name, "a pooled VM died while it waited");
            let _ = crate::mount::remove_dir(&d.dir);
        }
    }

    /// Keeps the pool full: boots VMs, `concurrency` at a time, until the
    /// pool holds `size` ready or booting, then waits for a take.
    pub fn start(self: &Arc<Self>, host: Arc<Host>) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                while !pool.closed.load(Ordering::SeqCst)
                    && pool.ready_count() + pool.booting.load(Ordering::SeqCst) < pool.size
                    && pool.booting.load(Ordering::SeqCst) < pool.concurrency
                {
                    pool.booting.fetch_add(1, Ordering::SeqCst);
                    let (pool2, host2) = (pool.clone(), host.clone());
                    tokio::spawn(async move {
                        let booted = pool2.boot_one(&host2).await;
                        let failed = booted.is_none();
                        if let Some(vm) = booted {
                            // A VM that dies while it waits is replaced.
                            let mut exited = vm.vm.exited();
                            let watcher = pool2.clone();
                            tokio::spawn(async move {
                                let _ = exited.wait_for(|e| e.is_some()).await;
                                watcher.prune();
                                watcher.wake.notify_one();
                            });
                            pool2.ready().push(vm);
                        }
                        if failed {
                            tokio::time::sleep(RETRY_AFTER).await;
                        }
                        pool2.booting.fetch_sub(1, Ordering::SeqCst);
                        pool2.wake.notify_one();
                    });
                }
                pool.wake.notified().await;
            }
        });
    }

    /// Boots one pooled VM; a failure is logged and leaves nothing behind.
    async fn boot_one(&self, host: &Host) -> Option<PooledVm> {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let name = format!("pool-{}-{n}", std::process::id());
        let dir = self.dir.join(&name);
        let started = Instant::now();
        match self.boot_in(host, &name, &dir, n).await {
            Ok(vm) => {
                tracing::info!(vm = %name, boot_ms = started.elapsed().as_millis() as u64, "pooled VM ready");
                Some(vm)
            }
            Err(e) => {
                tracing::warn!(vm = %name, "pooled VM failed to boot: {}", crate::error::chain(&e));
                let _ = crate::mount::remove_dir(&dir);
                None
            }
        }
    }

    async fn boot_in(
        &self,
        host: &Host,
        name: &str,
        dir: &Path,
        n: u64,
    ) -> Result<PooledVm, StartVmError> {
        let prepare = |source| StartVmError::Prepare {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(prepare)?;
        std::fs::write(dir.join(VM_NAME_FILE), name).map_err(prepare)?;
        let tap_name = format!("kpool{n}");
        let tap = crate::net::pooled::create_tap(&self.netns.path(), &tap_name)
            .await
            .map_err(|e| prepare(std::io::Error::other(crate::error::chain(&e))))?;
        let mac = random_mac().map_err(prepare)?;
        let plan = VmPlan {
            id: name.to_owned(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            dir: dir.to_owned(),
            nics: vec![PlanNic {
                tap: tap.try_clone().map_err(prepare)?,
                mac: mac.clone(),
            }],
            cgroup_procs: Vec::new(),
            background: true,
        };
        let mut vm = host.hypervisor.prepare(plan);
        let timeout = Duration::from_secs(host.config.vm.boot_timeout_secs);
        let deadline = Instant::now() + timeout;
        match crate::sandbox::boot_agent(host, vm.as_mut(), dir, name, deadline, timeout).await {
            Ok(agent) => {
                // The container code paths translated now, not on the pod's
                // first container (TCG); a failure costs only that.
                match agent.warm_up().await {
                    Ok(ms) => tracing::debug!(vm = %name, guest_ms = ms, "pooled VM warmed up"),
                    Err(e) => {
                        tracing::warn!(vm = %name, "warm-up of a pooled VM: {}", crate::error::chain(&e))
                    }
                }
                Ok(PooledVm {
                    name: name.to_owned(),
                    dir: dir.to_owned(),
                    vm,
                    agent,
                    tap: (tap_name, tap),
                    mac,
                    vcpus: self.vcpus,
                    memory_mib: self.memory_mib,
                })
            }
            Err(e) => {
                let _ = vm.stop(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    /// Stops every ready VM and removes the pool's directory (kuasar-vmm
    /// is stopping: pooled VMs do not outlive it).
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // A boot under way ends (ready or failed) within the boot timeout;
        // waited for a few seconds, so that its VM goes too.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.booting.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let vms: Vec<PooledVm> = self.ready().drain(..).collect();
        for mut p in vms {
            let _ = p.vm.stop(Duration::ZERO).await;
        }
        let _ = crate::mount::remove_dir(&self.dir);
    }
}

/// Removes what an earlier kuasar-vmm left of its pool: each pooled VM's
/// VMM (when it really is that VM's) and the directory.
pub fn clean_leftovers(host: &Host) {
    let dir = host.config.state_dir.join(POOL_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let vm_dir = entry.path();
        if let Some(pid) = host.hypervisor.recorded_pid(&vm_dir) {
            let name = crate::vmm::vm_name(&vm_dir);
            crate::recovery::kill_vmm(host.hypervisor.as_ref(), pid, &name);
        }
    }
    if let Err(e) = crate::mount::remove_dir(&dir) {
        tracing::warn!(dir = %dir.display(), "remove the pool of an earlier run: {e}");
    }
}

/// A random locally administered unicast MAC (`02:..`).
fn random_mac() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 5];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    ))
}

/// Puts every thread of process `pid` back at the default CPU priority (a
/// pooled VM's VMM, taken by a pod).
pub fn foreground(pid: u32) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority takes plain integers and touches no memory.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } == -1 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile is fine.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_locally_administered_unicast() {
        let mac = random_mac().unwrap();
        assert!(mac.starts_with("02:"), "{mac}");
        assert_eq!(mac.len(), 17);
        assert_ne!(mac, random_mac().unwrap());
    }

    #[test]
    fn a_pod_too_big_for_the_pool_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Host::for_tests(dir.path()).config;
        config.pool.size = 1;
        let Some(pool) = Pool::new(&config) else {
            eprintln!("SKIP: cannot create a network namespace here");
            return;
        };
        assert!(pool.take(2, 256).is_none());
        assert!(pool.take(1, 512).is_none());
        assert!(pool.take(1, 256).is_none(), "nothing booted yet");
    }
}
