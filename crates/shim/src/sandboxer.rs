//! The connection to kuasar-vmm (the sandboxer).
//!
//! [`Conn`] is one ttrpc client connection: requests are written under a
//! lock, and ONE reader thread, blocked in `read`, hands each response to
//! its caller by stream id. (The `ttrpc::Client` of ttrpc 0.8 needs two
//! threads and wakes up every 10 ms to poll even when idle, which a shim
//! that idles for the whole life of a pod should not do; this is the same
//! wire protocol, built on ttrpc's own message types and the frame header
//! of `kuasar_api::frame`.)
//!
//! [`Vmm`] keeps one long-lived `Conn`, reconnects transparently when the
//! sandboxer restarts, and retries a call once (or, for `Wait`, until it is
//! answered) when the failure was the connection rather than a status.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kuasar_api::frame::{Header, HEADER_LEN, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE};
use kuasar_api::protobuf::Message;
use kuasar_api::ttrpc::proto::KeyValue;
use kuasar_api::ttrpc::{get_status, Code, Request, Response, Status};

use crate::log;

pub use kuasar_api::vmm_socket;

/// How long [`Vmm`] keeps trying to reconnect before failing a call.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A write that blocks this long means the sandboxer is stuck: the
/// connection is dropped (a partial frame would corrupt the stream anyway).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const READER_STACK: usize = 64 * 1024;

/// Why a call got no response message.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The connection is down (or went down during the call): the request
    /// may or may not have reached the sandboxer.
    Broken(String),
    /// The sandboxer (or the protocol) answered with a status.
    Status(Status),
    /// No answer within the request's timeout.
    Timeout,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Broken(r) => write!(f, "connection lost: {r}"),
            CallError::Status(s) => write!(f, "{:?}: {}", s.code(), s.message),
            CallError::Timeout => f.write_str("timed out"),
        }
    }
}

type Reply = Result<Vec<u8>, CallError>;

struct State {
    /// Set by the reader when the connection ended; no new call may start.
    dead: Option<String>,
    pending: HashMap<u32, SyncSender<Reply>>,
}

/// Never panic on a poisoned lock: the data (a map, a stream) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn status(code: Code, msg: impl Into<String>) -> Status {
    get_status(code, msg.into())
}

/// One ttrpc client connection (see the module docs).
pub struct Conn {
    writer: Mutex<UnixStream>,
    state: Arc<Mutex<State>>,
    next_stream: AtomicU32,
}

impl Conn {
    pub fn connect(path: &Path) -> io::Result<Conn> {
        let stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let state = Arc::new(Mutex::new(State {
            dead: None,
            pending: HashMap::new(),
        }));
        let st = state.clone();
        std::thread::Builder::new()
            .name("vmm-reader".into())
            .stack_size(READER_STACK)
            .spawn(move || read_loop(reader, st))?;
        Ok(Conn {
            writer: Mutex::new(stream),
            state,
            next_stream: AtomicU32::new(1),
        })
    }

    pub fn is_broken(&self) -> bool {
        lock(&self.state).dead.is_some()
    }

    fn forget(&self, id: u32) {
        lock(&self.state).pending.remove(&id);
    }

    /// One request; `timeout_nano` 0 waits forever (and is sent as is).
    pub fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        metadata: Vec<KeyValue>,
        timeout_nano: i64,
    ) -> Reply {
        let mut req = Request::new();
        req.service = service.to_string();
        req.method = method.to_string();
        req.payload = payload;
        req.metadata = metadata;
        req.timeout_nano = timeout_nano;
        let body = req.write_to_bytes().map_err(|e| {
            CallError::Status(status(Code::INTERNAL, format!("encode request: {e}")))
        })?;
        if body.len() > MAX_PAYLOAD {
            return Err(CallError::Status(status(
                Code::RESOURCE_EXHAUSTED,
                format!(
                    "{method} request of {} bytes exceeds the ttrpc limit of {MAX_PAYLOAD}",
                    body.len()
                ),
            )));
        }
        // Client stream ids are odd; wrapping keeps them odd.
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        {
            let mut st = lock(&self.state);
            if let Some(reason) = &st.dead {
                return Err(CallError::Broken(reason.clone()));
            }
            st.pending.insert(id, tx);
        }
        let header = Header {
            len: body.len() as u32,
            stream_id: id,
            kind: TYPE_REQUEST,
            flags: 0,
        };
        let mut frame = Vec::with_capacity(header.frame_len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&body);
        {
            let mut w = lock(&self.writer);
            if let Err(e) = w.write_all(&frame) {
                // The reader sees the shutdown, marks the connection dead
                // and fails every other pending call.
                let _ = w.shutdown(Shutdown::Both);
                drop(w);
                self.forget(id);
                return Err(CallError::Broken(format!("write: {e}")));
            }
        }
        let reply = if timeout_nano > 0 {
            match rx.recv_timeout(Duration::from_nanos(timeout_nano as u64)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    self.forget(id);
                    return Err(CallError::Timeout);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Err(CallError::Broken("connection dropped".into()))
                }
            }
        } else {
            rx.recv()
                .unwrap_or_else(|_| Err(CallError::Broken("connection dropped".into())))
        };
        let body = reply?;
        let mut resp = Response::parse_from_bytes(&body).map_err(|e| {
            CallError::Status(status(
                Code::INTERNAL,
                format!("invalid ttrpc response from kuasar-vmm: {e}"),
            ))
        })?;
        let st = resp.status();
        if st.code() != Code::OK {
            return Err(CallError::Status(st.clone()));
        }
        Ok(std::mem::take(&mut resp.payload))
    }

    /// A typed unary call (used by `start` and `delete`).
    pub fn unary<Req: Message, Resp: Message>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let payload = req.write_to_bytes().map_err(|e| {
            CallError::Status(status(Code::INTERNAL, format!("encode {method}: {e}")))
        })?;
        let timeout_nano = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
        let out = self.call(service, method, payload, Vec::new(), timeout_nano)?;
        Resp::parse_from_bytes(&out).map_err(|e| {
            CallError::Status(status(
                Code::INTERNAL,
                format!("invalid {method} response: {e}"),
            ))
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Wakes the reader thread (EOF), which then exits and closes its fd.
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
    }
}

fn deliver(state: &Mutex<State>, id: u32, reply: Reply) {
    if let Some(tx) = lock(state).pending.remove(&id) {
        // Capacity 1 and one send per id: never blocks. The caller may
        // have timed out and gone: ignore.
        let _ = tx.try_send(reply);
    }
}

fn read_loop(mut s: UnixStream, state: Arc<Mutex<State>>) {
    let reason = loop {
        let mut hdr = [0u8; HEADER_LEN];
        if let Err(e) = s.read_exact(&mut hdr) {
            break match e.kind() {
                io::ErrorKind::UnexpectedEof => "closed by kuasar-vmm".to_string(),
                _ => format!("read: {e}"),
            };
        }
        let mh = Header::from(hdr);
        let len = mh.payload_len();
        if len > MAX_PAYLOAD {
            let skipped = io::copy(&mut (&mut s).take(len as u64), &mut io::sink());
            if !matches!(skipped, Ok(n) if n == len as u64) {
                break "read: truncated oversized message".to_string();
            }
            deliver(
                &state,
                mh.stream_id,
                Err(CallError::Status(status(
                    Code::RESOURCE_EXHAUSTED,
                    format!("response of {len} bytes exceeds the ttrpc limit of {MAX_PAYLOAD}"),
                ))),
            );
            continue;
        }
        let mut body = vec![0u8; len];
        if let Err(e) = s.read_exact(&mut body) {
            break format!("read: {e}");
        }
        if mh.kind == TYPE_RESPONSE {
            deliver(&state, mh.stream_id, Ok(body));
        }
    };
    let mut st = lock(&state);
    st.dead = Some(reason.clone());
    for (_, tx) in st.pending.drain() {
        let _ = tx.try_send(Err(CallError::Broken(reason.clone())));
    }
}

/// Retry policy of a relayed call when the connection breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reconnect and retry once.
    Once,
    /// Retry until an answer arrives (or the request's own timeout).
    UntilAnswered,
}

/// The shim's one long-lived, self-healing connection to kuasar-vmm.
pub struct Vmm {
    path: PathBuf,
    conn: Mutex<Option<Arc<Conn>>>,
    window: Duration,
}

impl Vmm {
    pub fn new(path: PathBuf) -> Self {
        Vmm {
            path,
            conn: Mutex::new(None),
            window: RECONNECT_WINDOW,
        }
    }

    #[cfg(test)]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The live connection, (re)connecting with backoff until `give_up`.
    /// The lock is held only for one connect attempt at a time.
    fn live_conn(&self, give_up: Instant) -> Result<Arc<Conn>, String> {
        let mut backoff = BACKOFF_START;
        loop {
            let err = {
                let mut cur = lock(&self.conn);
                if let Some(c) = cur.as_ref().filter(|c| !c.is_broken()) {
                    return Ok(c.clone());
                }
                let was_connected = cur.take().is_some();
                match Conn::connect(&self.path) {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *cur = Some(c.clone());
                        if was_connected {
                            log!(
                                "info",
                                "reconnected to kuasar-vmm at {}",
                                self.path.display()
                            );
                        }
                        return Ok(c);
                    }
                    Err(e) => e,
                }
            };
            let now = Instant::now();
            if now >= give_up {
                return Err(err.to_string());
            }
            std::thread::sleep(backoff.min(give_up - now));
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn drop_conn(&self, c: &Arc<Conn>) {
        let mut cur = lock(&self.conn);
        if cur.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
            *cur = None;
        }
    }

    fn unreachable(&self, reason: &str) -> Status {
        status(
            Code::UNAVAILABLE,
            format!(
                "kuasar-vmm is not reachable at {}: {reason}",
                self.path.display()
            ),
        )
    }

    /// Relays one request; answers are returned unchanged (payload bytes,
    /// or the sandboxer's status with its code and message). Each attempt
    /// takes a live connection, sends the request with what is left of its
    /// timeout, and when the connection breaks retries as `retry` says.
    pub fn call(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        metadata: &[KeyValue],
        timeout_nano: i64,
        retry: Retry,
    ) -> Result<Vec<u8>, Status> {
        let deadline = deadline_of(timeout_nano);
        let mut broken = 0u32;
        loop {
            let Some(conn) = self.conn_for_call(method, deadline, retry)? else {
                continue;
            };
            let remaining = remaining_nanos(deadline).ok_or_else(|| timed_out(method))?;
            match conn.call(
                service,
                method,
                payload.to_vec(),
                metadata.to_vec(),
                remaining,
            ) {
                Ok(p) => return Ok(p),
                Err(CallError::Status(s)) => return Err(s),
                Err(CallError::Timeout) => return Err(timed_out(method)),
                Err(CallError::Broken(reason)) => {
                    broken += 1;
                    self.after_broken(&conn, method, &reason, broken, retry)?;
                }
            }
        }
    }

    /// Phase 1 of an attempt: a live connection, (re)connecting until the
    /// request's deadline or the reconnect window, whichever comes first.
    /// `Ok(None)`: still none, and a `Retry::UntilAnswered` call keeps
    /// waiting (logged). Otherwise fails with DEADLINE_EXCEEDED if the
    /// deadline passed, else UNAVAILABLE naming the socket.
    fn conn_for_call(
        &self,
        method: &str,
        deadline: Option<Instant>,
        retry: Retry,
    ) -> Result<Option<Arc<Conn>>, Status> {
        let now = Instant::now();
        let give_up = deadline.map_or(now + self.window, |d| d.min(now + self.window));
        match self.live_conn(give_up) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                let expired = deadline.is_some_and(|d| Instant::now() >= d);
                if retry == Retry::UntilAnswered && !expired {
                    log!("warn", "{method}: still waiting for kuasar-vmm: {e}");
                    return Ok(None);
                }
                Err(if expired {
                    timed_out(method)
                } else {
                    self.unreachable(&e)
                })
            }
        }
    }

    /// Phase 2 of an attempt, when the connection broke under the call for
    /// the `broken`-th time: forgets that connection and logs. Then `Ok` to
    /// retry (a `Retry::UntilAnswered` call that keeps breaking first backs
    /// off), or UNAVAILABLE for a `Retry::Once` call that broke twice.
    fn after_broken(
        &self,
        conn: &Arc<Conn>,
        method: &str,
        reason: &str,
        broken: u32,
        retry: Retry,
    ) -> Result<(), Status> {
        self.drop_conn(conn);
        log!(
            "warn",
            "{method}: connection to kuasar-vmm lost ({reason}), retrying"
        );
        match retry {
            Retry::Once if broken >= 2 => Err(status(
                Code::UNAVAILABLE,
                format!(
                    "connection to kuasar-vmm at {} lost: {reason}",
                    self.path.display()
                ),
            )),
            Retry::Once => Ok(()),
            Retry::UntilAnswered => {
                if broken > 1 {
                    // Connects but drops us: do not spin.
                    std::thread::sleep(BACKOFF_START.saturating_mul(broken).min(BACKOFF_MAX));
                }
                Ok(())
            }
        }
    }
}

/// The instant a request's timeout (ttrpc's `timeout_nano`) runs out;
/// `None` for no timeout (zero or negative).
fn deadline_of(timeout_nano: i64) -> Option<Instant> {
    u64::try_from(timeout_nano)
        .ok()
        .filter(|n| *n > 0)
        .map(|n| Instant::now() + Duration::from_nanos(n))
}

/// What is left until `deadline`, as ttrpc's `timeout_nano` for one
/// attempt (0 for no deadline); `None` once the deadline has passed.
fn remaining_nanos(deadline: Option<Instant>) -> Option<i64> {
    match deadline {
        None => Some(0),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            Some(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX))
        }
    }
}

/// The status of a relayed call whose request timeout ran out.
fn timed_out(method: &str) -> Status {
    status(
        Code::DEADLINE_EXCEEDED,
        format!("{method}: no answer from kuasar-vmm within the request timeout"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_only_for_a_positive_timeout() {
        assert!(deadline_of(0).is_none());
        assert!(deadline_of(-1).is_none());
        let before = Instant::now();
        let d = deadline_of(2_000_000_000).expect("a deadline");
        assert!(d >= before + Duration::from_secs(2));
        assert!(d <= Instant::now() + Duration::from_secs(2));
    }

    #[test]
    fn remaining_time_of_an_attempt() {
        assert_eq!(remaining_nanos(None), Some(0));
        assert_eq!(remaining_nanos(Some(Instant::now())), None);
        let left =
            remaining_nanos(Some(Instant::now() + Duration::from_secs(10))).expect("time left");
        assert!(left > 0 && left <= 10_000_000_000, "{left}");
        // More than i64::MAX nanoseconds (292 years) left: clamped.
        let centuries = Duration::from_secs(400 * 365 * 24 * 3600);
        if let Some(far) = Instant::now().checked_add(centuries) {
            assert_eq!(remaining_nanos(Some(far)), Some(i64::MAX));
        }
    }
}
