//! containerd 2.3's shim bootstrap protocol: `start` reads a
//! `BootstrapParams` message (protobuf) on stdin and answers a
//! `BootstrapResult` on stdout. containerd 2.1 writes the runtime options
//! (or nothing) on stdin and reads a bare address: that path stays, chosen
//! by what arrives on stdin. containerd 2.3 still passes the flags and the
//! environment too; the bootstrap values win where both are given, and
//! `start` needs no flag when they are there.
use std::io::Read;

use kuasar_api::bootstrap::{BootstrapParams, BootstrapResult, LogLevel};
use kuasar_api::protobuf::Message;

use crate::args::Args;
use crate::error::{Error, Result};

/// The most `start` reads from stdin (containerd's own shims' bound).
const MAX_INPUT: u64 = 10 << 20;
/// The task API version and protocol the shim serves.
const SHIM_VERSION: i32 = 2;
const PROTOCOL: &str = "ttrpc";

/// Reads stdin whole (containerd closes it after writing).
pub fn read_stdin() -> Result<Vec<u8>> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_INPUT)
        .read_to_end(&mut input)
        .map_err(|e| Error::io("read stdin", e))?;
    Ok(input)
}

/// The bootstrap parameters in `input`, when that is what containerd sent:
/// they decode, and name a task, the one `-id` names if it is given. (2.1's
/// runtime options can decode as these messages; they never name the task.)
pub fn params(input: &[u8], args: &Args) -> Option<BootstrapParams> {
    if input.is_empty() {
        return None;
    }
    let p = BootstrapParams::parse_from_bytes(input).ok()?;
    if p.instance_id.is_empty() || (!args.id.is_empty() && p.instance_id != args.id) {
        return None;
    }
    Some(p)
}

/// Takes the bootstrap values into `args`, over the flags'.
pub fn apply(p: &BootstrapParams, args: &mut Args) {
    args.id.clone_from(&p.instance_id);
    let set = |field: &mut String, value: &str| {
        if !value.is_empty() {
            value.clone_into(field);
        }
    };
    set(&mut args.namespace, &p.namespace);
    set(&mut args.address, &p.containerd_grpc_address);
    set(&mut args.publish_binary, &p.containerd_binary);
    if !p.containerd_ttrpc_address.is_empty() {
        args.ttrpc = Some(p.containerd_ttrpc_address.clone());
    }
    let level = p.log_level.enum_value_or_default();
    if matches!(level, LogLevel::LOG_LEVEL_DEBUG | LogLevel::LOG_LEVEL_TRACE) {
        args.debug = true;
    }
    args.bootstrapped = true;
}

/// The answer to a bootstrap `start`: where the shim serves.
pub fn result(address: &str) -> Result<Vec<u8>> {
    let mut r = BootstrapResult::new();
    r.version = SHIM_VERSION;
    r.address = address.to_owned();
    r.protocol = PROTOCOL.to_owned();
    r.write_to_bytes()
        .map_err(|e| Error::Other(format!("encode BootstrapResult: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: &str) -> Args {
        crate::args::parse([
            "-namespace",
            "flags-ns",
            "-id",
            id,
            "-address",
            "/flags",
            "start",
        ])
        .expect("parse")
    }

    fn params_for(id: &str) -> BootstrapParams {
        let mut p = BootstrapParams::new();
        p.instance_id = id.into();
        p.namespace = "k8s.io".into();
        p.containerd_grpc_address = "/run/containerd/containerd.sock".into();
        p.containerd_ttrpc_address = "/run/containerd/containerd.sock.ttrpc".into();
        p.containerd_binary = "/usr/bin/containerd".into();
        p.log_level = LogLevel::LOG_LEVEL_DEBUG.into();
        p
    }

    #[test]
    fn bootstrap_params_win_over_flags() {
        let input = params_for("task1").write_to_bytes().unwrap();
        let mut a = args("task1");
        let p = params(&input, &a).expect("bootstrap params");
        apply(&p, &mut a);
        assert!(a.bootstrapped && a.debug);
        assert_eq!(a.namespace, "k8s.io");
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert_eq!(a.publish_binary, "/usr/bin/containerd");
        assert_eq!(a.ttrpc_address(), "/run/containerd/containerd.sock.ttrpc");
    }

    #[test]
    fn without_flags_the_params_name_the_task() {
        let mut a = crate::args::parse(["start"]).expect("start needs no flag");
        let input = params_for("task1").write_to_bytes().unwrap();
        let p = params(&input, &a).expect("bootstrap params");
        apply(&p, &mut a);
        assert_eq!(a.id, "task1");
        a.check_required().expect("complete");
    }

    #[test]
    fn legacy_stdin_is_not_bootstrap() {
        let a = args("task1");
        assert!(params(b"", &a).is_none());
        // Another task's parameters, garbage, and 2.1's runtime options (a
        // protobuf Any, whose type URL decodes as an instance id).
        let other = params_for("task2").write_to_bytes().unwrap();
        assert!(params(&other, &a).is_none());
        assert!(params(b"\xff\xff\xff", &a).is_none());
        let mut any = kuasar_api::protobuf::well_known_types::any::Any::new();
        any.type_url = "containerd.runc.v1.Options".into();
        any.value = vec![0x08, 0x01];
        assert!(params(&any.write_to_bytes().unwrap(), &a).is_none());
    }

    #[test]
    fn result_decodes_as_containerd_reads_it() {
        let bytes = result("unix:///run/containerd/s/abc").unwrap();
        let r = BootstrapResult::parse_from_bytes(&bytes).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.address, "unix:///run/containerd/s/abc");
        assert_eq!(r.protocol, "ttrpc");
    }
}
