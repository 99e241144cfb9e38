//! Generates the ttrpc bindings of kuasar's own protocols into OUT_DIR:
//! messages and the blocking service in `<proto>/`, the async service in
//! `<proto>_async/` (used only with the `async` feature).
use std::path::{Path, PathBuf};

fn generate(inputs: &[String], dir: &Path, async_all: bool) {
    std::fs::create_dir_all(dir).expect("create output directory");
    ttrpc_codegen::Codegen::new()
        .out_dir(dir)
        .inputs(inputs)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(true))
        .run()
        .expect("generate ttrpc code");
}

/// containerd's Sandbox Controller (`containerd.services.sandbox.v1`, as of
/// containerd 2.1), a gRPC server with tonic/prost; protox parses the
/// protos, so no system `protoc` is needed.
#[cfg(feature = "grpc")]
fn generate_grpc() {
    let proto = "protos/containerd/services/sandbox/v1/sandbox.proto";
    for p in [
        proto,
        "protos/containerd/types/sandbox.proto",
        "protos/containerd/types/mount.proto",
        "protos/containerd/types/platform.proto",
        "protos/containerd/types/metrics.proto",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile([proto], ["protos"]).expect("parse the sandbox controller proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the sandbox controller server");
    // containerd's Version service: a client, for kuasar-vmm to learn which
    // containerd release it serves.
    let proto = "protos/containerd/services/version/v1/version.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["protos"]).expect("parse the version proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the version client");
}

/// Services whose methods are all streaming (no blocking bindings).
const ASYNC_ONLY: &[&str] = &["streaming"];

fn main() {
    #[cfg(feature = "grpc")]
    generate_grpc();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    // containerd's runtime sandbox API as of containerd 2.1 (newer than the
    // copy containerd-shim-protos 0.10 carries: SandboxMetrics, annotations).
    let containerd: Vec<String> = [
        "containerd/sandbox",
        "containerd/types/metrics",
        "containerd/types/mount",
        "containerd/types/platform",
    ]
    .iter()
    .map(|p| format!("protos/{p}.proto"))
    .collect();
    for (proto, inputs) in [
        ("agent", vec!["protos/agent.proto".to_owned()]),
        ("sandboxer", vec!["protos/sandboxer.proto".to_owned()]),
        ("sandbox", containerd),
        ("cri_pod", vec!["protos/cri_pod.proto".to_owned()]),
        // containerd 2.3's shim bootstrap protocol (messages only).
        (
            "bootstrap",
            vec!["protos/containerd/runtime/bootstrap/v1/bootstrap.proto".to_owned()],
        ),
        // containerd's streaming API (CRI io_type = "streaming"); the two
        // files share a name, so each is its own module.
        (
            "streaming",
            vec!["protos/containerd/services/streaming/v1/streaming.proto".to_owned()],
        ),
        (
            "transfer",
            vec!["protos/containerd/types/transfer/streaming.proto".to_owned()],
        ),
    ] {
        for input in &inputs {
            println!("cargo:rerun-if-changed={input}");
        }
        let dir = out.join(proto);
        generate(&inputs, &dir, false);
        let async_dir = out.join(format!("{proto}_async"));
        generate(&inputs, &async_dir, true);
        let service = async_dir.join(format!("{proto}_ttrpc.rs"));
        if !service.exists() {
            // Messages only.
            continue;
        }
        std::fs::copy(service, dir.join(format!("{proto}_ttrpc_async.rs")))
            .expect("copy async service");
        // The generated mod.rs names only the message module; add the services.
        let mod_rs = dir.join("mod.rs");
        let mut text = std::fs::read_to_string(&mod_rs).expect("read generated mod.rs");
        // The blocking codegen has no streaming methods: a streaming-only
        // service is async only.
        if !ASYNC_ONLY.contains(&proto) {
            text.push_str(&format!("pub mod {proto}_ttrpc;\n"));
        }
        text.push_str(&format!(
            "#[cfg(feature = \"async\")]\npub mod {proto}_ttrpc_async;\n"
        ));
        std::fs::write(&mod_rs, text).expect("write generated mod.rs");
    }
}
