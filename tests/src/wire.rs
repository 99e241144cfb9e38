//! Just enough protobuf and ttrpc to poke the sandboxer's socket and to
//! check a shim's `delete` output, independently of the code under test
//! (and of the `async` feature of the protocol crate).
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One protobuf field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

/// An encoder for protobuf messages.
#[derive(Debug, Default, Clone)]
pub struct Msg(pub Vec<u8>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl Msg {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn varint(mut self, field: u32, v: u64) -> Self {
        put_varint(&mut self.0, u64::from(field) << 3);
        put_varint(&mut self.0, v);
        self
    }

    pub fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        put_varint(&mut self.0, (u64::from(field) << 3) | 2);
        put_varint(&mut self.0, v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn string(self, field: u32, v: &str) -> Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn message(self, field: u32, m: &Msg) -> Self {
        self.bytes(field, &m.0)
    }
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// Decodes a message into (field number, value) pairs, strictly: any
/// malformed byte is an error.
pub fn decode(buf: &[u8]) -> Result<Vec<(u32, Value)>, String> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos)?;
        let field = u32::try_from(key >> 3).map_err(|_| "field number too large")?;
        if field == 0 {
            return Err("field number 0".into());
        }
        let take = |pos: &mut usize, n: usize| -> Result<Vec<u8>, String> {
            let end = pos.checked_add(n).filter(|e| *e <= buf.len());
            let end = end.ok_or_else(|| format!("field {field} overruns the message"))?;
            let v = buf[*pos..end].to_vec();
            *pos = end;
            Ok(v)
        };
        let value = match key & 7 {
            0 => Value::Varint(get_varint(buf, &mut pos)?),
            1 => {
                let b = take(&mut pos, 8)?;
                Value::Fixed64(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            2 => {
                let n = get_varint(buf, &mut pos)?;
                let n = usize::try_from(n).map_err(|_| "length too large")?;
                Value::Bytes(take(&mut pos, n)?)
            }
            5 => {
                let b = take(&mut pos, 4)?;
                Value::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            wt => return Err(format!("unsupported wire type {wt} (field {field})")),
        };
        fields.push((field, value));
    }
    Ok(fields)
}

/// The first value of `field`.
pub fn field(fields: &[(u32, Value)], field: u32) -> Option<&Value> {
    fields.iter().find(|(f, _)| *f == field).map(|(_, v)| v)
}

/// A gRPC/ttrpc status code (google.rpc.Code).
pub mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
}

/// The answer of a ttrpc call.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: i32,
    pub message: String,
    pub payload: Vec<u8>,
}

const MESSAGE_TYPE_REQUEST: u8 = 1;
const MESSAGE_TYPE_RESPONSE: u8 = 2;

/// One unary ttrpc call on a fresh connection.
pub fn ttrpc_call(
    socket: &Path,
    service: &str,
    method: &str,
    payload: &Msg,
    metadata: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reply, String> {
    let mut conn =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut req = Msg::new()
        .string(1, service)
        .string(2, method)
        .message(3, payload)
        .varint(4, timeout.as_nanos() as u64);
    for (k, v) in metadata {
        req = req.message(5, &Msg::new().string(1, k).string(2, v));
    }
    let stream_id: u32 = 1;
    let mut frame = Vec::with_capacity(10 + req.0.len());
    frame.extend_from_slice(&(req.0.len() as u32).to_be_bytes());
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.push(MESSAGE_TYPE_REQUEST);
    frame.push(0);
    frame.extend_from_slice(&req.0);
    conn.write_all(&frame).map_err(|e| format!("send: {e}"))?;

    let mut header = [0u8; 10];
    conn.read_exact(&mut header)
        .map_err(|e| format!("read reply header: {e}"))?;
    let len = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    if len > 4 << 20 {
        return Err(format!("reply of {len} bytes is too large"));
    }
    if header[8] != MESSAGE_TYPE_RESPONSE {
        return Err(format!("unexpected message type {}", header[8]));
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)
        .map_err(|e| format!("read reply: {e}"))?;
    let fields = decode(&body)?;
    let (mut code, mut message) = (code::OK, String::new());
    if let Some(Value::Bytes(status)) = field(&fields, 1) {
        let status = decode(status)?;
        if let Some(Value::Varint(c)) = field(&status, 1) {
            code = *c as i32;
        }
        if let Some(Value::Bytes(m)) = field(&status, 2) {
            message = String::from_utf8_lossy(m).into_owned();
        }
    }
    let payload = match field(&fields, 2) {
        Some(Value::Bytes(p)) => p.clone(),
        _ => Vec::new(),
    };
    Ok(Reply {
        code,
        message,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let inner = Msg::new().varint(1, 300);
        let m = Msg::new()
            .string(1, "abc")
            .varint(2, 137)
            .message(3, &inner);
        let f = decode(&m.0).unwrap();
        assert_eq!(field(&f, 1), Some(&Value::Bytes(b"abc".to_vec())));
        assert_eq!(field(&f, 2), Some(&Value::Varint(137)));
        let Some(Value::Bytes(b)) = field(&f, 3) else {
            panic!("no field 3")
        };
        assert_eq!(decode(b).unwrap(), vec![(1, Value::Varint(300))]);
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(b"\x0a\x05ab").is_err());
        assert!(decode(b"\xff").is_err());
        assert!(decode(b"\x0f").is_err());
        assert!(decode(b"").unwrap().is_empty());
    }
}
