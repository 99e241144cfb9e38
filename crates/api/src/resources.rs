//! The resources of a task update (containerd's `UpdateTaskRequest`): the
//! OCI `LinuxResources` as JSON, which kuasar-vmm checks before passing it
//! on and the guest agent checks again before handing it to the runtime.

use serde_json::{Map, Value};

/// The largest resources JSON an update may carry, in bytes: a bound on
/// what either side parses, far above a real `LinuxResources` (usually a
/// few hundred bytes).
pub const MAX_JSON: usize = 64 << 10;

/// What is wrong with an update's resources.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    /// More than [`MAX_JSON`] bytes.
    #[error("are {len} bytes, more than {max}")]
    TooLarge {
        /// The JSON's length in bytes.
        len: usize,
        /// [`MAX_JSON`].
        max: usize,
    },
    /// Not JSON at all (an empty update included).
    #[error("are not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not an object.
    #[error("are not a JSON object")]
    NotObject,
}

/// Checks an update's resources: at most [`MAX_JSON`] bytes of a JSON
/// object. Returns the object.
pub fn check(json: &[u8]) -> Result<Map<String, Value>, ResourcesError> {
    if json.len() > MAX_JSON {
        return Err(ResourcesError::TooLarge {
            len: json.len(),
            max: MAX_JSON,
        });
    }
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ResourcesError::NotObject),
        Err(e) => Err(ResourcesError::NotJson(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_object_passes() {
        let map = check(br#"{"memory":{"limit":33554432}}"#).expect("an object");
        assert_eq!(map["memory"]["limit"], 33554432);
        assert!(check(b"{}").expect("an object").is_empty());
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(matches!(check(b""), Err(ResourcesError::NotJson(_))));
        assert!(matches!(check(b"{"), Err(ResourcesError::NotJson(_))));
        assert!(matches!(check(b"[1]"), Err(ResourcesError::NotObject)));
        assert!(matches!(check(b"null"), Err(ResourcesError::NotObject)));
    }

    #[test]
    fn the_size_is_bounded() {
        // The largest object that fits passes; one byte more does not.
        let fitting = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_JSON - 8));
        assert_eq!(fitting.len(), MAX_JSON);
        assert!(check(fitting.as_bytes()).is_ok());
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_JSON - 7));
        match check(big.as_bytes()) {
            Err(e @ ResourcesError::TooLarge { .. }) => assert_eq!(
                e.to_string(),
                format!("are {} bytes, more than {MAX_JSON}", MAX_JSON + 1)
            ),
            other => panic!("{other:?}"),
        }
    }
}
