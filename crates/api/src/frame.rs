//! The ttrpc frame on the wire: a 10-byte header, then the payload.
//!
//! The header is the payload length (u32, big-endian), the stream id (u32,
//! big-endian), the message type (u8) and the flags (u8). The constants are
//! ttrpc's own, so they cannot drift from the library that serves and calls.
//! What to do with a frame that breaks a rule (too large, of the wrong type,
//! on the wrong stream) is up to each side; this module only names the rules.

use ttrpc::proto;

/// The length of a frame header in bytes.
pub const HEADER_LEN: usize = proto::MESSAGE_HEADER_LENGTH;
/// The largest payload ttrpc accepts, in bytes (a header announcing exactly
/// this much is still valid).
pub const MAX_PAYLOAD: usize = proto::MESSAGE_LENGTH_MAX;

/// The message type of a request (client to server).
pub const TYPE_REQUEST: u8 = proto::MESSAGE_TYPE_REQUEST;
/// The message type of a response (server to client).
pub const TYPE_RESPONSE: u8 = proto::MESSAGE_TYPE_RESPONSE;
/// The message type of a data frame of a streaming call (either way).
pub const TYPE_DATA: u8 = proto::MESSAGE_TYPE_DATA;

/// Flag: the sender closed its side of the stream.
pub const FLAG_REMOTE_CLOSED: u8 = proto::FLAG_REMOTE_CLOSED;
/// Flag: the sender keeps its side of the stream open.
pub const FLAG_REMOTE_OPEN: u8 = proto::FLAG_REMOTE_OPEN;
/// Flag: the frame carries no data.
pub const FLAG_NO_DATA: u8 = proto::FLAG_NO_DATA;
/// Every flag ttrpc defines; any other bit set is not ttrpc.
pub const KNOWN_FLAGS: u8 = FLAG_REMOTE_CLOSED | FLAG_REMOTE_OPEN | FLAG_NO_DATA;

/// Why a frame header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a payload larger than the limit.
    #[error("a frame of {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The payload length the header announces, in bytes.
        len: usize,
        /// The limit it is over, in bytes.
        max: usize,
    },
}

/// A frame header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The length of the payload that follows the header, in bytes.
    pub len: u32,
    /// The stream the frame belongs to (clients open odd ids).
    pub stream_id: u32,
    /// The message type (`TYPE_REQUEST`, `TYPE_RESPONSE`, `TYPE_DATA`).
    pub kind: u8,
    /// The flags (see `KNOWN_FLAGS`).
    pub flags: u8,
}

impl Header {
    /// The header in its wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.len.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8] = self.kind;
        out[9] = self.flags;
        out
    }

    /// The header at the start of `buf`, or `None` while `buf` is shorter
    /// than a header. The bytes after the header are not looked at.
    pub fn decode(buf: &[u8]) -> Option<Header> {
        buf.first_chunk::<HEADER_LEN>().map(|h| Header::from(*h))
    }

    /// The payload length, in bytes.
    pub fn payload_len(&self) -> usize {
        self.len as usize
    }

    /// The length of the whole frame (header and payload), in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// The payload length, or `FrameError::TooLarge` when it is over `max`.
    pub fn checked_len(&self, max: usize) -> Result<usize, FrameError> {
        let len = self.payload_len();
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(len)
    }
}

impl From<[u8; HEADER_LEN]> for Header {
    /// Decodes a whole header (any ten bytes are one).
    fn from(h: [u8; HEADER_LEN]) -> Header {
        Header {
            len: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            stream_id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            kind: h[8],
            flags: h[9],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constants_are_ttrpcs() {
        assert_eq!(HEADER_LEN, 10);
        assert_eq!(MAX_PAYLOAD, 4 << 20);
        assert_eq!((TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA), (1, 2, 3));
        assert_eq!(KNOWN_FLAGS, 0x7);
    }

    #[test]
    fn a_header_round_trips_in_big_endian() {
        let h = Header {
            len: 0x0102_0304,
            stream_id: 0x0506_0708,
            kind: TYPE_DATA,
            flags: FLAG_REMOTE_CLOSED | FLAG_NO_DATA,
        };
        let wire = h.encode();
        assert_eq!(wire, [1, 2, 3, 4, 5, 6, 7, 8, 3, 5]);
        assert_eq!(Header::from(wire), h);
        assert_eq!(Header::decode(&wire), Some(h));
        assert_eq!(h.payload_len(), 0x0102_0304);
        assert_eq!(h.frame_len(), 0x0102_0304 + HEADER_LEN);
    }

    #[test]
    fn agrees_with_ttrpcs_own_header() {
        let h = Header {
            len: 77,
            stream_id: 9,
            kind: TYPE_REQUEST,
            flags: 0,
        };
        let theirs: Vec<u8> = ttrpc::MessageHeader::new_request(9, 77).into();
        assert_eq!(h.encode().as_slice(), theirs.as_slice());
    }

    #[test]
    fn a_short_buffer_has_no_header_yet() {
        let wire = Header {
            len: 5,
            stream_id: 1,
            kind: TYPE_REQUEST,
            flags: 0,
        }
        .encode();
        for n in 0..HEADER_LEN {
            assert_eq!(Header::decode(&wire[..n]), None, "{n} bytes");
        }
        // Bytes after the header (the payload) are not looked at.
        let mut frame = wire.to_vec();
        frame.extend_from_slice(b"hello and more");
        assert_eq!(Header::decode(&frame).map(|h| h.len), Some(5));
    }

    #[test]
    fn an_oversize_payload_is_refused_with_its_size() {
        let at = |len| Header {
            len,
            stream_id: 1,
            kind: TYPE_RESPONSE,
            flags: 0,
        };
        let max = MAX_PAYLOAD as u32;
        assert_eq!(at(max).checked_len(MAX_PAYLOAD), Ok(MAX_PAYLOAD));
        assert_eq!(at(0).checked_len(0), Ok(0));
        let err = at(max + 1).checked_len(MAX_PAYLOAD).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            }
        );
        assert_eq!(
            err.to_string(),
            "a frame of 4194305 bytes, more than the limit of 4194304"
        );
        assert!(at(u32::MAX).checked_len(MAX_PAYLOAD).is_err());
    }
}
