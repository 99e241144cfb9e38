//! A minimal QMP client: enough to ask QEMU to quit and to hand it file
//! descriptors to keep (`getfd`/`closefd`).
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Largest QMP line accepted from QEMU.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect to QMP socket {path}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    #[error("QMP timed out")]
    Timeout,
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        tokio::time::timeout(timeout, async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| QmpError::Connect {
                    path: path.display().to_string(),
                    source,
                })?;
            let (r, w) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(r),
                writer: w,
            };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol(format!(
                    "unexpected greeting {greeting}"
                )));
            }
            qmp.execute("qmp_capabilities").await?;
            Ok(qmp)
        })
        .await
        .map_err(|_| QmpError::Timeout)?
    }

    async fn read_message(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Protocol("QEMU closed the QMP connection".into()));
            }
            if !line.ends_with('\n') && n >= MAX_LINE {
                return Err(QmpError::Protocol("QMP message too long".into()));
            }
            let value: serde_json::Value = serde_json::from_str(line.trim())
                .map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")))?;
            // Events arrive at any time; skip them.
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    /// Sends a command and waits for its reply.
    pub async fn execute(&mut self, command: &str) -> Result<serde_json::Value, QmpError> {
        let msg = serde_json::json!({ "execute": command }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await?;
        let reply = self.read_message().await?;
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Protocol(format!("{command}: {err}")));
        }
        Ok(reply)
    }

    /// Sends a command with arguments and waits for its reply.
    async fn execute_args(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let msg =
            serde_json::json!({ "execute": command, "arguments": arguments }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await?;
        self.reply(command).await
    }

    async fn reply(&mut self, command: &str) -> Result<serde_json::Value, QmpError> {
        let reply = self.read_message().await?;
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Protocol(format!("{command}: {err}")));
        }
        Ok(reply)
    }

    /// Hands QEMU a duplicate of `fd`, which it keeps open under `name`
    /// (replacing an earlier one of that name) until [`Qmp::closefd`] or
    /// its exit: QMP `getfd`, the descriptor passed with SCM_RIGHTS.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let msg = serde_json::json!({ "execute": "getfd", "arguments": { "fdname": name } })
            .to_string()
            + "\n";
        let stream: &UnixStream = self.writer.as_ref();
        let raw = stream.as_raw_fd();
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            stream.writable().await?;
            let res = stream.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    raw,
                    &[std::io::IoSlice::new(msg.as_bytes())],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The descriptor went with the first byte; the rest is plain text.
        self.writer.write_all(&msg.as_bytes()[sent..]).await?;
        self.reply("getfd").await.map(drop)
    }

    /// Closes what QEMU keeps under `name`; a name it does not know is not
    /// an error.
    pub async fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        match self
            .execute_args("closefd", serde_json::json!({ "fdname": name }))
            .await
        {
            Ok(_) => Ok(()),
            Err(QmpError::Protocol(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks QEMU to quit. QEMU may close the connection before it replies.
    pub async fn quit(mut self) -> Result<(), QmpError> {
        let msg = serde_json::json!({ "execute": "quit" }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await?;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.read_message()).await;
        Ok(())
    }
}
