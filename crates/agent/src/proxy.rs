//! The virtio-serial <-> ttrpc server proxy.
//!
//! ttrpc's server wants a listening socket, so it listens on a Unix socket in
//! the guest and one thread moves ttrpc frames between the port and a
//! connection to that socket (a "session"). The port is non-blocking: while
//! no host is connected reads return EOF, writes `EAGAIN`, poll `POLLHUP`.
//!
//! A virtio-serial port has no reliable connection boundary: a host that
//! disconnects and reconnects at once may never be seen hung up. So the proxy
//! also reads the frames: a new ttrpc client starts its stream ids at 1 again,
//! so a request on stream 1 after others starts a new session (not any lower
//! id: one client's concurrent requests can arrive out of order). Ending a session closes its server connection (the server
//! then cancels the requests still pending on it, so they cannot consume a
//! process's output) and drops its unsent replies. Replies are written whole
//! (the driver takes up to 32 KiB per write), so a reply never straddles two
//! host connections unless it is larger than that.
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kuasar_api::frame::{FrameError, Header, HEADER_LEN, MAX_PAYLOAD, TYPE_REQUEST};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

/// The most a virtio-serial port write takes at once.
const PORT_WRITE_MAX: usize = 32 << 10;
/// Stop reading a side while this much is waiting to be written.
const HIGH_WATER: usize = MAX_PAYLOAD + HEADER_LEN;
/// How often a disconnected port is polled for a new host connection.
const RECONNECT_POLL: Duration = Duration::from_millis(10);
const READ_CHUNK: usize = 64 << 10;

/// The header at the start of `buf`; `Ok(None)` if incomplete, `Err` if the
/// length is beyond ttrpc's limit (the byte stream is not ttrpc).
fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(h) = Header::decode(buf) else {
        return Ok(None);
    };
    h.checked_len(MAX_PAYLOAD)?;
    Ok(Some(h))
}

/// A misbehaviour the proxy shows when the kernel command line asks for it
/// with `kuasar.fault=MODE` or `kuasar.fault=MODE@METHOD` (from the first
/// request for METHOD on): the host's tests of a hostile or hung guest
/// (tests/tests/hostile.rs) use it on a real guest. Only the host sets a
/// guest's command line (`[qemu] kernel_params`), and nothing else turns it
/// on; it costs a guest nothing it could not do anyway (the guest is
/// untrusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub mode: FaultMode,
    /// The request method from which on the fault shows; `None`: at once.
    pub from_method: Option<String>,
    armed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Requests are swallowed: nothing is ever answered.
    Silent,
    /// Each request is answered with bytes that are not ttrpc.
    Garbage,
}

/// What the proxy does with a frame from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    Drop,
    Garbage,
}

impl Fault {
    /// The last `kuasar.fault=` of the command line; unknown modes are ignored.
    pub fn from_cmdline(cmdline: &str) -> Option<Fault> {
        let value = cmdline
            .split_whitespace()
            .filter_map(|p| p.strip_prefix("kuasar.fault="))
            .next_back()?;
        let (mode, from_method) = match value.split_once('@') {
            Some((m, method)) if !method.is_empty() => (m, Some(method.to_owned())),
            Some(_) => return None,
            None => (value, None),
        };
        let mode = match mode {
            "silent" => FaultMode::Silent,
            "garbage" => FaultMode::Garbage,
            _ => return None,
        };
        Some(Fault {
            mode,
            armed: from_method.is_none(),
            from_method,
        })
    }

    /// Decides the fate of one whole frame from the host.
    pub fn action(&mut self, h: &Header, frame: &[u8]) -> Action {
        if !self.armed && h.kind == TYPE_REQUEST {
            let method = request_method(frame.get(HEADER_LEN..).unwrap_or_default());
            if method.is_some() && method == self.from_method.as_deref() {
                warn!(fault = ?self.mode, method, "fault injection (kuasar.fault) from now on");
                self.armed = true;
            }
        }
        if !self.armed {
            return Action::Forward;
        }
        match self.mode {
            FaultMode::Silent => Action::Drop,
            FaultMode::Garbage if h.kind == TYPE_REQUEST => Action::Garbage,
            FaultMode::Garbage => Action::Drop,
        }
    }
}

/// Bytes that are not ttrpc (a fixed pseudo-random sequence).
pub fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The method of a ttrpc `Request` (field 2), if the payload has one.
pub fn request_method(payload: &[u8]) -> Option<&str> {
    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *buf.get(*pos)?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut pos = 0;
    while pos < payload.len() {
        let key = varint(payload, &mut pos)?;
        match key & 7 {
            0 => {
                varint(payload, &mut pos)?;
            }
            2 => {
                let len = usize::try_from(varint(payload, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|e| *e <= payload.len())?;
                if key >> 3 == 2 {
                    return std::str::from_utf8(&payload[pos..end]).ok();
                }
                pos = end;
            }
            _ => return None,
        }
    }
    None
}

/// Splits whole frames off the front of a byte buffer.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The next whole frame with its header; `Err` when the stream is broken.
    pub fn next_frame(&mut self) -> Result<Option<(Header, Vec<u8>)>, FrameError> {
        let Some(h) = parse_header(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < h.frame_len() {
            return Ok(None);
        }
        let rest = self.buf.split_off(h.frame_len());
        Ok(Some((h, std::mem::replace(&mut self.buf, rest))))
    }
}

/// Which session a request from the host belongs to.
#[derive(Default)]
pub struct SessionTracker {
    max_stream: Option<u32>,
}

impl SessionTracker {
    /// True when `h` starts a new session: a new client starts its stream
    /// ids at 1 again. Only stream 1 counts: one client's requests may
    /// arrive out of stream-id order (ttrpc's client takes an id, then
    /// queues the frame, and concurrent calls race between the two), and
    /// taking such a request for a new session would cancel every request
    /// in flight. A client's first request (the host's Ping) goes alone.
    pub fn is_new_session(&mut self, h: &Header) -> bool {
        if h.kind != TYPE_REQUEST {
            return false;
        }
        let new = h.stream_id == 1 && self.max_stream.is_some();
        self.max_stream = Some(if new {
            h.stream_id
        } else {
            self.max_stream.map_or(h.stream_id, |m| m.max(h.stream_id))
        });
        new
    }

    pub fn reset(&mut self) {
        self.max_stream = None;
    }
}

/// Frames waiting to be written, the front one possibly partly written.
#[derive(Default)]
struct Outbox {
    frames: std::collections::VecDeque<Vec<u8>>,
    offset: usize,
    bytes: usize,
}

impl Outbox {
    fn push(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn clear(&mut self) {
        *self = Outbox::default();
    }

    /// Writes what `dst` takes, at most `max` bytes per write and never more
    /// than the rest of the front frame.
    fn flush(&mut self, mut dst: impl Write, max: usize) -> std::io::Result<()> {
        while let Some(front) = self.frames.front() {
            let end = front.len().min(self.offset + max);
            match dst.write(&front[self.offset..end]) {
                Ok(n) => {
                    self.offset += n;
                    self.bytes -= n;
                    if self.offset == front.len() {
                        self.frames.pop_front();
                        self.offset = 0;
                    }
                }
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Reads what is available into `framer`; `Ok(false)` at EOF.
fn fill(mut src: impl Read, framer: &mut Framer, scratch: &mut [u8]) -> std::io::Result<bool> {
    match src.read(scratch) {
        Ok(0) => Ok(false),
        Ok(n) => {
            framer.extend(&scratch[..n]);
            Ok(true)
        }
        Err(e) if is_transient(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Serves host connections on `port` forever.
pub fn run(port: &File, port_path: &Path, server: &Path, mut fault: Option<Fault>) {
    if let Some(f) = &fault {
        warn!(
            ?f,
            "fault injection requested on the kernel command line (kuasar.fault)"
        );
    }
    let mut first = true;
    loop {
        // Nobody connected: the port polls readable (EOF) and hung up.
        while poll_port(port).contains(PollFlags::POLLHUP) {
            std::thread::sleep(RECONNECT_POLL);
        }
        if first {
            info!(port = %port_path.display(), "host channel open");
            first = false;
        } else {
            info!("host reconnected");
        }
        serve_host(port, server, &mut fault);
        info!("host disconnected");
    }
}

fn poll_port(port: &File) -> PollFlags {
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
        Err(e) => {
            if e != Errno::EINTR {
                warn!("poll port: {e}");
            }
            std::thread::sleep(RECONNECT_POLL);
            PollFlags::POLLHUP
        }
    }
}

fn connect(server: &Path) -> UnixStream {
    loop {
        match UnixStream::connect(server).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(s) => return s,
            Err(e) => warn!("connect {}: {e}", server.display()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Moves frames until the host hangs up.
fn serve_host(port: &File, server: &Path, fault: &mut Option<Fault>) {
    let mut sock = connect(server);
    let mut tracker = SessionTracker::default();
    let (mut from_host, mut from_server) = (Framer::default(), Framer::default());
    let (mut to_server, mut to_host) = (Outbox::default(), Outbox::default());
    let mut scratch = vec![0u8; READ_CHUNK];
    loop {
        let pev = interest(&from_host, &to_server, &to_host);
        let sev = interest(&from_server, &to_host, &to_server);
        let Some((pr, sr)) = poll_both(port, &sock, pev, sev) else {
            return;
        };
        if pr.contains(PollFlags::POLLHUP) {
            return;
        }
        if pr.contains(PollFlags::POLLIN) {
            if !read_host(port, &mut from_host, &mut scratch) {
                return;
            }
            let new_session = take_host_frames(
                &mut from_host,
                &mut tracker,
                fault,
                &mut to_server,
                &mut to_host,
                &mut from_server,
            );
            if new_session {
                // Closing the old connection cancels its pending requests.
                sock = connect(server);
                continue;
            }
        }
        if pr.contains(PollFlags::POLLOUT) {
            if let Err(e) = to_host.flush(port, PORT_WRITE_MAX) {
                warn!("write port: {e}");
                return;
            }
        }
        let server_gone = exchange_with_server(
            &sock,
            sr,
            &mut from_server,
            &mut to_host,
            &mut to_server,
            &mut scratch,
        );
        if server_gone {
            warn!("ttrpc server closed the proxied connection; reconnecting");
            from_server.clear();
            to_server.clear();
            sock = connect(server);
        }
    }
}

/// What to poll one side for: readable while what was read from it
/// (`read`, not yet whole frames, and `forward`, whole frames waiting to go
/// to the other side) is under `HIGH_WATER`; writable while `outbox` has
/// something for it.
fn interest(read: &Framer, forward: &Outbox, outbox: &Outbox) -> PollFlags {
    let mut events = PollFlags::empty();
    if read.len() + forward.bytes < HIGH_WATER {
        events |= PollFlags::POLLIN;
    }
    if !outbox.is_empty() {
        events |= PollFlags::POLLOUT;
    }
    events
}

/// Waits up to a second for the port (`pev`) or the server connection
/// (`sev`) to be ready, and returns what each is ready for (an interrupted
/// wait counts as a timeout); `None` when polling fails.
fn poll_both(
    port: &File,
    sock: &UnixStream,
    pev: PollFlags,
    sev: PollFlags,
) -> Option<(PollFlags, PollFlags)> {
    let mut fds = [
        PollFd::new(port.as_fd(), pev),
        PollFd::new(sock.as_fd(), sev),
    ];
    match poll(&mut fds, PollTimeout::from(1000u16)) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => {
            warn!("poll: {e}");
            return None;
        }
    }
    let pr = fds[0].revents().unwrap_or(PollFlags::empty());
    let sr = fds[1].revents().unwrap_or(PollFlags::empty());
    Some((pr, sr))
}

/// Reads what the host sent into `from_host`; false when the host is gone
/// (EOF, or a read error, logged).
fn read_host(port: &File, from_host: &mut Framer, scratch: &mut [u8]) -> bool {
    match fill(port, from_host, scratch) {
        Ok(true) => true,
        Ok(false) => false,
        Err(e) => {
            warn!("read port: {e}");
            false
        }
    }
}

/// Takes the whole frames out of `from_host` and queues each as the fault
/// injection (if any) decides: for the server, dropped, or answered with
/// garbage. A frame that starts a new session first drops everything still
/// queued either way; a malformed frame drops what the host sent and resets
/// the session tracking. True when the server connection must be replaced
/// (a new session began, or the host's stream was malformed).
fn take_host_frames(
    from_host: &mut Framer,
    tracker: &mut SessionTracker,
    fault: &mut Option<Fault>,
    to_server: &mut Outbox,
    to_host: &mut Outbox,
    from_server: &mut Framer,
) -> bool {
    let mut new_session = false;
    loop {
        match from_host.next_frame() {
            Ok(Some((h, frame))) => {
                if tracker.is_new_session(&h) {
                    debug!(stream = h.stream_id, "new host session");
                    new_session = true;
                    to_server.clear();
                    to_host.clear();
                    from_server.clear();
                }
                match fault
                    .as_mut()
                    .map_or(Action::Forward, |f| f.action(&h, &frame))
                {
                    Action::Forward => to_server.push(frame),
                    Action::Drop => {}
                    Action::Garbage => to_host.push(garbage(4096)),
                }
            }
            Ok(None) => return new_session,
            Err(_) => {
                warn!("host sent a malformed frame; resetting the session");
                from_host.clear();
                to_server.clear();
                tracker.reset();
                return true;
            }
        }
    }
}

/// The server side of one round, as `sr` says it is ready: reads the
/// server's replies and queues them for the host, then writes what is
/// queued for the server. True when the server connection is gone (EOF, or
/// a read or write error).
fn exchange_with_server(
    sock: &UnixStream,
    sr: PollFlags,
    from_server: &mut Framer,
    to_host: &mut Outbox,
    to_server: &mut Outbox,
    scratch: &mut [u8],
) -> bool {
    let mut server_gone = false;
    if sr.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
        match fill(sock, from_server, scratch) {
            Ok(true) => {}
            Ok(false) | Err(_) => server_gone = true,
        }
        while let Ok(Some((_, frame))) = from_server.next_frame() {
            to_host.push(frame);
        }
    }
    if sr.contains(PollFlags::POLLOUT) && to_server.flush(sock, usize::MAX).is_err() {
        server_gone = true;
    }
    server_gone
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            len: payload.len() as u32,
            stream_id: stream,
            kind,
            flags: 0,
        };
        let mut f = h.encode().to_vec();
        f.extend(payload);
        f
    }

    #[test]
    fn framer_splits_frames_across_reads() {
        let mut fr = Framer::default();
        let a = frame(1, TYPE_REQUEST, b"hello");
        let b = frame(3, TYPE_REQUEST, b"");
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        fr.extend(&all[..7]);
        assert_eq!(fr.next_frame(), Ok(None));
        fr.extend(&all[7..]);
        let (h, f) = fr.next_frame().unwrap().unwrap();
        assert_eq!((h.stream_id, h.frame_len(), f), (1, 15, a));
        let (h, f) = fr.next_frame().unwrap().unwrap();
        assert_eq!((h.stream_id, f), (3, b));
        assert_eq!(fr.next_frame(), Ok(None));
        let mut bad = Framer::default();
        bad.extend(&[0xff; 10]);
        let len = u32::MAX as usize;
        let max = MAX_PAYLOAD;
        assert_eq!(bad.next_frame(), Err(FrameError::TooLarge { len, max }));
    }

    #[test]
    fn a_reused_stream_id_starts_a_new_session() {
        let h = |stream_id, kind| Header {
            len: 0,
            stream_id,
            kind,
            flags: 0,
        };
        let mut t = SessionTracker::default();
        assert!(!t.is_new_session(&h(1, TYPE_REQUEST)));
        assert!(!t.is_new_session(&h(3, TYPE_REQUEST)));
        assert!(!t.is_new_session(&h(3, 3))); // data frames never do
        assert!(!t.is_new_session(&h(7, TYPE_REQUEST)));
        // One client's concurrent requests may arrive out of order.
        assert!(!t.is_new_session(&h(5, TYPE_REQUEST)));
        assert!(!t.is_new_session(&h(9, TYPE_REQUEST)));
        assert!(t.is_new_session(&h(1, TYPE_REQUEST)));
        assert!(!t.is_new_session(&h(3, TYPE_REQUEST)));
    }

    fn request(stream: u32, method: &str) -> Vec<u8> {
        let service = kuasar_api::services::AGENT;
        let mut p = vec![0x0a, service.len() as u8];
        p.extend(service.as_bytes());
        p.extend([0x12, method.len() as u8]);
        p.extend(method.as_bytes());
        p.extend([0x1a, 0]);
        frame(stream, TYPE_REQUEST, &p)
    }

    #[test]
    fn faults_from_the_command_line() {
        assert_eq!(Fault::from_cmdline("console=ttyS0 quiet"), None);
        let f = Fault::from_cmdline("quiet kuasar.fault=silent").unwrap();
        assert_eq!(
            (f.mode, f.from_method.as_deref()),
            (FaultMode::Silent, None)
        );
        let f = Fault::from_cmdline("kuasar.fault=garbage@ExecProcess x").unwrap();
        assert_eq!(
            (f.mode, f.from_method.as_deref()),
            (FaultMode::Garbage, Some("ExecProcess"))
        );
        assert_eq!(Fault::from_cmdline("kuasar.fault=explode"), None);
        assert_eq!(Fault::from_cmdline("kuasar.fault=silent@"), None);
    }

    #[test]
    fn a_fault_shows_from_its_method_on() {
        let h = |f: &[u8]| parse_header(f).unwrap().unwrap();
        let ping = request(1, "Ping");
        let exec = request(3, "ExecProcess");
        let wait = request(5, "WaitProcess");
        assert_eq!(request_method(&ping[HEADER_LEN..]), Some("Ping"));
        let mut f = Fault::from_cmdline("kuasar.fault=silent@ExecProcess").unwrap();
        assert_eq!(f.action(&h(&ping), &ping), Action::Forward);
        assert_eq!(f.action(&h(&exec), &exec), Action::Drop);
        assert_eq!(f.action(&h(&wait), &wait), Action::Drop);
        let mut f = Fault::from_cmdline("kuasar.fault=garbage").unwrap();
        assert_eq!(f.action(&h(&ping), &ping), Action::Garbage);
        let g = garbage(4096);
        assert_eq!(g.len(), 4096);
        assert!(
            parse_header(&g).is_err(),
            "the garbage must not frame as ttrpc"
        );
        assert_eq!(request_method(b"\xff\xff"), None);
        assert_eq!(request_method(b"\x12\x09Ping"), None);
    }

    #[test]
    fn outbox_writes_whole_frames_in_bounded_pieces() {
        let mut o = Outbox::default();
        o.push(vec![1; 5]);
        o.push(vec![2; 3]);
        let mut out: Vec<u8> = Vec::new();
        o.flush(&mut out, 4).unwrap();
        assert_eq!(out, [1, 1, 1, 1, 1, 2, 2, 2]);
        assert!(o.is_empty());
        assert_eq!(o.bytes, 0);
    }
}
