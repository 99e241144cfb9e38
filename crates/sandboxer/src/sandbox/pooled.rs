//! A sandbox taking a pooled VM (warm start, `crate::pool`): everything of
//! the pod is attached to the booted VM here, in the order a cold boot
//! would have given it: the VM's files move into the sandbox's directory,
//! the VMM into the pod's cgroup and back to the default CPU priority, the
//! pool's tap into the pod's network namespace, then the guest gets the
//! pod's host name, network (and MAC), DNS and sysctls. Whatever fails
//! destroys that VM (a pooled VM never serves another pod) and the pod
//! boots one of its own instead.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::phase::{Held, Live};
use super::*;
use crate::pool::{Pool, PooledVm};
use crate::vmm::VM_NAME_FILE;

impl Sandbox {
    /// A pooled VM set up for the pod, when the pool has one that fits
    /// (`size`, None: the default VM); None sends the pod to a cold boot.
    pub(super) async fn take_pooled(
        &self,
        pod: Option<&PodConfig>,
        size: Option<&crate::pod::VmSize>,
        started: Instant,
    ) -> Option<Arc<Live>> {
        let pool = self.host.pool.as_ref()?;
        let vm = &self.host.config.vm;
        let (vcpus, memory_mib) =
            size.map_or((vm.vcpus, vm.memory_mib), |s| (s.vcpus, s.memory_mib));
        if !pool.has(vcpus, memory_mib) {
            return None;
        }
        // Scanned before a VM is taken: a pod a pooled VM cannot serve (more
        // than one interface) leaves the pool as it is and boots its own.
        let link = match pod.and_then(|p| p.netns.as_deref()) {
            Some(netns) => match crate::net::pooled::scan_pod(netns).await {
                Ok(link) => Some(link),
                Err(e) => {
                    tracing::info!(sandbox = %self.info.id, "no pooled VM for this pod (booting one): {e}");
                    return None;
                }
            },
            None => None,
        };
        let pooled = pool.take(vcpus, memory_mib)?;
        let name = pooled.name.clone();
        match self.assign(pool, pooled, pod, link, started).await {
            Ok(live) => Some(live),
            Err(e) => {
                tracing::warn!(sandbox = %self.info.id, vm = %name, "the pooled VM could not take the pod (destroyed); booting one: {}", crate::error::chain(&e));
                None
            }
        }
    }

    async fn assign(
        &self,
        pool: &Pool,
        pooled: PooledVm,
        pod: Option<&PodConfig>,
        // The pod's network as scanned before the take (None: no netns).
        link: Option<crate::net::pooled::PodLink>,
        started: Instant,
    ) -> Result<Arc<Live>> {
        let PooledVm {
            name,
            dir,
            mut vm,
            agent,
            tap,
            mac,
            vcpus,
            memory_mib,
        } = pooled;
        let mut plan = self.vm_plan(Some(crate::pod::VmSize { vcpus, memory_mib }));
        let shape = VmShape::of(&plan);
        let mut held = Held::default();
        let mut moved = Vec::new();
        let attached = async {
            move_entries(&dir, &self.dir, &mut moved)?;
            vm.relocate(&self.dir);
            // The VMM, then its helpers (virtiofsd).
            let pids: Vec<u32> = vm.pid().into_iter().chain(vm.helper_pids()).collect();
            self.create_cgroup(pod, &mut plan, &mut held)?;
            for &pid in &pids {
                if let Some(cg) = &held.cgroup {
                    cg.move_process(pid)
                        .map_err(|e| Error::io("move the pooled VMM into the pod's cgroup", e))?;
                }
                crate::pool::foreground(pid)
                    .map_err(|e| Error::io("raise the pooled VMM's CPU priority", e))?;
            }
            if let Some(link) = link {
                let (tap_name, tap_fd) = tap;
                let net =
                    crate::net::pooled::hand_over(&pool.netns(), &tap_name, tap_fd, link).await?;
                held.net = Some(net);
            }
            self.setup_guest(&agent, pod, held.net.as_ref(), Some(&mac))
                .await
        }
        .await;
        if let Err(e) = attached {
            // The cgroup goes now, not in the background as after a VM's
            // end: the cold boot that follows creates it again.
            let cgroup = held.cgroup.take();
            let _ = vm.stop(Duration::ZERO).await;
            self.release(held).await;
            if let Some(cg) = cgroup {
                if let Err(e) = cg.remove_within(Duration::from_secs(5)).await {
                    tracing::warn!(sandbox = %self.info.id, "remove the cgroup of a destroyed pooled VM: {e}");
                }
            }
            for path in moved {
                let _ = crate::mount::remove_dir(&path).or_else(|_| std::fs::remove_file(&path));
            }
            let _ = crate::mount::remove_dir(&dir);
            return Err(e);
        }
        let pid = vm.pid().unwrap_or(0);
        tracing::info!(sandbox = %self.info.id, vm = %name, pid, boot_ms = started.elapsed().as_millis() as u64, "pooled VM taken; agent ready");
        Ok(self.go_live(vm, agent, shape, held, pod, Some(name)).await)
    }
}

/// Moves everything in directory `from` into `to` (created if missing; a
/// zero-shim sandbox's task socket may be there already), the VM's name
/// first, then removes `from`. What moved is pushed to `moved`, for undoing.
fn move_entries(from: &Path, to: &Path, moved: &mut Vec<PathBuf>) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(format!("create {}", to.display()), e))?;
    let mut names: Vec<_> = std::fs::read_dir(from)
        .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| Error::io(format!("list {}", from.display()), e))?;
    names.sort_by_key(|n| n != VM_NAME_FILE);
    for n in names {
        let target = to.join(&n);
        std::fs::rename(from.join(&n), &target).map_err(|e| {
            Error::io(
                format!("move {} into {}", from.join(&n).display(), to.display()),
                e,
            )
        })?;
        moved.push(target);
    }
    std::fs::remove_dir(from).map_err(|e| Error::io(format!("remove {}", from.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_move_name_first_and_the_source_goes() {
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("pool-1"), t.path().join("sb"));
        std::fs::create_dir_all(from.join("shared")).unwrap();
        std::fs::write(from.join("qemu.pid"), "1").unwrap();
        std::fs::write(from.join(VM_NAME_FILE), "pool-1").unwrap();
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(to.join("task.sock"), "").unwrap();
        let mut moved = Vec::new();
        move_entries(&from, &to, &mut moved).unwrap();
        assert_eq!(moved[0], to.join(VM_NAME_FILE));
        assert_eq!(moved.len(), 3);
        assert!(!from.exists());
        assert!(to.join("shared").is_dir() && to.join("task.sock").exists());
        assert_eq!(crate::vmm::vm_name(&to), "pool-1");
        let err = move_entries(&from, &to, &mut moved).unwrap_err();
        assert!(err.to_string().contains("pool-1"), "{err}");
    }
}
