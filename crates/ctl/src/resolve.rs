//! Sandbox ids given by a unique prefix.
use crate::error::CtlError;

/// How many candidates an error names at most.
const SHOWN: usize = 10;

/// The one id of `ids` that is `given` or starts with it.
pub fn resolve<'a>(
    given: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<&'a str, CtlError> {
    let ids: Vec<&str> = ids.into_iter().collect();
    if let Some(id) = ids.iter().find(|id| **id == given) {
        return Ok(id);
    }
    let mut matches: Vec<&str> = if given.is_empty() {
        Vec::new()
    } else {
        ids.iter()
            .copied()
            .filter(|id| id.starts_with(given))
            .collect()
    };
    matches.sort_unstable();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => {
            let mut known = ids.clone();
            known.sort_unstable();
            Err(CtlError::UnknownSandbox {
                id: given.to_owned(),
                known: listing(&known),
            })
        }
        many => Err(CtlError::AmbiguousSandbox {
            prefix: given.to_owned(),
            candidates: listing(many),
        }),
    }
}

fn listing(ids: &[&str]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    let mut text = ids[..ids.len().min(SHOWN)].join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: [&str; 3] = ["abc123", "abd456", "xyz"];

    #[test]
    fn a_unique_prefix_names_its_sandbox() {
        assert_eq!(resolve("abc", IDS).unwrap(), "abc123");
        assert_eq!(resolve("x", IDS).unwrap(), "xyz");
    }

    #[test]
    fn a_whole_id_wins_over_longer_ids() {
        assert_eq!(resolve("ab", ["ab", "abc"]).unwrap(), "ab");
    }

    #[test]
    fn an_ambiguous_prefix_lists_the_candidates() {
        let e = resolve("ab", IDS).unwrap_err();
        assert!(matches!(e, CtlError::AmbiguousSandbox { .. }));
        assert_eq!(
            e.to_string(),
            "sandbox id prefix ab is ambiguous: abc123, abd456"
        );
    }

    #[test]
    fn an_unknown_id_is_named_with_the_known_ones() {
        let e = resolve("nope", IDS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no sandbox nope (known: abc123, abd456, xyz)"
        );
        let e = resolve("", IDS).unwrap_err();
        assert!(matches!(e, CtlError::UnknownSandbox { .. }), "{e}");
        let e = resolve("a", []).unwrap_err();
        assert_eq!(e.to_string(), "no sandbox a (known: none)");
    }

    #[test]
    fn long_listings_are_cut() {
        let ids: Vec<String> = (0..12).map(|i| format!("id{i:02}")).collect();
        let e = resolve("id", ids.iter().map(String::as_str)).unwrap_err();
        assert!(e.to_string().ends_with("id09 and 2 more"), "{e}");
    }
}
