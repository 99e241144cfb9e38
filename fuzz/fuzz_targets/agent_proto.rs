//! The agent protocol's messages as the two untrusted sides decode them: the
//! host (kuasar-vmm) decodes the guest's responses, the guest agent decodes
//! the host's requests, both after the ttrpc frame's Request/Response. The
//! first input byte picks the message type, the rest is its encoding.
#![no_main]

use kuasar_api::agent::*;
use kuasar_api::protobuf::Message;
use kuasar_api::ttrpc::proto::{Request, Response};
use libfuzzer_sys::fuzz_target;

fn decode<M: Message + PartialEq>(data: &[u8]) {
    let Ok(msg) = M::parse_from_bytes(data) else {
        return;
    };
    // Whatever decodes re-encodes, and that encoding decodes again.
    let bytes = msg.write_to_bytes().expect("encode a decoded message");
    let again = M::parse_from_bytes(&bytes).expect("decode a re-encoded message");
    assert_eq!(msg.compute_size(), again.compute_size());
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, data)) = data.split_first() else {
        return;
    };
    match kind % 28 {
        // Responses: guest -> host.
        0 => decode::<PingResponse>(data),
        1 => decode::<CreateContainerResponse>(data),
        2 => decode::<StartContainerResponse>(data),
        3 => decode::<ExecProcessResponse>(data),
        4 => decode::<WaitProcessResponse>(data),
        5 => decode::<WriteStreamResponse>(data),
        6 => decode::<ReadStreamResponse>(data),
        7 => decode::<ListPidsResponse>(data),
        8 => decode::<StatsResponse>(data),
        9 => decode::<Empty>(data),
        // Requests: host -> guest.
        10 => decode::<CreateContainerRequest>(data),
        11 => decode::<ContainerRequest>(data),
        12 => decode::<ExecProcessRequest>(data),
        13 => decode::<SignalProcessRequest>(data),
        14 => decode::<ProcessRequest>(data),
        15 => decode::<WriteStreamRequest>(data),
        16 => decode::<ReadStreamRequest>(data),
        17 => decode::<ResizeTtyRequest>(data),
        18 => decode::<SetupSandboxRequest>(data),
        19 => decode::<UpdateContainerRequest>(data),
        // The ttrpc envelopes around them.
        20 => decode::<Request>(data),
        21 => decode::<Response>(data),
        // Port forwarding (both directions).
        22 => decode::<PortForwardOpenResponse>(data),
        23 => decode::<PortForwardReadResponse>(data),
        24 => decode::<PortForwardOpenRequest>(data),
        25 => decode::<PortForwardWriteRequest>(data),
        26 => decode::<PortForwardReadRequest>(data),
        27 => decode::<PortForwardConnection>(data),
        _ => {}
    }
});
