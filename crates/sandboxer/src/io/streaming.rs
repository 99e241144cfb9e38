//! Process stdio over containerd's streaming API, for CRI runtime handlers
//! with `io_type = "streaming"` (zero-shim mode).
//!
//! containerd 2.1's CRI (internal/cri/io) names each stdio stream of a process
//! `<sandbox address>?streaming_id=<id>` (the address Start returned, here
//! `ttrpc+unix://<task socket>`; ids `<container or exec id>-stdin|-stdout|-stderr`)
//! and itself dials that address, BEFORE the task or exec request that carries
//! those names, calling `containerd.services.streaming.v1.Streaming/Stream`:
//! a bidirectional stream of `google.protobuf.Any` whose first message is a
//! `StreamInit{id}`, acknowledged by any message. Bytes then travel as
//! `containerd.types.transfer.Data` within a window the reader grants with
//! `containerd.types.transfer.WindowUpdate`: for stdout/stderr containerd
//! grants and kuasar-vmm sends; for stdin kuasar-vmm grants and containerd
//! sends. The end of a stream is the end of its call.
//!
//! [`StreamingService`] accepts the streams on a sandbox's task socket and
//! parks them by (sandbox, id); the process's pumps claim them.
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kuasar_api::protobuf::well_known_types::any::Any;
use kuasar_api::protobuf::Message;
use kuasar_api::streaming::streaming_ttrpc_async::Streaming;
use kuasar_api::streaming::StreamInit;
use kuasar_api::transfer::{Data, WindowUpdate};
use tokio::sync::{oneshot, Notify, Semaphore};
use ttrpc::r#async::{SSSender, ServerStream, TtrpcContext};

use crate::agent::Agent;

const INIT_TYPE: &str = "containerd.services.streaming.v1.StreamInit";
const DATA_TYPE: &str = "containerd.types.transfer.Data";
const WINDOW_TYPE: &str = "containerd.types.transfer.WindowUpdate";
const ACK_TYPE: &str = "google.protobuf.Empty";
/// Largest Data message sent (containerd's reader uses the same).
const MAX_CHUNK: usize = 32 * 1024;
/// The window granted to containerd's stdin writer.
const WINDOW: i32 = 2 * MAX_CHUNK as i32;
/// Credit beyond which window updates from the reader are ignored.
const MAX_CREDIT: usize = 16 << 20;
/// How long a client may take to name its stream.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an opened stream waits for its process (containerd opens the
/// streams just before the create or exec request naming them).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// Streams opened and not yet claimed, at most.
const MAX_OPENED: usize = 1024;

/// Why a stdio stream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stdio address {0:?} names no streaming_id")]
    NoId(String),
    #[error("stream {0:?} was not opened by containerd within {CLAIM_TIMEOUT:?}")]
    NotOpened(String),
}

/// Whether a stdio path is a stream address rather than a fifo (the test
/// containerd itself applies).
pub fn is_stream(path: &str) -> bool {
    path.contains("://")
}

/// The stream id of a stdio address (`...?streaming_id=<id>`).
pub fn stream_id(address: &str) -> Result<String, StreamError> {
    address
        .split_once('?')
        .and_then(|(_, query)| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("streaming_id="))
        })
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| StreamError::NoId(address.to_owned()))
}

/// A stream containerd opened, waiting for its process.
struct Opened {
    stream: ServerStream<Any, Any>,
    /// Dropped when the stream is done with: its call then ends.
    done: oneshot::Sender<()>,
}

type Key = (String, String);

static OPENED: LazyLock<Mutex<HashMap<Key, Opened>>> = LazyLock::new(Default::default);
static ARRIVED: LazyLock<Notify> = LazyLock::new(Notify::new);

fn opened() -> std::sync::MutexGuard<'static, HashMap<Key, Opened>> {
    OPENED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the stream `id` of `sandbox`, waiting for containerd to open it.
async fn claim(sandbox: &str, id: &str) -> Result<Opened, StreamError> {
    let key = (sandbox.to_owned(), id.to_owned());
    let deadline = tokio::time::Instant::now() + CLAIM_TIMEOUT;
    loop {
        let arrived = ARRIVED.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if let Some(o) = opened().remove(&key) {
            return Ok(o);
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return Err(StreamError::NotOpened(id.to_owned()));
        }
    }
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

/// Whether `a` holds the message `name` (with or without a URL prefix).
fn is(a: &Any, name: &str) -> bool {
    a.type_url.rsplit('/').next() == Some(name)
}

fn invalid(msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, msg))
}

/// `containerd.services.streaming.v1.Streaming`, served on one sandbox's
/// task socket.
pub struct StreamingService {
    sandbox: String,
}

impl StreamingService {
    pub fn new(sandbox: &str) -> Self {
        StreamingService {
            sandbox: sandbox.to_owned(),
        }
    }
}

#[async_trait]
impl Streaming for StreamingService {
    async fn stream(
        &self,
        _ctx: &TtrpcContext,
        mut stream: ServerStream<Any, Any>,
    ) -> ttrpc::Result<()> {
        let first = async {
            // containerd's ttrpc client opens a stream with a request
            // carrying no message, which ttrpc-rust hands over as an empty
            // one: skip it.
            loop {
                match stream.recv().await {
                    Ok(Some(a)) if a.type_url.is_empty() && a.value.is_empty() => continue,
                    other => return other,
                }
            }
        };
        let init = match tokio::time::timeout(INIT_TIMEOUT, first).await {
            Ok(Ok(Some(a))) if is(&a, INIT_TYPE) => a,
            Ok(Ok(Some(a))) => return Err(invalid(format!("first message is {}", a.type_url))),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(invalid("no StreamInit")),
        };
        let id = StreamInit::parse_from_bytes(&init.value)
            .map_err(|e| invalid(format!("StreamInit: {e}")))?
            .id;
        if id.is_empty() {
            return Err(invalid("StreamInit without an id"));
        }
        let key = (self.sandbox.clone(), id.clone());
        {
            let map = opened();
            if map.contains_key(&key) {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("stream {id}"),
                )));
            }
            if map.len() >= MAX_OPENED {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::RESOURCE_EXHAUSTED,
                    "too many open streams",
                )));
            }
        }
        stream
            .send(&Any {
                type_url: ACK_TYPE.to_owned(),
                ..Default::default()
            })
            .await?;
        let (done, mut finished) = oneshot::channel();
        opened().insert(key.clone(), Opened { stream, done });
        ARRIVED.notify_waiters();
        tracing::debug!(sandbox = %self.sandbox, stream = %id, "stdio stream opened");
        tokio::select! {
            _ = &mut finished => {}
            _ = tokio::time::sleep(CLAIM_TIMEOUT) => {
                if opened().remove(&key).is_some() {
                    tracing::warn!(sandbox = %self.sandbox, stream = %id, "stdio stream never claimed: closed");
                    return Ok(());
                }
                let _ = finished.await;
            }
        }
        tracing::debug!(sandbox = %self.sandbox, stream = %id, "stdio stream closed");
        Ok(())
    }
}

/// Copies the guest's stdout or stderr of a process into the stream named
/// by `address`; the stream ends with the output.
pub async fn copy_output(
    agent: Agent,
    sandbox: String,
    cid: String,
    eid: String,
    address: String,
    stderr: bool,
) {
    let opened = match stream_id(&address) {
        Ok(id) => claim(&sandbox, &id).await,
        Err(e) => Err(e),
    };
    let (mut sink, _done, reader, credit) = match opened {
        Ok(o) => {
            let (tx, mut rx) = o.stream.split();
            let credit = Arc::new(Semaphore::new(0));
            let c = credit.clone();
            // The reader's window updates, until it ends the stream.
            let reader = tokio::spawn(async move {
                while let Ok(Some(a)) = rx.recv().await {
                    if !is(&a, WINDOW_TYPE) {
                        continue;
                    }
                    let Ok(w) = WindowUpdate::parse_from_bytes(&a.value) else {
                        continue;
                    };
                    let add = usize::try_from(w.update).unwrap_or(0);
                    if c.available_permits().saturating_add(add) <= MAX_CREDIT {
                        c.add_permits(add);
                    }
                }
                c.close();
            });
            (Some(tx), Some(o.done), Some(reader), credit)
        }
        Err(e) => {
            tracing::warn!(container = %cid, exec = %eid, "output stream: {e}");
            (None, None, None, Arc::new(Semaphore::new(0)))
        }
    };
    let mut output = crate::agent::OutputReader::new(agent, &cid, &eid, stderr);
    loop {
        match output.next().await {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                for chunk in data.chunks(MAX_CHUNK) {
                    let Some(tx) = sink.as_ref() else { break };
                    if let Err(e) = send_data(tx, &credit, chunk).await {
                        // Keep draining the guest so the process never blocks.
                        tracing::debug!(container = %cid, exec = %eid, "output stream: {e}");
                        sink = None;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(container = %cid, exec = %eid, "output stream ended: {e}");
                break;
            }
        }
    }
    if let Some(r) = reader {
        r.abort();
    }
}

async fn send_data(tx: &SSSender<Any>, credit: &Semaphore, chunk: &[u8]) -> ttrpc::Result<()> {
    // A chunk is at most MAX_CHUNK bytes: fits a u32.
    let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
    credit
        .acquire_many(n)
        .await
        .map_err(|_| ttrpc::Error::Others("the reader ended the stream".into()))?
        .forget();
    let data = Data {
        data: chunk.to_vec(),
        ..Default::default()
    };
    tx.send(&any(DATA_TYPE, &data)).await
}

/// Copies the stream named by `address` into the guest's stdin of a
/// process, and closes that stdin when containerd ends the stream.
pub async fn copy_stdin(agent: Agent, sandbox: String, cid: String, eid: String, address: String) {
    let opened = match stream_id(&address) {
        Ok(id) => claim(&sandbox, &id).await,
        Err(e) => Err(e),
    };
    let o = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(container = %cid, exec = %eid, "stdin stream: {e}");
            return;
        }
    };
    let _done = o.done;
    let (tx, mut rx) = o.stream.split();
    let grant = |w: i32| {
        let tx = tx.clone();
        async move {
            let u = WindowUpdate {
                update: w,
                ..Default::default()
            };
            tx.send(&any(WINDOW_TYPE, &u)).await
        }
    };
    if grant(WINDOW).await.is_err() {
        return;
    }
    let mut window = WINDOW;
    'stream: while let Ok(Some(a)) = rx.recv().await {
        if !is(&a, DATA_TYPE) {
            continue;
        }
        let Ok(d) = Data::parse_from_bytes(&a.value) else {
            continue;
        };
        window = window.saturating_sub(i32::try_from(d.data.len()).unwrap_or(i32::MAX));
        let mut chunk = &d.data[..];
        while !chunk.is_empty() {
            match agent.write_stdin(&cid, &eid, chunk.to_vec()).await {
                Ok(0) | Err(_) => break 'stream,
                Ok(w) => chunk = &chunk[(w as usize).min(chunk.len())..],
            }
        }
        if window <= WINDOW / 2 {
            if grant(WINDOW).await.is_err() {
                break;
            }
            window = window.saturating_add(WINDOW);
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &eid).await {
        tracing::debug!(container = %cid, exec = %eid, "close stdin: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        let a = "ttrpc+unix:///run/k/task.sock?streaming_id=abc-stdout";
        assert!(is_stream(a));
        assert_eq!(stream_id(a).unwrap(), "abc-stdout");
        assert_eq!(
            stream_id("ttrpc+unix:///s?x=1&streaming_id=e-stdin").unwrap(),
            "e-stdin"
        );
        assert!(stream_id("ttrpc+unix:///s").is_err());
        assert!(stream_id("ttrpc+unix:///s?streaming_id=").is_err());
        assert!(!is_stream("/run/containerd/io/abc-stdout"));
    }

    #[test]
    fn type_urls() {
        let a = any(INIT_TYPE, &StreamInit::new());
        assert!(is(&a, INIT_TYPE));
        let mut b = a.clone();
        b.type_url = format!("type.googleapis.com/{INIT_TYPE}");
        assert!(is(&b, INIT_TYPE));
        assert!(!is(&b, DATA_TYPE));
    }
}
