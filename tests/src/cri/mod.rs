//! A CRI v1 client for the tests: containerd's `runtime.v1.RuntimeService` and
//! `ImageService` over its Unix socket, with a deadline on every call.
//!
//! - [`proto`]: the generated messages and clients (protos/cri/api.proto);
//! - [`client`]: [`Cri`], a blocking, typed wrapper over both services;
//! - [`guard`]: removal of pods and containers when a test ends;
//! - [`spec`]: builders for pod and container configurations;
//! - [`stream`]: exec/attach through the streaming server (Kubernetes
//!   remote-command protocol over WebSocket);
//! - [`portforward`]: port forwarding through the streaming server
//!   (Kubernetes port-forward protocol over WebSocket);
//! - [`logs`]: the CRI log format at a container's log path.
pub mod client;
pub mod guard;
pub mod logs;
pub mod portforward;
pub mod spec;
pub mod stream;

/// Messages and gRPC clients of CRI v1 (package `runtime.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("runtime.v1");
}

pub use client::{Cri, CALL_TIMEOUT};
pub use guard::{ContainerGuard, PodGuard};
pub use logs::{LogLine, LogStream};
pub use portforward::{Forwarded, PortForwardSession};
pub use stream::StreamOutput;
pub use tonic::{Code, Status};
