//! Command line parsing, Go `flag` package style, as containerd invokes
//! shims: `-namespace ns -address addr -publish-binary path -id id
//! [-debug] [-bundle dir] start|delete`.
//!
//! Rules (the same as Go's `flag`): a flag is `-name` or `--name`; a value
//! is given as `-name value` or `-name=value`; boolean flags take no
//! separate value (`-debug`, `-debug=false`); flag parsing stops at the
//! first non-flag argument or after `--`. Unknown flags are rejected.

use std::iter::Peekable;
use std::path::PathBuf;

use kuasar_api::ids::{self, IdError};

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
    /// containerd's ttrpc address, when the bootstrap protocol gave it.
    pub ttrpc: Option<String>,
    /// `start` was given containerd 2.3's bootstrap parameters (and
    /// answers in kind).
    pub bootstrapped: bool,
}

pub const USAGE: &str = "usage: containerd-shim-kuasar-vmm-v2 -namespace NS -address ADDR \
-publish-binary PATH -id ID [-debug] [-bundle DIR] start|delete\n       \
containerd-shim-kuasar-vmm-v2 -v | -info";

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

/// Parses the arguments after the program name, in three phases: the
/// flags, then the action word after them, then the checks of the required
/// flags. `-h`, `-v` and `-info` need no action and skip the last two.
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
        ttrpc: None,
        bootstrapped: false,
    };
    let flag_verb = parse_flags(&mut it, &mut a)?;
    let rest: Vec<String> = it.collect();
    if let Some(verb) = flag_verb {
        a.verb = verb;
        return Ok(a);
    }
    a.verb = parse_action(&rest)?;
    // `start` may get its namespace and id from containerd's bootstrap
    // parameters instead (it checks them once it has read those).
    if a.verb != Verb::Start {
        a.check_required()?;
    }
    Ok(a)
}

/// Phase 1: consumes the leading flags into `a`, stopping at the first
/// non-flag argument (left in `it`) or after `--`. Returns the verb that a
/// flag alone asks for, if any: `-h` wins over `-v`, which wins over
/// `-info` (the last value given for each flag counts).
fn parse_flags<I>(it: &mut Peekable<I>, a: &mut Args) -> Result<Option<Verb>>
where
    I: Iterator<Item = String>,
{
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
        let (name, inline) = split_flag(&arg)?;
        match name {
            "debug" | "v" | "info" | "h" | "help" => {
                let on = match inline {
                    Some(v) => parse_bool(name, v)?,
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
                    Some(v) => v.to_string(),
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

    Ok(if help {
        Some(Verb::Help)
    } else if version {
        Some(Verb::Version)
    } else if info {
        Some(Verb::Info)
    } else {
        None
    })
}

/// Splits one flag argument (`-name`, `--name`, `-name=value`) into its
/// name and its inline value, if any. Rejects `---x`, `-=x` and the like.
fn split_flag(arg: &str) -> Result<(&str, Option<&str>)> {
    let body = arg
        .strip_prefix("--")
        .or_else(|| arg.strip_prefix('-'))
        .unwrap_or(arg);
    if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
        return Err(usage(format!("bad flag syntax: {arg}")));
    }
    Ok(match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    })
}

/// Phase 2: the action word left after the flags (`start`, `delete` or
/// the internal `serve`), which must be the last argument.
fn parse_action(rest: &[String]) -> Result<Verb> {
    let verb = match rest.first().map(String::as_str) {
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
    Ok(verb)
}

/// Phase 3: `-namespace` and `-id` are given (a usage error if not) and
/// are valid names (the id is checked first).
impl Args {
    pub fn check_required(&self) -> Result<()> {
        if self.namespace.is_empty() {
            return Err(usage("-namespace is required"));
        }
        if self.id.is_empty() {
            return Err(usage("-id is required"));
        }
        validate_id(&self.id)?;
        validate_namespace(&self.namespace)?;
        Ok(())
    }

    /// containerd's ttrpc address (where task events go): the bootstrap
    /// parameters', else [`ttrpc_address`] of the gRPC address.
    pub fn ttrpc_address(&self) -> String {
        self.ttrpc
            .clone()
            .unwrap_or_else(|| ttrpc_address(&self.address))
    }
}

/// Checks an id or namespace with the shim's rules
/// ([`ids::Boundary::Shim`]).
fn check_name(what: &'static str, value: &str) -> Result<()> {
    ids::check(ids::Boundary::Shim, value).map_err(|e| Error::Invalid {
        what,
        value: value.to_string(),
        reason: match e {
            IdError::Empty => "must not be empty".into(),
            IdError::TooLong { max, .. } => format!("longer than {max} bytes"),
            IdError::DotName | IdError::DotDot => "must not be \".\" or \"..\"".into(),
            IdError::BadChar('/') => "must not contain '/'".into(),
            IdError::BadChar(_) => "must not contain whitespace or control characters".into(),
        },
    })
}

/// A sandbox/task id: non-empty, at most [`ids::SHIM_MAX_LEN`] bytes, no
/// '/', not "." or "..", no whitespace or control characters.
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
        let e = p(&["-id", "x", "delete"]).unwrap_err();
        assert!(e.to_string().contains("-namespace is required"));
        let e = p(&["-namespace", "n", "delete"]).unwrap_err();
        assert!(e.to_string().contains("-id is required"));
        // `start` checks once it has read containerd's bootstrap parameters.
        let a = p(&["-id", "x", "start"]).expect("start");
        let e = a.check_required().unwrap_err();
        assert!(e.to_string().contains("-namespace is required"));
    }

    #[test]
    fn split_flag_names_and_inline_values() {
        assert_eq!(split_flag("-id").expect("splits"), ("id", None));
        assert_eq!(split_flag("--id=x").expect("splits"), ("id", Some("x")));
        assert_eq!(split_flag("-id=a=b").expect("splits"), ("id", Some("a=b")));
        assert_eq!(split_flag("-id=").expect("splits"), ("id", Some("")));
        for bad in ["--", "---x", "-=x", "--=x"] {
            let e = split_flag(bad).unwrap_err();
            assert_eq!(
                e.to_string().lines().next(),
                Some(&*format!("bad flag syntax: {bad}"))
            );
        }
    }

    #[test]
    fn parse_action_takes_exactly_one_word() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_action(&words(&["start"])).expect("start"),
            Verb::Start
        );
        assert_eq!(
            parse_action(&words(&["delete"])).expect("delete"),
            Verb::Delete
        );
        assert_eq!(
            parse_action(&words(&["serve"])).expect("serve"),
            Verb::Serve
        );
        assert!(parse_action(&[]).is_err());
        assert!(parse_action(&words(&["Start"])).is_err());
        assert!(parse_action(&words(&["delete", "x"])).is_err());
    }

    #[test]
    fn last_value_counts_and_help_wins() {
        let a = p(&["-v", "-v=false", "-namespace", "n", "-id", "x", "start"]).expect("parses");
        assert_eq!(a.verb, Verb::Start);
        assert_eq!(
            p(&["-info", "-v", "-help"]).expect("parses").verb,
            Verb::Help
        );
        assert_eq!(p(&["-info", "-v"]).expect("parses").verb, Verb::Version);
        // Flag errors come before the action is looked at.
        let e = p(&["-v", "-bogus"]).unwrap_err();
        assert!(e.to_string().contains("not defined: -bogus"), "{e}");
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
        let e = p(&["-namespace", "n", "-id", "..", "delete"]).unwrap_err();
        let start = p(&["-namespace", "n", "-id", "..", "start"]).expect("start");
        assert_eq!(
            start.check_required().unwrap_err().to_string(),
            e.to_string()
        );
        assert!(e.to_string().starts_with("invalid id \"..\""), "{e}");
        // The wording the shim has always used.
        let said = |id: &str| validate_id(id).unwrap_err().to_string();
        assert_eq!(said(""), r#"invalid id "": must not be empty"#);
        assert!(said(&"x".repeat(129)).ends_with(": longer than 128 bytes"));
        assert_eq!(said(".."), r#"invalid id "..": must not be "." or "..""#);
        assert_eq!(said("a b/c"), r#"invalid id "a b/c": must not contain '/'"#);
        assert_eq!(
            said("a b"),
            r#"invalid id "a b": must not contain whitespace or control characters"#
        );
        assert!(validate_namespace(&"n".repeat(129)).is_err());
        assert_eq!(e.exit_code(), 1);
    }
}
