//! End-to-end test harness: drives the real binaries (containerd, `ctr`,
//! kuasar-vmm, containerd-shim-kuasar-vmm-v2, QEMU) in a private environment
//! that never touches the node's own containerd.
//!
//! - [`env`]: [`Env`] (private containerd + kuasar-vmm under
//!   `/run/kuasar-e2e-<pid>`, torn down on drop or at exit) and helpers to run
//!   `ctr` against it;
//! - [`cmd`]: commands with deadlines and captured output;
//! - [`procs`]: the processes of an environment (counting, killing, unmounting);
//! - [`census`]: what an environment holds on the host (processes, mounts,
//!   network leftovers, sockets, kuasar-vmm's fds and threads), to compare;
//! - [`sandboxer`]: kuasar-vmm with a configuration of the test's choice;
//! - [`wire`]: a minimal protobuf/ttrpc codec to talk to the sandboxer directly.
//!
//! The tests live in `tests/tests/*.rs`; they need `make build guest images`.
pub mod census;
pub mod cmd;
pub mod cri;
pub mod env;
pub mod netns;
pub mod paths;
pub mod procs;
pub mod sandboxer;
pub mod wire;

pub use cmd::Output;
pub use env::{shared, Env, EnvOptions};
pub use paths::{BUSYBOX, RUNTIME};
