//! The protocol adapters: each serves one wire protocol by converting its
//! messages to calls on the domain (`Registry`, `Sandbox`) and the results
//! back, with no pod logic of its own.
//!
//! - [`task`]: containerd's task API, to the shims and (zero-shim) on a
//!   sandbox's own socket;
//! - [`sandbox_api`]: containerd's shim sandbox API (the `shim` mode);
//! - [`controller`]: containerd's Sandbox Controller over gRPC (zero-shim);
//! - [`service`]: kuasar's own sandboxer service for the shims;
//! - [`admin`]: the operator's service for kuasarctl;
//! - [`task_conn`]: the zero-shim task socket, its connections held by
//!   the VMM and relayed, so that they outlive a kuasar-vmm restart;
//! - [`panic_guard`]: wraps every one of them so that a panic costs its
//!   request only.

pub(crate) mod admin;
pub(crate) mod controller;
pub(crate) mod panic_guard;
pub(crate) mod sandbox_api;
pub(crate) mod service;
pub(crate) mod task;
pub(crate) mod task_conn;
