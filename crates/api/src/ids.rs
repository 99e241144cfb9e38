//! The rules for sandbox, container and exec ids, at each boundary that
//! receives them.
//!
//! An id ends up as a file or directory name (a sandbox's state directory
//! on the host, a container's bundle in the guest), so every boundary
//! refuses what could name another place: an empty id, `.`, `..` and `/`.
//! Beyond that the boundaries differ, on purpose:
//!
//! - kuasar-vmm (the sandboxer) is the strictest ([`Boundary::Sandboxer`]):
//!   containerd's own identifier characters plus `+ @ :`, never `..`, at
//!   most [`SANDBOXER_MAX_LEN`] bytes. It is the one gate every id passes
//!   before anything is created for it.
//! - the shim ([`Boundary::Shim`]) checks what containerd put on its
//!   command line before it uses it: no whitespace or control characters,
//!   at most [`SHIM_MAX_LEN`] bytes. What it lets through still has to pass
//!   kuasar-vmm when the shim registers the sandbox.
//! - the guest agent ([`Boundary::Agent`]) only receives ids kuasar-vmm has
//!   checked; it refuses what would be unsafe as a file name (`/`, NUL),
//!   up to [`AGENT_MAX_LEN`] bytes, as a second line of defence. Its rules
//!   are looser than kuasar-vmm's so that it accepts everything kuasar-vmm
//!   sends.
//!
//! [`check`] applies one boundary's rules and says what is wrong.

/// The longest id kuasar-vmm accepts, in bytes: containerd's own limit for
/// identifiers (76, `identifiers.Validate`), so every id containerd makes
/// fits. It also keeps a sandbox's sockets, `<state_dir>/<id>/agent.sock`
/// and `qmp.sock`, within the 107 bytes of a `sockaddr_un` path for the
/// default `state_dir` (`/run/kuasar/vmm`: 15 + 1 + 76 + 11 = 103 bytes).
pub const SANDBOXER_MAX_LEN: usize = 76;

/// The longest id (and namespace) the shim accepts on its command line, in
/// bytes. The shim names its own socket by a hash, so the id's length does
/// not matter to it; 128 only bounds what it logs and passes on. Ids longer
/// than [`SANDBOXER_MAX_LEN`] pass this check but kuasar-vmm refuses them
/// when the shim registers the sandbox, so 76 is what works end to end.
pub const SHIM_MAX_LEN: usize = 128;

/// The longest container or exec id the guest agent accepts, in bytes. The
/// agent only gets ids kuasar-vmm has already held to [`SANDBOXER_MAX_LEN`];
/// this generous bound only keeps a broken or hostile host from making it
/// handle unbounded names. It must never be below [`SANDBOXER_MAX_LEN`].
pub const AGENT_MAX_LEN: usize = 256;

// The agent accepts every id kuasar-vmm sends.
const _: () = assert!(AGENT_MAX_LEN >= SANDBOXER_MAX_LEN);

/// The characters kuasar-vmm allows besides ASCII letters and digits.
const SANDBOXER_PUNCTUATION: &str = "-_.+@:";

/// A place that checks ids: each has its own length limit and characters
/// (see the module's documentation for why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// kuasar-vmm, on every id it receives (shims, containerd, kuasarctl).
    Sandboxer,
    /// The shim, on its `-id`, `-namespace` and the pod's sandbox id.
    Shim,
    /// The guest agent, on container and exec ids from kuasar-vmm.
    Agent,
}

impl Boundary {
    /// The longest id this boundary accepts, in bytes.
    pub const fn max_len(self) -> usize {
        match self {
            Boundary::Sandboxer => SANDBOXER_MAX_LEN,
            Boundary::Shim => SHIM_MAX_LEN,
            Boundary::Agent => AGENT_MAX_LEN,
        }
    }

    /// Whether `c` may appear in an id here (`/` never may).
    fn allows(self, c: char) -> bool {
        match self {
            Boundary::Sandboxer => c.is_ascii_alphanumeric() || SANDBOXER_PUNCTUATION.contains(c),
            Boundary::Shim => c != '/' && !c.is_whitespace() && !c.is_control(),
            Boundary::Agent => c != '/' && c != '\0',
        }
    }
}

/// What is wrong with an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("is empty")]
    Empty,
    /// The id is longer than the boundary's limit.
    #[error("is {len} bytes long, more than {max}")]
    TooLong {
        /// The id's length in bytes.
        len: usize,
        /// The boundary's limit in bytes.
        max: usize,
    },
    /// The id is `.` or `..`.
    #[error("is \".\" or \"..\"")]
    DotName,
    /// The id contains `..` (kuasar-vmm refuses it anywhere in an id).
    #[error("contains \"..\"")]
    DotDot,
    /// The id contains a character the boundary does not allow; `/` is
    /// reported before any other.
    #[error("contains the character {0:?}")]
    BadChar(char),
}

/// Checks `id` against `boundary`'s rules, in this order: not empty, not
/// too long, not `.` or `..` (nor containing `..`, for kuasar-vmm), then
/// its characters (`/` first).
pub fn check(boundary: Boundary, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    let max = boundary.max_len();
    if id.len() > max {
        return Err(IdError::TooLong { len: id.len(), max });
    }
    if id == "." || id == ".." {
        return Err(IdError::DotName);
    }
    if boundary == Boundary::Sandboxer && id.contains("..") {
        return Err(IdError::DotDot);
    }
    if id.contains('/') {
        return Err(IdError::BadChar('/'));
    }
    match id.chars().find(|&c| !boundary.allows(c)) {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Boundary; 3] = [Boundary::Sandboxer, Boundary::Shim, Boundary::Agent];

    #[test]
    fn ordinary_ids_pass_everywhere() {
        let long = "f".repeat(SANDBOXER_MAX_LEN);
        for b in ALL {
            for id in ["a", "abc-DEF_1.2", "x+y@z:1", long.as_str()] {
                assert_eq!(check(b, id), Ok(()), "{b:?} {id:?}");
            }
        }
    }

    #[test]
    fn what_every_boundary_refuses() {
        for b in ALL {
            assert_eq!(check(b, ""), Err(IdError::Empty), "{b:?}");
            assert_eq!(check(b, "."), Err(IdError::DotName), "{b:?}");
            assert_eq!(check(b, ".."), Err(IdError::DotName), "{b:?}");
            assert_eq!(check(b, "a/b"), Err(IdError::BadChar('/')), "{b:?}");
            assert_eq!(check(b, "/"), Err(IdError::BadChar('/')), "{b:?}");
            assert!(
                matches!(check(b, "a\0b"), Err(IdError::BadChar('\0'))),
                "{b:?}"
            );
        }
    }

    #[test]
    fn each_boundary_has_its_limit() {
        for (b, max) in [
            (Boundary::Sandboxer, 76),
            (Boundary::Shim, 128),
            (Boundary::Agent, 256),
        ] {
            assert_eq!(b.max_len(), max);
            assert_eq!(check(b, &"x".repeat(max)), Ok(()), "{b:?}");
            assert_eq!(
                check(b, &"x".repeat(max + 1)),
                Err(IdError::TooLong { len: max + 1, max }),
                "{b:?}"
            );
        }
    }

    #[test]
    fn the_boundaries_differ_in_characters() {
        // kuasar-vmm: a fixed set, and no `..` anywhere.
        assert_eq!(check(Boundary::Sandboxer, "a..b"), Err(IdError::DotDot));
        assert_eq!(check(Boundary::Sandboxer, "../x"), Err(IdError::DotDot));
        assert_eq!(
            check(Boundary::Sandboxer, "a b"),
            Err(IdError::BadChar(' '))
        );
        assert_eq!(
            check(Boundary::Sandboxer, "a=b"),
            Err(IdError::BadChar('='))
        );
        assert_eq!(check(Boundary::Sandboxer, "é"), Err(IdError::BadChar('é')));
        // The shim: no whitespace or control characters.
        assert_eq!(check(Boundary::Shim, "a..b"), Ok(()));
        assert_eq!(check(Boundary::Shim, "a=é"), Ok(()));
        assert_eq!(check(Boundary::Shim, "a b"), Err(IdError::BadChar(' ')));
        assert_eq!(check(Boundary::Shim, "a\nb"), Err(IdError::BadChar('\n')));
        // The agent: only what is unsafe in a file name.
        assert_eq!(check(Boundary::Agent, "a b=é\n"), Ok(()));
    }

    #[test]
    fn problems_come_in_a_fixed_order() {
        let long = format!("{}/", "x".repeat(SANDBOXER_MAX_LEN));
        assert!(matches!(
            check(Boundary::Sandboxer, &long),
            Err(IdError::TooLong { .. })
        ));
        assert_eq!(check(Boundary::Sandboxer, "a/..b"), Err(IdError::DotDot));
        // `/` before any other bad character.
        assert_eq!(check(Boundary::Shim, "a b/c"), Err(IdError::BadChar('/')));
        assert_eq!(
            check(Boundary::Sandboxer, "a=b/c"),
            Err(IdError::BadChar('/'))
        );
    }

    #[test]
    fn the_agent_and_the_shim_accept_what_kuasar_vmm_accepts() {
        let allowed: Vec<char> = (char::MIN..=char::MAX)
            .filter(|&c| Boundary::Sandboxer.allows(c))
            .collect();
        assert_eq!(allowed.len(), 62 + SANDBOXER_PUNCTUATION.len());
        for c in &allowed {
            assert!(Boundary::Agent.allows(*c), "{c:?}");
            assert!(Boundary::Shim.allows(*c), "{c:?}");
        }
        // Every allowed character, up to the longest id kuasar-vmm takes.
        let id: String = allowed.iter().cycle().take(SANDBOXER_MAX_LEN).collect();
        assert_eq!(check(Boundary::Sandboxer, &id), Ok(()));
        assert_eq!(check(Boundary::Agent, &id), Ok(()));
        assert_eq!(check(Boundary::Shim, &id), Ok(()));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            IdError::TooLong { len: 80, max: 76 }.to_string(),
            "is 80 bytes long, more than 76"
        );
        assert_eq!(
            IdError::BadChar('/').to_string(),
            "contains the character '/'"
        );
        assert_eq!(IdError::Empty.to_string(), "is empty");
    }
}
