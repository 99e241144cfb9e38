//! Publishes task events to containerd (`containerd.services.events.ttrpc.v1.Events/Forward`)
//! on behalf of the sandbox's shim, at the ttrpc address the shim passed.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kuasar_api::containerd::protobuf::well_known_types::any::Any;
use kuasar_api::containerd::protobuf::well_known_types::timestamp::Timestamp;
use kuasar_api::containerd::protobuf::{self, MessageFull};
use kuasar_api::containerd::shim::events::{Envelope, ForwardRequest};
use kuasar_api::containerd::shim_async::EventsClient;
use ttrpc::context;
use ttrpc::r#async::Client;

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// One cached client per containerd ttrpc address.
#[derive(Default)]
pub struct Publisher {
    clients: Mutex<HashMap<String, EventsClient>>,
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Packs a message the way containerd's typeurl names it: the bare full
/// name (`containerd.events.TaskExit`), no URL prefix.
pub fn pack<M: MessageFull>(m: &M) -> protobuf::Result<Any> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_owned(),
        value: m.write_to_bytes()?,
        ..Default::default()
    })
}

impl Publisher {
    fn client(&self, address: &str) -> Result<EventsClient, ttrpc::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("unix://{address}")
        };
        let client = EventsClient::new(Client::connect(&url)?);
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// Sends one event; failures are logged, never returned: an event lost
    /// must not fail the request that caused it.
    pub async fn publish<E: MessageFull>(
        &self,
        address: &str,
        namespace: &str,
        topic: &str,
        event: E,
    ) {
        if address.is_empty() {
            tracing::debug!(topic, "no containerd address: event not published");
            return;
        }
        let any = match pack(&event) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(topic, "pack event: {e}");
                return;
            }
        };
        let req = ForwardRequest {
            envelope: Some(Envelope {
                timestamp: Some(timestamp(SystemTime::now())).into(),
                namespace: namespace.to_owned(),
                topic: topic.to_owned(),
                event: Some(any).into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        for attempt in 0..2 {
            let client = match self.client(address) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(topic, address, "connect to containerd: {e}");
                    return;
                }
            };
            let ctx = context::with_timeout(PUBLISH_TIMEOUT.as_nanos() as i64);
            match client.forward(ctx, &req).await {
                Ok(_) => {
                    tracing::debug!(topic, namespace, "event published");
                    return;
                }
                Err(e) => {
                    // A stale connection (containerd restarted): reconnect once.
                    self.clients
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(address);
                    if attempt == 1 {
                        tracing::warn!(topic, address, "publish event: {e}");
                    }
                }
            }
        }
    }
}
