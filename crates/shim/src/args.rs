//! Command line parsing, Go `flag` package style, as containerd invokes
//! shims: `-namespace ns -address addr -publish-binary path -id id
//! [-debug] [-bundle dir] start|delete`.
//!
//! Rules (the same as Go's `flag`): a flag is `-name` or `--name`; a value
//! is given as `-name value` or `-name=value`; boolean flags take no
//! separate value (`-debug`, `-debug=false`); flag parsing stops at the
//! first non-flag argument or after `--`. Unknown flags are rejected.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Start (or find) the shim serving this sandbox; print its address.
    Start,
    /// Clean up after a dead shim; print a `DeleteResponse`.
    Delete,
    /// Internal: the detached serving process spawned by `start`.
    Serve,
    /// `-v`: print the version.
    Version,
    /// `-info`: print a `RuntimeInfo` protobuf.
    Info,
    /// `-h`/`-help`: print usage.
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub namespace: String,
    /// containerd's gRPC address (`-address`).
    pub address: String,
    pub publish_binary: String,
    pub id: String,
    pub bundle: Option<PathBuf>,
    /// `-socket`: the shim's own socket (passed by `start` to `serve`).
    pub socket: Option<PathBuf>,
    pub debug: bool,
    pub verb: Verb,
}

pub const USAGE: &str = "usage: containerd-shim-kuasar-vmm-v2 -namespace NS -address ADDR \
-publish-binary PATH -id ID [-debug] [-bundle DIR] start|delete\n       \
containerd-shim-kuasar-vmm-v2 -v | -info";

const MAX_ID_LEN: usize = 128;

fn usage(msg: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{msg}\n{USAGE}"))
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(usage(format!(
            "invalid boolean value {v:?} for -{name}: parse error"
        ))),
    }
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Args>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut it = args.into_iter().map(Into::into).peekable();
    let mut a = Args {
        namespace: String::new(),
        address: String::new(),
        publish_binary: String::new(),
        id: String::new(),
        bundle: None,
        socket: None,
        debug: false,
        verb: Verb::Help,
    };
    let mut version = false;
    let mut info = false;
    let mut help = false;

    while let Some(arg) = it.peek() {
        if arg == "--" {
            it.next();
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        let arg = it.next().unwrap_or_default();
        let body = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .unwrap_or(&arg);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(usage(format!("bad flag syntax: {arg}")));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        match name {
            "debug" | "v" | "info" | "h" | "help" => {
                let on = match inline {
                    Some(v) => parse_bool(name, &v)?,
                    None => true,
                };
                match name {
                    "debug" => a.debug = on,
                    "v" => version = on,
                    "info" => info = on,
                    _ => help = on,
                }
            }
            "namespace" | "address" | "publish-binary" | "id" | "bundle" | "socket" => {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| usage(format!("flag needs an argument: -{name}")))?,
                };
                match name {
                    "namespace" => a.namespace = value,
                    "address" => a.address = value,
                    "publish-binary" => a.publish_binary = value,
                    "id" => a.id = value,
                    "bundle" => a.bundle = Some(PathBuf::from(value)),
                    _ => a.socket = Some(PathBuf::from(value)),
                }
            }
            _ => return Err(usage(format!("flag provided but not defined: -{name}"))),
        }
    }

    let rest: Vec<String> = it.collect();
    if help {
        a.verb = Verb::Help;
        return Ok(a);
    }
    if version {
        a.verb = Verb::Version;
        return Ok(a);
    }
    if info {
        a.verb = Verb::Info;
        return Ok(a);
    }
    a.verb = match rest.first().map(String::as_str) {
        Some("start") => Verb::Start,
        Some("delete") => Verb::Delete,
        Some("serve") => Verb::Serve,
        Some(other) => return Err(usage(format!("unknown action {other:?}"))),
        None => return Err(usage("missing action (start or delete)")),
    };
    if rest.len() > 1 {
        return Err(usage(format!(
            "unexpected arguments after {:?}: {:?}",
            rest[0],
            &rest[1..]
        )));
    }
    if a.namespace.is_empty() {
        return Err(usage("-namespace is required"));
    }
    if a.id.is_empty() {
        return Err(usage("-id is required"));
    }
    validate_id(&a.id)?;
    validate_namespace(&a.namespace)?;
    Ok(a)
}

fn check_name(what: &'static str, value: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::Invalid {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return invalid("must not be empty");
    }
    if value.len() > MAX_ID_LEN {
        return invalid("longer than 128 bytes");
    }
    if value == "." || value == ".." {
        return invalid("must not be \".\" or \"..\"");
    }
    if value.contains('/') {
        return invalid("must not contain '/'");
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return invalid("must not contain whitespace or control characters");
    }
    Ok(())
}

/// A sandbox/task id: non-empty, at most 128 bytes, no '/', not "." or
/// "..", no whitespace or control characters (it names files and sockets).
pub fn validate_id(id: &str) -> Result<()> {
    check_name("id", id)
}

pub fn validate_namespace(ns: &str) -> Result<()> {
    check_name("namespace", ns)
}

/// containerd's ttrpc address (where task events go): `$TTRPC_ADDRESS`,
/// which containerd sets for shims, else `<grpc address>.ttrpc`
/// (containerd's convention).
pub fn ttrpc_address(grpc_address: &str) -> String {
    match std::env::var("TTRPC_ADDRESS") {
        Ok(a) if !a.is_empty() => a,
        _ if grpc_address.is_empty() => String::new(),
        _ => format!("{grpc_address}.ttrpc"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args> {
        parse(args.iter().copied())
    }

    #[test]
    fn containerd_start_command_line() {
        let a = p(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc123",
            "-debug",
            "start",
        ])
        .expect("parses");
        assert_eq!(a.namespace, "k8s.io");
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert_eq!(a.publish_binary, "/usr/bin/containerd");
        assert_eq!(a.id, "abc123");
        assert!(a.debug);
        assert_eq!(a.bundle, None);
        assert_eq!(a.verb, Verb::Start);
    }

    #[test]
    fn delete_with_bundle_equals_and_double_dash() {
        let a = p(&[
            "--namespace=default",
            "-id=c1",
            "-bundle",
            "/run/b/c1",
            "-address=/a.sock",
            "-debug=false",
            "delete",
        ])
        .expect("parses");
        assert_eq!(a.namespace, "default");
        assert_eq!(a.id, "c1");
        assert_eq!(a.bundle, Some(PathBuf::from("/run/b/c1")));
        assert!(!a.debug);
        assert_eq!(a.verb, Verb::Delete);
    }

    #[test]
    fn version_and_info_need_no_action() {
        assert_eq!(p(&["-v"]).expect("parses").verb, Verb::Version);
        assert_eq!(
            p(&["-info", "-namespace", "x"]).expect("parses").verb,
            Verb::Info
        );
        assert_eq!(p(&["-h"]).expect("parses").verb, Verb::Help);
    }

    #[test]
    fn rejects_unknown_flag() {
        let e = p(&["-namespace", "n", "-id", "x", "-bogus", "start"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("flag provided but not defined: -bogus"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn rejects_missing_value_and_bad_syntax() {
        let e = p(&["-namespace"]).unwrap_err();
        assert!(e.to_string().contains("flag needs an argument: -namespace"));
        let e = p(&["---x", "start"]).unwrap_err();
        assert!(e.to_string().contains("bad flag syntax"));
        let e = p(&["-debug=maybe", "start"]).unwrap_err();
        assert!(e.to_string().contains("invalid boolean value"));
    }

    #[test]
    fn rejects_bad_actions() {
        let e = p(&["-namespace", "n", "-id", "x"]).unwrap_err();
        assert!(e.to_string().contains("missing action"), "{e}");
        let e = p(&["-namespace", "n", "-id", "x", "run"]).unwrap_err();
        assert!(e.to_string().contains("unknown action \"run\""), "{e}");
        let e = p(&["-namespace", "n", "-id", "x", "start", "extra"]).unwrap_err();
        assert!(e.to_string().contains("unexpected arguments"), "{e}");
        // Flags after the action are not flags (Go semantics).
        let e = p(&["-namespace", "n", "-id", "x", "start", "-debug"]).unwrap_err();
        assert!(e.to_string().contains("unexpected arguments"), "{e}");
    }

    #[test]
    fn requires_namespace_and_id() {
        let e = p(&["-id", "x", "start"]).unwrap_err();
        assert!(e.to_string().contains("-namespace is required"));
        let e = p(&["-namespace", "n", "start"]).unwrap_err();
        assert!(e.to_string().contains("-id is required"));
    }

    #[test]
    fn id_validation() {
        for good in ["a", "abc-DEF_1.2", &"f".repeat(64), &"x".repeat(128)] {
            validate_id(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "a b",
            "a\nb",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        let e = p(&["-namespace", "n", "-id", "..", "start"]).unwrap_err();
        assert!(e.to_string().starts_with("invalid id \"..\""), "{e}");
        assert_eq!(e.exit_code(), 1);
    }
}
