//! Every sandbox of the node, by id.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::container::validate_id;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::sandbox::{Sandbox, SandboxInfo};

pub struct Registry {
    pub host: Arc<Host>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl Registry {
    pub fn new(host: Arc<Host>) -> Self {
        Registry {
            host,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Returns the sandbox, recording it first when it is new.
    pub fn register(&self, info: SandboxInfo) -> Result<Arc<Sandbox>> {
        validate_id("sandbox", &info.id)?;
        let mut map = self.map();
        if let Some(s) = map.get(&info.id) {
            return Ok(s.clone());
        }
        tracing::info!(sandbox = %info.id, namespace = %info.namespace, "sandbox registered");
        let sandbox = Sandbox::new(self.host.clone(), info);
        map.insert(sandbox.info.id.clone(), sandbox.clone());
        Ok(sandbox)
    }

    /// Registers a sandbox recovered from an earlier run.
    pub fn insert(&self, sandbox: Arc<Sandbox>) {
        self.map().insert(sandbox.info.id.clone(), sandbox);
    }

    /// Every sandbox, in no particular order.
    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        self.map().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>> {
        // An id that could not have been created is a bad argument, not an
        // unknown sandbox.
        validate_id("sandbox", id)?;
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))
    }

    /// Stops and forgets a sandbox. Deleting an unknown sandbox succeeds
    /// (and still removes a directory left under its name).
    pub async fn delete(&self, id: &str) -> Result<()> {
        validate_id("sandbox", id)?;
        let sandbox = self.map().remove(id);
        match sandbox {
            Some(s) => s.shutdown().await,
            None => {
                let dir = self.host.config.state_dir.join(id);
                if dir.exists() {
                    crate::recovery::clean_leftover(&self.host, &dir);
                }
            }
        }
        Ok(())
    }
}
