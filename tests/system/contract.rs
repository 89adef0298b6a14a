//! The published event contract, generated from the code that defines it:
//! the `shop.options.v1.event` option of each event message (routing), the
//! compiled descriptors (payloads), and the header and property table of
//! `shop_messaging::wire` (headers with their AMQP types, and which are the
//! contract). Nothing here is typed twice: a header or an event added there
//! appears in every document by regeneration.
//!
//! What it writes (the contract bundle, `docs/contract/`, plus the events
//! page `docs/events.md`):
//!
//! | file | what |
//! |---|---|
//! | `docs/contract/asyncapi.yaml` | AsyncAPI 3.0: a channel per routing key with its AMQP bindings, a message per event with its properties, headers (each with its AMQP type letter) and a self-contained protobuf schema, and the consumer rules |
//! | `docs/contract/shop-events.binpb` | `FileDescriptorSet` of the event `.proto` files with their imports (custom options and comments kept) |
//! | `docs/contract/proto/…` | those `.proto` files |
//! | `docs/contract/events.md`, `docs/events.md` | the same contract for people |
//! | `docs/contract/envelopes/*.json` | golden envelopes, one per event type ([`crate::envelopes`]): written once, never rewritten |
//!
//! `cargo test -p system-tests --test system contract` fails when a file
//! differs from what the code generates; `UPDATE_CONTRACT=1` rewrites them
//! (all but the envelopes).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor,
};
use shop_contracts::{DECLARED_EVENTS, DeclaredEvent};
use shop_messaging::wire::{self, HeaderRole, HeaderSpec};

/// The root of the repository.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The contract bundle's folder.
pub fn bundle_dir() -> PathBuf {
    repository().join("docs/contract")
}

/// Where the bundle's golden envelopes are.
pub fn envelopes_dir() -> PathBuf {
    bundle_dir().join("envelopes")
}

/// The producing service (`app_id`) of the events of a protobuf package.
pub fn producer(package: &str) -> &'static str {
    match package {
        "shop.user.v1" => user_service::app::SERVICE_NAME,
        "shop.order.v1" => order_service::app::SERVICE_NAME,
        other => panic!("no producing service known for the events of {other}"),
    }
}

/// The compiled contracts, custom options included.
pub fn pool() -> DescriptorPool {
    DescriptorPool::decode(shop_contracts::FILE_DESCRIPTOR_SET)
        .expect("the contracts' descriptor set decodes")
}

/// One event, as the contract documents it.
#[derive(Debug, Clone)]
pub struct EventDoc {
    /// The `.proto` option.
    pub declared: DeclaredEvent,
    /// The message.
    pub message: MessageDescriptor,
    /// `app_id` of its producer.
    pub producer: &'static str,
}

impl EventDoc {
    /// The message's short name, e.g. `UserCreated`.
    pub fn name(&self) -> &str {
        self.message.name()
    }
}

/// Every declared event, ordered by exchange, then as in its `.proto` file.
pub fn events(pool: &DescriptorPool) -> Vec<EventDoc> {
    let mut events: Vec<EventDoc> = DECLARED_EVENTS
        .iter()
        .map(|declared| {
            let message = pool
                .get_message_by_name(declared.type_name)
                .unwrap_or_else(|| panic!("{} is not in the descriptor set", declared.type_name));
            EventDoc {
                declared: *declared,
                producer: producer(message.package_name()),
                message,
            }
        })
        .collect();
    events.sort_by_key(|e| (e.declared.default_exchange, e.message.path().to_vec()));
    events
}

/// The files that define the events and every file they import, in the
/// pool's order (each file after its imports).
pub fn event_files(pool: &DescriptorPool, events: &[EventDoc]) -> Vec<FileDescriptor> {
    let mut needed = BTreeSet::new();
    let mut pending: Vec<FileDescriptor> = events.iter().map(|e| e.message.parent_file()).collect();
    while let Some(file) = pending.pop() {
        if needed.insert(file.name().to_owned()) {
            pending.extend(file.dependencies());
        }
    }
    pool.files().filter(|f| needed.contains(f.name())).collect()
}

/// `FileDescriptorSet` of `files`, each encoded with its options and
/// comments.
pub fn descriptor_set(files: &[FileDescriptor]) -> Vec<u8> {
    let mut out = Vec::new();
    for file in files {
        let encoded = file.encode_to_vec();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(encoded.len() as u64, &mut out);
        out.extend_from_slice(&encoded);
    }
    out
}

/// Every file of the bundle that is generated, by path under the repository.
pub fn generated() -> BTreeMap<PathBuf, Vec<u8>> {
    let pool = pool();
    let events = events(&pool);
    let files = event_files(&pool, &events);
    let mut out = BTreeMap::new();
    let bundle = PathBuf::from("docs/contract");
    out.insert(bundle.join("shop-events.binpb"), descriptor_set(&files));
    for file in &files {
        if file.name().starts_with("google/") {
            continue;
        }
        let source = std::fs::read(repository().join("proto").join(file.name()))
            .unwrap_or_else(|e| panic!("proto/{}: {e}", file.name()));
        out.insert(bundle.join("proto").join(file.name()), source);
    }
    out.insert(bundle.join("asyncapi.yaml"), asyncapi(&events).into_bytes());
    let page = events_page(&events).into_bytes();
    out.insert(bundle.join("events.md"), page.clone());
    out.insert(PathBuf::from("docs/events.md"), page);
    out
}

// ---------------------------------------------------------------------------
// Comments and self-contained protobuf schemas

/// The leading comment of the element at `path` in `file`, trimmed.
fn comment(file: &FileDescriptor, path: &[i32]) -> String {
    file.file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == path))
        .and_then(|l| l.leading_comments.clone())
        .map(|c| {
            c.lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn message_comment(message: &MessageDescriptor) -> String {
    comment(&message.parent_file(), message.path())
}

fn field_comment(field: &FieldDescriptor) -> String {
    comment(&field.parent_file(), field.path())
}

fn enum_comment(descriptor: &EnumDescriptor) -> String {
    comment(&descriptor.parent_file(), descriptor.path())
}

fn scalar(kind: &Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(_) | Kind::Enum(_) => return None,
    })
}

/// The name a field's type is written with in a schema of `package`.
fn type_name(kind: &Kind, package: &str) -> String {
    if let Some(name) = scalar(kind) {
        return name.to_owned();
    }
    let full = match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        _ => unreachable!("scalars returned above"),
    };
    full.strip_prefix(&format!("{package}."))
        .map_or(full.clone(), str::to_owned)
}

fn write_comment(out: &mut String, indent: &str, text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            writeln!(out, "{indent}//").unwrap();
        } else {
            writeln!(out, "{indent}// {line}").unwrap();
        }
    }
}

/// A `.proto` text that defines `root` with everything it needs and imports
/// nothing but the well-known types: what AsyncAPI's protobuf schema parser
/// takes (inline, no imports of one's own, one root message).
pub fn inline_schema(root: &MessageDescriptor) -> String {
    let package = root.package_name().to_owned();
    // The messages and enums `root` reaches, outside google.protobuf.
    let mut messages: Vec<MessageDescriptor> = Vec::new();
    let mut enums: Vec<EnumDescriptor> = Vec::new();
    let mut imports = BTreeSet::new();
    let mut pending = vec![root.clone()];
    while let Some(message) = pending.pop() {
        if messages.iter().any(|m| m.full_name() == message.full_name()) {
            continue;
        }
        for field in message.fields() {
            match field.kind() {
                Kind::Message(m) if m.package_name() == "google.protobuf" => {
                    imports.insert(m.parent_file().name().to_owned());
                }
                Kind::Message(m) => pending.push(m),
                Kind::Enum(e) if !enums.iter().any(|known| known.full_name() == e.full_name()) => {
                    enums.push(e)
                }
                _ => {}
            }
        }
        messages.push(message);
    }
    let names = messages
        .iter()
        .map(|m| (m.package_name(), m.full_name()))
        .chain(enums.iter().map(|e| (e.package_name(), e.full_name())));
    for (other, name) in names {
        assert_eq!(
            other,
            package,
            "{} needs {name} from another package: the inline schema cannot hold two packages",
            root.full_name()
        );
    }

    let mut out = String::from("syntax = \"proto3\";\n\n");
    writeln!(out, "package {package};\n").unwrap();
    for import in &imports {
        writeln!(out, "import \"{import}\";").unwrap();
    }
    if !imports.is_empty() {
        out.push('\n');
    }
    enums.sort_by(|a, b| a.full_name().cmp(b.full_name()));
    for e in &enums {
        write_comment(&mut out, "", &enum_comment(e));
        writeln!(out, "enum {} {{", e.name()).unwrap();
        for value in e.values() {
            writeln!(out, "  {} = {};", value.name(), value.number()).unwrap();
        }
        out.push_str("}\n\n");
    }
    // Dependencies first, the root last.
    let (root_message, mut others): (Vec<_>, Vec<_>) = messages
        .into_iter()
        .partition(|m| m.full_name() == root.full_name());
    others.sort_by(|a, b| a.full_name().cmp(b.full_name()));
    for message in others.iter().chain(root_message.iter()) {
        let mut text = message_comment(message);
        if message.full_name() == root.full_name() {
            text = if text.is_empty() {
                "@RootNode".to_owned()
            } else {
                format!("{text}\n@RootNode")
            };
        }
        write_comment(&mut out, "", &text);
        writeln!(out, "message {} {{", message.name()).unwrap();
        for field in message.fields() {
            write_comment(&mut out, "  ", &field_comment(&field));
            let label = if field.is_list() {
                "repeated "
            } else if field.field_descriptor_proto().proto3_optional() {
                "optional "
            } else {
                ""
            };
            writeln!(
                out,
                "  {label}{} {} = {};",
                type_name(&field.kind(), &package),
                field.name(),
                field.number()
            )
            .unwrap();
        }
        out.push_str("}\n");
        if message.full_name() != root.full_name() {
            out.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------
// A small YAML writer: ordered maps, every string quoted (JSON style, valid
// YAML), multi-line text as literal blocks. Output is stable byte for byte.

/// A YAML value.
#[derive(Debug, Clone)]
pub enum Yaml {
    /// A string.
    Str(String),
    /// A multi-line string, written as a literal block.
    Block(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A sequence.
    List(Vec<Yaml>),
    /// A mapping, in this order.
    Map(Vec<(String, Yaml)>),
}

fn s(text: impl Into<String>) -> Yaml {
    let text = text.into();
    if text.contains('\n') {
        Yaml::Block(text)
    } else {
        Yaml::Str(text)
    }
}

fn map(entries: Vec<(&str, Yaml)>) -> Yaml {
    Yaml::Map(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn reference(path: &str) -> Yaml {
    map(vec![("$ref", s(path))])
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn key(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !text.starts_with('-')
    {
        text.to_owned()
    } else {
        quoted(text)
    }
}

fn is_inline(value: &Yaml) -> bool {
    match value {
        Yaml::Str(_) | Yaml::Int(_) | Yaml::Bool(_) => true,
        Yaml::List(items) => items.is_empty(),
        Yaml::Map(entries) => entries.is_empty(),
        Yaml::Block(_) => false,
    }
}

fn inline(value: &Yaml) -> String {
    match value {
        Yaml::Str(text) => quoted(text),
        Yaml::Int(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::List(_) => "[]".to_owned(),
        Yaml::Map(_) => "{}".to_owned(),
        Yaml::Block(_) => unreachable!("blocks are not inline"),
    }
}

fn write_block(out: &mut String, indent: usize, text: &str) {
    let keep = if text.ends_with('\n') { "|" } else { "|-" };
    out.push_str(keep);
    out.push('\n');
    for line in text.trim_end_matches('\n').lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            writeln!(out, "{}{line}", " ".repeat(indent)).unwrap();
        }
    }
}

fn write_entries(out: &mut String, indent: usize, entries: &[(String, Yaml)]) {
    for (k, v) in entries {
        write!(out, "{}{}:", " ".repeat(indent), key(k)).unwrap();
        write_value(out, indent, v);
    }
}

/// Writes `value` after a `key:` or `-` already written at `indent`.
fn write_value(out: &mut String, indent: usize, value: &Yaml) {
    match value {
        v if is_inline(v) => writeln!(out, " {}", inline(v)).unwrap(),
        Yaml::Block(text) => {
            out.push(' ');
            write_block(out, indent + 2, text);
        }
        Yaml::Map(entries) => {
            out.push('\n');
            write_entries(out, indent + 2, entries);
        }
        Yaml::List(items) => {
            out.push('\n');
            for item in items {
                write!(out, "{}-", " ".repeat(indent + 2)).unwrap();
                match item {
                    Yaml::Map(entries) if !entries.is_empty() => {
                        // The first entry on the dash's line, the rest below it.
                        let (k, v) = &entries[0];
                        write!(out, " {}:", key(k)).unwrap();
                        write_value(out, indent + 4, v);
                        write_entries(out, indent + 4, &entries[1..]);
                    }
                    other => write_value(out, indent + 2, other),
                }
            }
        }
        _ => unreachable!("inline values handled first"),
    }
}

/// The YAML text of a document.
pub fn to_yaml(entries: &[(String, Yaml)]) -> String {
    let mut out = String::new();
    write_entries(&mut out, 0, entries);
    out
}

// ---------------------------------------------------------------------------
// The rules a consumer follows, one text for both documents.

/// The consumer rules, in Markdown.
pub fn rules() -> String {
    let partitions = wire::PARTITIONS;
    format!(
        "\
**Identity and deduplication.** `message_id` is the event id, a UUIDv7, unique per event. \
An event may be delivered more than once (the producer publishes at least once: a relay that \
stops between the broker's confirm and its own commit publishes again, with the same id and the \
same bytes). Deduplicate by `message_id`, or by the aggregate's version (below).

**Ordering.** Each event is about one aggregate (`aggregate_type`, `aggregate_id`), and \
`aggregate_version` numbers that aggregate's events 1, 2, 3, … without gaps; it equals the \
version field of the body. The producer publishes each aggregate's events in version order, one \
at a time (the next only after the broker confirmed the previous one). Events of different \
aggregates are not ordered. The broker keeps that order within one queue; retries, several \
consumers or several queues can reorder, so a consumer that needs order keeps, per aggregate, \
the last version it applied: it applies version n+1, drops a version ≤ n as a repeat, and holds \
a version > n+1 until the ones before it arrived. A snapshot (see *carries*) is the exception: \
it may repeat the version of the event before it, and one above n+1 is a jump, not a gap.

**Partitioning.** `partition` is FNV-1a (32-bit: offset basis 2166136261, prime 16777619, over \
the UTF-8 bytes of `aggregate_id`) modulo {partitions}, sent as a signed 16-bit integer (`s`). \
The `CC` header carries `partition.<partition>` as a second routing key, so a consumer can bind \
a direct exchange per partition (`partition.0` … `partition.{last}`) and keep each aggregate on \
one queue. The same aggregate is always in the same \
partition.

**Binding, and events published before it.** Events are routed by the topic exchange when they \
are published: an event published before a consumer's queue was bound is not delivered to that \
queue, ever (there is no replay from the exchange). Declare and bind the queue before the \
producer publishes what you need. A producer whose `RELAY_UNROUTABLE` is `wait` (the user \
service's default) keeps an event that no queue takes in its outbox and publishes it once some \
queue is bound; with `drop` (the order service's default) the broker drops it.

**Compatibility.** Fields are only added, never renumbered, retyped or removed (`buf breaking` \
against the released baseline); a consumer ignores fields it does not know. Headers are only \
added; their names and AMQP types do not change (the golden envelopes hold the released ones). \
An unknown `type` is an event type added after the consumer was written: skip or park it, do \
not fail on it.

**Signature.** The producer signs every event with Ed25519 (RFC 8032); `signature` holds the \
64-byte signature in base64 (standard alphabet, padded), `signature_key_id` the id of its key, \
whose 32-byte public key the producer's operators hand to consumers. The signed bytes are not \
the header table but these fields, each as its length (4 bytes, unsigned, big-endian) followed \
by its bytes, in this order: the text `{domain}`, the key id, `message_id`, `type`, \
`aggregate_type`, `aggregate_id`, then `aggregate_version` as 8 bytes (signed, big-endian), then \
`app_id`, then the body. Verify before you decode or sequence anything, and drop what does not \
verify with a key you trust for that producer.

**Header types.** Headers are sent with RabbitMQ's field types: `S` long string, `l` signed \
64-bit integer, `s` signed 16-bit integer, `A` array, `t` boolean. Clients that follow the \
AMQP 0-9-1 specification's own table instead of RabbitMQ's errata misread `s` and `l`; read the \
page's client notes.",
        last = partitions - 1,
        domain = String::from_utf8_lossy(shop_messaging::signing::DOMAIN)
    )
}

// ---------------------------------------------------------------------------
// The AsyncAPI document

fn channel_id(event: &EventDoc) -> String {
    // `user.created` → `userCreated`
    let mut id = String::new();
    let mut upper = false;
    for c in event.declared.routing_key.chars() {
        if c.is_ascii_alphanumeric() {
            if upper {
                id.extend(c.to_uppercase());
            } else {
                id.push(c);
            }
            upper = false;
        } else {
            upper = true;
        }
    }
    id
}

fn role_word(role: HeaderRole) -> String {
    match role {
        HeaderRole::Contract => "contract".to_owned(),
        HeaderRole::Optional => "contract, optional".to_owned(),
        HeaderRole::OptIn(setting) => format!("contract, opt-in ({setting})"),
        HeaderRole::Internal => "internal".to_owned(),
    }
}

/// The JSON schema of one header's value.
fn header_schema(header: &HeaderSpec, event: Option<&EventDoc>) -> Yaml {
    let mut entries: Vec<(&str, Yaml)> = vec![("description", s(header.meaning))];
    match header.field_type {
        wire::FieldType::LongString => entries.push(("type", s("string"))),
        wire::FieldType::LongLongInt => {
            entries.push(("type", s("integer")));
            entries.push(("format", s("int64")));
        }
        wire::FieldType::ShortInt => {
            entries.push(("type", s("integer")));
            entries.push(("format", s("int16")));
        }
        wire::FieldType::Boolean => entries.push(("type", s("boolean"))),
        wire::FieldType::LongStringArray => {
            entries.push(("type", s("array")));
            entries.push(("items", map(vec![("type", s("string"))])));
        }
    }
    match header.name {
        wire::AGGREGATE_TYPE => {
            if let Some(event) = event {
                entries.push(("const", s(event.declared.aggregate_type)));
            }
        }
        wire::AGGREGATE_VERSION => entries.push(("minimum", Yaml::Int(1))),
        wire::PARTITION => {
            entries.push(("minimum", Yaml::Int(0)));
            entries.push(("maximum", Yaml::Int(i64::from(wire::PARTITIONS) - 1)));
        }
        wire::CC => {
            entries.push(("minItems", Yaml::Int(1)));
            entries.push(("maxItems", Yaml::Int(1)));
        }
        wire::CE_SPECVERSION => entries.push(("const", s(wire::CLOUDEVENTS_SPEC_VERSION))),
        wire::CE_TYPE | wire::CE_SOURCE => {
            if let Some(event) = event {
                let value = if header.name == wire::CE_TYPE {
                    event.declared.type_name
                } else {
                    event.producer
                };
                entries.push(("const", s(value)));
            }
        }
        _ => {}
    }
    entries.push(("x-amqp-field-type", s(header.field_type.letter().to_string())));
    entries.push(("x-contract", s(role_word(header.role))));
    map(entries)
}

fn headers_schema(event: &EventDoc) -> Yaml {
    let published: Vec<&HeaderSpec> = wire::HEADERS
        .iter()
        .filter(|h| h.role != HeaderRole::Internal)
        .collect();
    let required: Vec<Yaml> = published
        .iter()
        .filter(|h| h.role == HeaderRole::Contract)
        .map(|h| s(h.name))
        .collect();
    map(vec![
        ("type", s("object")),
        ("required", Yaml::List(required)),
        (
            "properties",
            Yaml::Map(
                published
                    .iter()
                    .map(|h| (h.name.to_owned(), header_schema(h, Some(event))))
                    .collect(),
            ),
        ),
    ])
}

fn properties_extension(event: &EventDoc) -> Yaml {
    Yaml::Map(
        wire::PROPERTIES
            .iter()
            .map(|p| {
                let value = match p.name {
                    "type" => Some(event.declared.type_name),
                    "app_id" => Some(event.producer),
                    _ => p.fixed,
                };
                let mut entries = vec![("domain", s(p.domain)), ("description", s(p.meaning))];
                if let Some(value) = value {
                    entries.push(("value", s(value)));
                }
                (p.name.to_owned(), map(entries))
            })
            .collect(),
    )
}

fn exchange_binding(exchange: &str) -> Yaml {
    map(vec![
        ("name", s(exchange)),
        ("type", s("topic")),
        ("durable", Yaml::Bool(true)),
        ("autoDelete", Yaml::Bool(false)),
        ("vhost", s("/")),
    ])
}

/// The AsyncAPI 3.0 document of every event.
pub fn asyncapi(events: &[EventDoc]) -> String {
    let mut channels = Vec::new();
    let mut operations = Vec::new();
    let mut messages = Vec::new();
    for event in events {
        let channel = channel_id(event);
        let name = event.name().to_owned();
        channels.push((
            channel.clone(),
            map(vec![
                ("address", s(event.declared.routing_key)),
                (
                    "description",
                    s(format!(
                        "`{}` events on the `{}` topic exchange (a setting of the {} may name another exchange), routing key `{}`.",
                        event.declared.type_name, event.declared.default_exchange, event.producer, event.declared.routing_key
                    )),
                ),
                (
                    "messages",
                    Yaml::Map(vec![(name.clone(), reference(&format!("#/components/messages/{name}")))]),
                ),
                (
                    "bindings",
                    map(vec![(
                        "amqp",
                        map(vec![
                            ("is", s("routingKey")),
                            ("exchange", exchange_binding(event.declared.default_exchange)),
                            ("bindingVersion", s("0.3.0")),
                        ]),
                    )]),
                ),
            ]),
        ));
        operations.push((
            format!("publish{name}"),
            map(vec![
                ("action", s("send")),
                ("title", s(format!("The {} publishes {name}", event.producer))),
                ("channel", reference(&format!("#/channels/{channel}"))),
                (
                    "messages",
                    Yaml::List(vec![reference(&format!("#/channels/{channel}/messages/{name}"))]),
                ),
                (
                    "bindings",
                    map(vec![(
                        "amqp",
                        map(vec![
                            ("deliveryMode", Yaml::Int(i64::from(wire::PERSISTENT))),
                            ("timestamp", Yaml::Bool(true)),
                            ("bindingVersion", s("0.3.0")),
                        ]),
                    )]),
                ),
            ]),
        ));
        let description = message_comment(&event.message);
        messages.push((
            name.clone(),
            map(vec![
                ("name", s(event.declared.type_name)),
                ("title", s(name.clone())),
                ("summary", s(description.lines().next().unwrap_or_default())),
                ("description", s(description.clone())),
                ("contentType", s(wire::CONTENT_TYPE)),
                ("headers", headers_schema(event)),
                (
                    "payload",
                    map(vec![
                        ("schemaFormat", s("application/vnd.google.protobuf;version=3")),
                        ("schema", Yaml::Block(inline_schema(&event.message))),
                    ]),
                ),
                (
                    "bindings",
                    map(vec![(
                        "amqp",
                        map(vec![
                            ("messageType", s(event.declared.type_name)),
                            ("bindingVersion", s("0.3.0")),
                        ]),
                    )]),
                ),
                ("x-amqp-properties", properties_extension(event)),
                (
                    "x-aggregate",
                    map(vec![
                        ("type", s(event.declared.aggregate_type)),
                        ("idField", s(event.declared.aggregate_id_field)),
                        ("versionField", s(event.declared.aggregate_version_field)),
                        ("stateCarrying", Yaml::Bool(event.declared.state_carrying)),
                        ("snapshot", Yaml::Bool(event.declared.snapshot)),
                    ]),
                ),
                (
                    "x-golden-envelope",
                    s(format!("envelopes/{}.json", event.declared.type_name)),
                ),
            ]),
        ));
    }
    let internal = wire::HEADERS
        .iter()
        .filter(|h| h.role == HeaderRole::Internal)
        .map(|h| (h.name.to_owned(), header_schema(h, None)))
        .collect();
    let document = vec![
        ("asyncapi".to_owned(), s("3.0.0")),
        (
            "info".to_owned(),
            map(vec![
                ("title", s("shop events")),
                ("version", s(env!("CARGO_PKG_VERSION"))),
                (
                    "description",
                    s(format!(
                        "The events the shop services publish on RabbitMQ, generated from the code that \
                         publishes them (the `shop.options.v1.event` option of each message, the \
                         descriptors, and the header table of the wire module). Payloads are protobuf \
                         (`shop-events.binpb` beside this file holds the descriptors).\n\n{}\n",
                        rules()
                    )),
                ),
            ]),
        ),
        ("defaultContentType".to_owned(), s(wire::CONTENT_TYPE)),
        (
            "servers".to_owned(),
            map(vec![(
                "rabbitmq",
                map(vec![
                    ("host", s("localhost:5672")),
                    ("protocol", s("amqp")),
                    ("protocolVersion", s("0.9.1")),
                    (
                        "description",
                        s("RabbitMQ 3.10 or later; compose publishes it on localhost."),
                    ),
                ]),
            )]),
        ),
        ("channels".to_owned(), Yaml::Map(channels)),
        ("operations".to_owned(), Yaml::Map(operations)),
        (
            "components".to_owned(),
            map(vec![
                ("messages", Yaml::Map(messages)),
                (
                    "schemas",
                    map(vec![(
                        "ConsumerBookkeepingHeaders",
                        map(vec![
                            (
                                "description",
                                s(
                                    "Headers a consumer of this system writes on its own copies of an event (retries, \
                                   dead letters, released parked events). Not part of the contract: never on a \
                                   producer's event; ignore them.",
                                ),
                            ),
                            ("type", s("object")),
                            ("properties", Yaml::Map(internal)),
                        ]),
                    )]),
                ),
            ]),
        ),
    ];
    format!(
        "# Generated by `UPDATE_CONTRACT=1 cargo test -p system-tests --test system contract`\n\
         # from the proto options, the descriptors and shop_messaging::wire. Do not edit.\n{}",
        to_yaml(&document)
    )
}

// ---------------------------------------------------------------------------
// The events page

fn header_rows(out: &mut String, filter: impl Fn(&HeaderSpec) -> bool) {
    out.push_str("| header | AMQP type | role | holds |\n|---|---|---|---|\n");
    for h in wire::HEADERS.iter().filter(|h| filter(h)) {
        writeln!(
            out,
            "| `{}` | `{}` ({}) | {} | {} |",
            h.name,
            h.field_type.letter(),
            h.field_type.meaning(),
            role_word(h.role),
            h.meaning
        )
        .unwrap();
    }
}

/// The human-readable page of the contract.
pub fn events_page(events: &[EventDoc]) -> String {
    let mut out = String::from(
        "<!-- Generated by `UPDATE_CONTRACT=1 cargo test -p system-tests --test system contract` from the proto \
         options, the descriptors and shop_messaging::wire. Do not edit. -->\n\
         # The events\n\n\
         What the shop services publish on RabbitMQ, for a consumer in any language. The machine-readable \
         form is the contract bundle, `docs/contract/`: `asyncapi.yaml` (AsyncAPI 3.0), `shop-events.binpb` \
         (a `FileDescriptorSet` of the event `.proto` files with their imports), `proto/` (those files) and \
         `envelopes/` (one golden message per event type: body, its canonical JSON, properties, and the \
         header table with its AMQP types, as encoded bytes too). `docs/consuming.md` (in the \
         repository) walks through a consumer, step by step.\n\n## Events\n\n\
         | type (AMQP `type`) | exchange (default) | routing key | producer (`app_id`) | aggregate | id field | version field | carries |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for e in events {
        writeln!(
            out,
            "| `{}` | `{}` | `{}` | `{}` | `{}` | `{}` | `{}` | {} |",
            e.declared.type_name,
            e.declared.default_exchange,
            e.declared.routing_key,
            e.producer,
            e.declared.aggregate_type,
            e.declared.aggregate_id_field,
            e.declared.aggregate_version_field,
            if e.declared.snapshot {
                "snapshot"
            } else if e.declared.state_carrying {
                "state"
            } else {
                "change"
            }
        )
        .unwrap();
    }
    out.push_str(
        "\n*carries* (the `.proto` options `state_carrying` and `snapshot`): `change`, the event says \
         what changed, and applies only on top of the version before it; `state`, the event holds the \
         aggregate's whole state at its version, so its effect does not depend on the versions before \
         it; `snapshot`, a state-carrying event republished on request (the user service's \
         `ResyncUsers`), not a change: take one above your position as \"jump to this version with this \
         state\", one at or below it as a repeat. A snapshot may repeat a version another event already \
         had, with its own event id.\n",
    );
    out.push_str(
        "\nExchanges are durable topic exchanges; each producer's setting (`USER_EVENTS_EXCHANGE`, \
         `ORDER_EVENTS_EXCHANGE`) may name another one. Bind your queue with the routing keys you want \
         (`user.*` for every user event).\n\n## Properties\n\n| property | AMQP domain | value |\n|---|---|---|\n",
    );
    for p in wire::PROPERTIES {
        let value = p
            .fixed
            .map_or_else(|| p.meaning.to_owned(), |v| format!("`{v}`: {}", p.meaning));
        writeln!(out, "| `{}` | `{}` | {value} |", p.name, p.domain).unwrap();
    }
    out.push_str("\n## Headers\n\nWhat a producer's event carries. *Contract* headers are on every event; *optional* ones when the call had a trace context; *opt-in* ones when the producer's setting turns them on.\n\n");
    header_rows(&mut out, |h| h.role != HeaderRole::Internal);
    out.push_str(
        "\nInternal headers: a consumer of this system writes them on its own copies of an event (retries, \
         dead letters, parked events released), never on a producer's event. They are not part of the \
         contract; ignore them.\n\n",
    );
    header_rows(&mut out, |h| h.role == HeaderRole::Internal);
    out.push_str("\n## Rules\n\n");
    out.push_str(&rules());
    out.push_str(
        "\n\n## Client notes: which AMQP client versions read the headers\n\n\
         RabbitMQ writes `s` for a signed 16-bit integer and `l` for a signed 64-bit integer (its \
         errata to AMQP 0-9-1); the specification's own table gives `s` to a short string and `l` to \
         nothing. Python's `amqp` (py-amqp, under Celery and kombu) before 5.0.0 decoded neither: \
         `partition` (`s`) and `aggregate_version` (`l`) failed the whole header table (py-amqp issues \
         #465 and #469). Use:\n\n\
         | client | minimum version | note |\n|---|---|---|\n\
         | `pika` (Python) | 1.0.0 | `data.decode_value` reads `s`, `l` and `A`; CI runs the consumer on 1.3.2 |\n\
         | `amqp` (py-amqp, Python; Celery, kombu) | 5.0.0 | reads `s` (int16) and `l` (int64); 2.x–2.6 and 5.0 pre-releases before it misread them |\n\
         | `lapin` (Rust), RabbitMQ's Java, .NET and Go clients | any current | follow RabbitMQ's letters |\n\n\
         The golden envelopes carry each event's header table as the encoded bytes RabbitMQ delivers \
         (`header_table`, base64): decode them with your client's table decoder to check it.\n\n## Payloads\n\n",
    );
    for e in events {
        writeln!(
            out,
            "### `{}`\n\n{}\n\n```proto\n{}```\n",
            e.declared.type_name,
            message_comment(&e.message),
            inline_schema(&e.message)
        )
        .unwrap();
    }
    out
}

// ---------------------------------------------------------------------------
// The check

#[test]
fn the_contract_documents_are_what_the_code_generates() {
    let update = std::env::var_os("UPDATE_CONTRACT").is_some();
    let mut stale = Vec::new();
    for (path, content) in generated() {
        let full = repository().join(&path);
        let current = std::fs::read(&full).ok();
        if current.as_deref() == Some(content.as_slice()) {
            continue;
        }
        if update {
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, &content).unwrap();
        } else {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "the contract documents differ from what the code generates: {}\n\
         regenerate them with UPDATE_CONTRACT=1 cargo test -p system-tests --test system contract and commit the result",
        stale.join(", ")
    );
}

#[test]
fn every_generated_proto_file_of_the_bundle_is_the_current_one() {
    // The bundle holds exactly the event files and their imports: none left
    // over from a file that was removed or renamed.
    let expected: BTreeSet<PathBuf> = generated()
        .into_keys()
        .filter(|p| p.starts_with("docs/contract/proto"))
        .collect();
    let mut found = BTreeSet::new();
    let mut pending = vec![bundle_dir().join("proto")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.insert(path.strip_prefix(repository()).unwrap().to_path_buf());
            }
        }
    }
    assert_eq!(
        found, expected,
        "docs/contract/proto holds files that are not the events' .proto files"
    );
}

#[test]
fn the_inline_schemas_import_nothing_but_well_known_types_and_name_one_root() {
    let pool = pool();
    for event in events(&pool) {
        let schema = inline_schema(&event.message);
        for line in schema.lines().filter(|l| l.starts_with("import ")) {
            assert!(
                line.starts_with("import \"google/protobuf/"),
                "{}: {line}",
                event.declared.type_name
            );
        }
        assert_eq!(schema.matches("@RootNode").count(), 1);
        assert!(schema.contains(&format!("message {} {{", event.name())));
    }
}
