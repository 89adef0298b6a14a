//! Compiles every `.proto` under `proto/` with protox (pure Rust, no system
//! `protoc`), generates prost messages and tonic stubs, writes the encoded
//! file descriptor set (for gRPC server reflection and the contract bundle,
//! custom options included), and writes the events the `.proto` files
//! declare (`shop.options.v1.event`) as a Rust table, which the hand-written
//! event table in `src/event.rs` is checked against as it compiles.

use std::fmt::Write as _;
use std::path::PathBuf;

use prost_reflect::{DescriptorPool, Value};

/// The option every event message carries (`proto/shop/options/v1/event.proto`).
const EVENT_OPTION: &str = "shop.options.v1.event";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = proto_files(&root)?;
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&files)?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded through reflection, so the custom options survive (prost's own
    // `FileDescriptorSet` drops extensions).
    std::fs::write(
        out_dir.join("shop_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    std::fs::write(
        out_dir.join("declared_events.rs"),
        declared_events(&compiler.descriptor_pool())?,
    )?;

    let mut config = prost_build::Config::new();
    // `prost::Name` on every message: the contracts crate checks each event's
    // wire type name against it.
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}

/// `DECLARED_EVENTS`: every message with the event option, by full name.
fn declared_events(pool: &DescriptorPool) -> Result<String, Box<dyn std::error::Error>> {
    let option = pool
        .get_extension_by_name(EVENT_OPTION)
        .ok_or_else(|| format!("{EVENT_OPTION} is not declared under proto/"))?;
    let mut rows = Vec::new();
    for message in pool.all_messages() {
        let options = message.options();
        if !options.has_extension(&option) {
            continue;
        }
        let Value::Message(declared) = options.get_extension(&option).into_owned() else {
            return Err(format!("{EVENT_OPTION} on {} is not a message", message.full_name()).into());
        };
        let text = |field: &str| -> Result<String, String> {
            match declared.get_field_by_name(field).as_deref() {
                Some(Value::String(value)) if !value.is_empty() => Ok(value.clone()),
                _ => Err(format!(
                    "{EVENT_OPTION} on {} has no {field}",
                    message.full_name()
                )),
            }
        };
        let flag = |field: &str| -> Result<String, String> {
            match declared.get_field_by_name(field).as_deref() {
                Some(Value::Bool(value)) => Ok(value.to_string()),
                None => Ok("false".to_owned()),
                Some(_) => Err(format!(
                    "{EVENT_OPTION} on {}: {field} is not a bool",
                    message.full_name()
                )),
            }
        };
        let row = [
            ("type_name", message.full_name().to_owned()),
            ("default_exchange", text("default_exchange")?),
            ("routing_key", text("routing_key")?),
            ("aggregate_type", text("aggregate_type")?),
            ("aggregate_id_field", text("aggregate_id_field")?),
            ("aggregate_version_field", text("aggregate_version_field")?),
            ("state_carrying", flag("state_carrying")?),
            ("snapshot", flag("snapshot")?),
        ];
        if row[7].1 == "true" && row[6].1 != "true" {
            return Err(format!(
                "{}: a snapshot event must also be state_carrying",
                message.full_name()
            )
            .into());
        }
        for (field, kind) in [
            (&row[4].1, prost_reflect::Kind::String),
            (&row[5].1, prost_reflect::Kind::Int64),
        ] {
            let found = message.get_field_by_name(field).ok_or_else(|| {
                format!(
                    "{}: {EVENT_OPTION} names {field}, which it has not",
                    message.full_name()
                )
            })?;
            if found.kind() != kind || found.is_list() {
                return Err(format!("{}.{field} must be a single {kind:?}", message.full_name()).into());
            }
        }
        rows.push(row);
    }
    rows.sort();
    let mut out = String::from(
        "/// Every message the `.proto` files declare as an event (option\n\
         /// `shop.options.v1.event`), sorted by full name. Generated by `build.rs`.\n\
         pub const DECLARED_EVENTS: &[DeclaredEvent] = &[\n",
    );
    for row in rows {
        out.push_str("    DeclaredEvent {\n");
        for (field, value) in row {
            if matches!(field, "state_carrying" | "snapshot") {
                writeln!(out, "        {field}: {value},")?;
            } else {
                writeln!(out, "        {field}: {value:?},")?;
            }
        }
        out.push_str("    },\n");
    }
    out.push_str("];\n");
    Ok(out)
}

/// Every `.proto` file below `dir`, sorted so the build is reproducible.
fn proto_files(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}
