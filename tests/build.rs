//! Generates the CRI v1 client (protos/cri/api.proto, package runtime.v1)
//! into OUT_DIR with tonic/prost; protox parses the proto, so no system
//! `protoc` is needed.
fn main() {
    let proto = "protos/cri/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["protos/cri"]).expect("parse the CRI proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the CRI client");
}
