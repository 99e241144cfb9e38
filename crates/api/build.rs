//! Generates the ttrpc bindings of kuasar's own protocols into OUT_DIR:
//! messages and the blocking service in `<proto>/`, the async service in
//! `<proto>_async/` (used only with the `async` feature).
use std::path::{Path, PathBuf};

fn generate(proto: &str, dir: &Path, async_all: bool) {
    let file = format!("protos/{proto}.proto");
    std::fs::create_dir_all(dir).expect("create output directory");
    ttrpc_codegen::Codegen::new()
        .out_dir(dir)
        .inputs([&file])
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

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    for proto in ["agent", "sandboxer"] {
        println!("cargo:rerun-if-changed=protos/{proto}.proto");
        let dir = out.join(proto);
        generate(proto, &dir, false);
        let async_dir = out.join(format!("{proto}_async"));
        generate(proto, &async_dir, true);
        std::fs::copy(
            async_dir.join(format!("{proto}_ttrpc.rs")),
            dir.join(format!("{proto}_ttrpc_async.rs")),
        )
        .expect("copy async service");
        // The generated mod.rs names only the message module; add the services.
        let mod_rs = dir.join("mod.rs");
        let mut text = std::fs::read_to_string(&mod_rs).expect("read generated mod.rs");
        text.push_str(&format!(
            "pub mod {proto}_ttrpc;\n#[cfg(feature = \"async\")]\npub mod {proto}_ttrpc_async;\n"
        ));
        std::fs::write(&mod_rs, text).expect("write generated mod.rs");
    }
}
