//! Where a sandbox is in its life, in one value behind one lock, and every
//! transition between its phases. The transitions are pure functions on a
//! [`Phase`]: the effects (booting, stopping the VM, releasing the network)
//! happen in vm.rs and lifecycle.rs between them, never under the lock.
//!
//! ```text
//!   Created --begin_boot--> Booting --end_boot(ok)--> Running
//!      ^                       |                        |
//!      +-----end_boot(err)-----+                        | begin_teardown
//!   Created/Running --begin_teardown--> Stopping --end_teardown--> Stopped
//! ```
//! A boot or a teardown that finds another one under way waits for the
//! phase to change (the lock is a watch channel) and asks again.
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::agent::Agent;
use crate::net::NetAttachment;
use crate::portforward::PortForward;
use crate::state::NetRecord;
use crate::vmm::{VmExit, Vmm};

use super::VmShape;

/// Exit status of a sandbox stopped on request.
pub(super) const STOPPED_STATUS: u32 = 0;
/// Exit status of a sandbox whose VM died.
pub(super) const DIED_STATUS: u32 = 255;

pub(super) enum Phase {
    /// Known; no VM (yet).
    Created,
    /// Its VM is being booted by one request; others wait.
    Booting,
    /// The VM runs and its agent is connected.
    Running(Arc<Live>),
    /// Being torn down by one request; others wait.
    Stopping,
    /// Ended: the VM is stopped and what it held released.
    Stopped(Ended),
}

/// What a running VM holds. Shared (`Arc`) so that a request can use it
/// without holding the phase's lock; a teardown takes it out of the phase
/// first, so nothing new starts on it.
pub(super) struct Live {
    pub vmm: tokio::sync::Mutex<Box<dyn Vmm>>,
    pub agent: Agent,
    /// The VMM's pid.
    pub pid: u32,
    /// Where the agent is reached (persisted for a restart).
    pub agent_address: String,
    pub shape: VmShape,
    /// What the teardown releases on the host; taken once.
    pub held: Mutex<Held>,
    /// The name the VMM was booted with when it is not the sandbox id (a
    /// pooled VM's).
    pub vm_name: Option<String>,
}

/// The host resources of a running VM that its teardown releases.
#[derive(Default)]
pub(super) struct Held {
    /// The pod's network as this run attached it.
    pub net: Option<NetAttachment>,
    /// The pod's network as an earlier run attached it (an adopted VM:
    /// QEMU holds the taps, the record names them).
    pub adopted_net: Option<NetRecord>,
    pub port_forward: Option<PortForward>,
    /// The VMM's cgroup below the pod's cgroup parent.
    pub cgroup: Option<crate::cgroup::VmmCgroup>,
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ended {
    pub status: u32,
    pub at: SystemTime,
    /// The VM it had, if it ever ran (its console log stays readable).
    pub shape: Option<VmShape>,
}

/// Why a sandbox is torn down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// StopSandbox (or the controller's Stop): the VM goes, the sandbox
    /// stays known, stopped, until it is removed.
    Stop { grace: std::time::Duration },
    /// The VMM exited without being asked to.
    VmDied(Option<VmExit>),
    /// The sandbox is removed: everything goes, its directory too.
    Remove,
}

impl Reason {
    pub fn status(self) -> u32 {
        match self {
            Reason::VmDied(_) => DIED_STATUS,
            Reason::Stop { .. } | Reason::Remove => STOPPED_STATUS,
        }
    }
}

/// What a request that needs the VM does next.
pub(super) enum BootStep {
    /// Boot it: the phase is now Booting, and this request must end it with
    /// [`end_boot`].
    Boot,
    /// Another request boots or stops it: wait for the phase to change.
    Wait,
    /// It runs.
    Ready(Arc<Live>),
    /// It ended; no VM will run again.
    Ended,
}

pub(super) fn begin_boot(phase: &mut Phase) -> BootStep {
    match phase {
        Phase::Created => {
            *phase = Phase::Booting;
            BootStep::Boot
        }
        Phase::Booting | Phase::Stopping => BootStep::Wait,
        Phase::Running(live) => BootStep::Ready(live.clone()),
        Phase::Stopped(_) => BootStep::Ended,
    }
}

/// Ends a boot begun with [`begin_boot`]: Running with `live`, or back to
/// Created when it failed (a later request may boot again).
pub(super) fn end_boot(phase: &mut Phase, live: Option<Arc<Live>>) {
    debug_assert!(matches!(phase, Phase::Booting));
    *phase = match live {
        Some(live) => Phase::Running(live),
        None => Phase::Created,
    };
}

/// What a teardown does next.
pub(super) enum TeardownStep {
    /// Tear down: the phase is now Stopping (or, for removing a stopped
    /// sandbox, stays Stopped), and this request must end it with
    /// [`end_teardown`]. Carries the running VM, if any.
    Proceed(Option<Arc<Live>>),
    /// A boot or another teardown is under way: wait for the phase to
    /// change.
    Wait,
    /// Nothing to do: already stopped (or, for a VM's death, stopped on
    /// request meanwhile, or never that VM's sandbox's running one).
    Done,
}

pub(super) fn begin_teardown(phase: &mut Phase, reason: Reason) -> TeardownStep {
    match (&*phase, reason) {
        // Only a running VM can die; once a stop took it, its exit is the
        // stop's doing.
        (Phase::Running(_), _) => {
            let Phase::Running(live) = std::mem::replace(phase, Phase::Stopping) else {
                unreachable!()
            };
            TeardownStep::Proceed(Some(live))
        }
        (_, Reason::VmDied(_)) => TeardownStep::Done,
        (Phase::Created, _) => {
            *phase = Phase::Stopping;
            TeardownStep::Proceed(None)
        }
        (Phase::Booting | Phase::Stopping, _) => TeardownStep::Wait,
        (Phase::Stopped(_), Reason::Remove) => TeardownStep::Proceed(None),
        (Phase::Stopped(_), _) => TeardownStep::Done,
    }
}

/// Ends a teardown begun with [`begin_teardown`]: Stopped, keeping the end
/// recorded first (a removed sandbox that had stopped keeps its status).
pub(super) fn end_teardown(phase: &mut Phase, reason: Reason, shape: Option<VmShape>) {
    if let Phase::Stopped(_) = phase {
        return;
    }
    *phase = Phase::Stopped(Ended {
        status: reason.status(),
        at: SystemTime::now(),
        shape,
    });
}

impl Phase {
    pub fn live(&self) -> Option<&Arc<Live>> {
        match self {
            Phase::Running(live) => Some(live),
            _ => None,
        }
    }

    pub fn ended(&self) -> Option<&Ended> {
        match self {
            Phase::Stopped(ended) => Some(ended),
            _ => None,
        }
    }

    /// Stopping or stopped: a process's exit is part of the sandbox's end.
    pub fn is_ending(&self) -> bool {
        matches!(self, Phase::Stopping | Phase::Stopped(_))
    }

    /// Settled: neither booting nor stopping.
    pub fn is_settled(&self) -> bool {
        !matches!(self, Phase::Booting | Phase::Stopping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STOP: Reason = Reason::Stop {
        grace: Duration::ZERO,
    };
    const DIED: Reason = Reason::VmDied(None);

    fn name(p: &Phase) -> &'static str {
        match p {
            Phase::Created => "created",
            Phase::Booting => "booting",
            Phase::Running(_) => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped(_) => "stopped",
        }
    }

    fn step(s: &TeardownStep) -> &'static str {
        match s {
            TeardownStep::Proceed(Some(_)) => "proceed with the VM",
            TeardownStep::Proceed(None) => "proceed",
            TeardownStep::Wait => "wait",
            TeardownStep::Done => "done",
        }
    }

    fn stopped(status: u32) -> Phase {
        Phase::Stopped(Ended {
            status,
            at: SystemTime::now(),
            shape: None,
        })
    }

    #[test]
    fn a_boot_runs_once_and_a_failed_one_can_be_retried() {
        let mut p = Phase::Created;
        assert!(matches!(begin_boot(&mut p), BootStep::Boot));
        assert_eq!(name(&p), "booting");
        // A second request meanwhile waits for the first.
        assert!(matches!(begin_boot(&mut p), BootStep::Wait));
        end_boot(&mut p, None);
        assert_eq!(name(&p), "created");
        assert!(matches!(begin_boot(&mut p), BootStep::Boot));
    }

    #[test]
    fn no_boot_after_the_end_nor_during_a_stop() {
        let mut p = Phase::Stopping;
        assert!(matches!(begin_boot(&mut p), BootStep::Wait));
        let mut p = stopped(0);
        assert!(matches!(begin_boot(&mut p), BootStep::Ended));
        assert_eq!(name(&p), "stopped");
    }

    /// A phase to start from, a teardown's reason, the step it gives and
    /// the phase after it.
    type Case = (fn() -> Phase, Reason, &'static str, &'static str);

    #[test]
    fn teardown_from_each_phase() {
        let cases: [Case; 12] = [
            (|| Phase::Created, STOP, "proceed", "stopping"),
            (|| Phase::Created, Reason::Remove, "proceed", "stopping"),
            (|| Phase::Created, DIED, "done", "created"),
            (|| Phase::Booting, STOP, "wait", "booting"),
            (|| Phase::Booting, Reason::Remove, "wait", "booting"),
            (|| Phase::Booting, DIED, "done", "booting"),
            (|| Phase::Stopping, STOP, "wait", "stopping"),
            (|| Phase::Stopping, Reason::Remove, "wait", "stopping"),
            (|| Phase::Stopping, DIED, "done", "stopping"),
            (|| stopped(0), STOP, "done", "stopped"),
            (|| stopped(0), Reason::Remove, "proceed", "stopped"),
            (|| stopped(0), DIED, "done", "stopped"),
        ];
        for (phase, reason, want_step, want_after) in cases {
            let mut p = phase();
            let before = name(&p);
            let s = begin_teardown(&mut p, reason);
            assert_eq!(
                (step(&s), name(&p)),
                (want_step, want_after),
                "{before} + {reason:?}"
            );
        }
    }

    #[test]
    fn the_first_end_counts() {
        // A stop and the VM's death race: the stop took the VM first, so
        // the death changes nothing, and the end is the stop's.
        let mut p = Phase::Stopping;
        assert!(matches!(begin_teardown(&mut p, DIED), TeardownStep::Done));
        end_teardown(&mut p, STOP, None);
        assert_eq!(p.ended().map(|e| e.status), Some(STOPPED_STATUS));
        // Removing a sandbox whose VM died keeps the death's status.
        let mut p = stopped(DIED_STATUS);
        assert!(matches!(
            begin_teardown(&mut p, Reason::Remove),
            TeardownStep::Proceed(None)
        ));
        end_teardown(&mut p, Reason::Remove, None);
        assert_eq!(p.ended().map(|e| e.status), Some(DIED_STATUS));
    }

    #[test]
    fn statuses() {
        assert_eq!(DIED.status(), 255);
        assert_eq!(STOP.status(), 0);
        assert_eq!(Reason::Remove.status(), 0);
    }
}
