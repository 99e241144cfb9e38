//! A minimal QMP client: enough to ask QEMU to quit.
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

    /// Asks QEMU to quit. QEMU may close the connection before it replies.
    pub async fn quit(mut self) -> Result<(), QmpError> {
        let msg = serde_json::json!({ "execute": "quit" }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await?;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.read_message()).await;
        Ok(())
    }
}
