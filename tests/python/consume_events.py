#!/usr/bin/env python3
"""A consumer of the shop events written from the contract bundle alone.

It knows nothing of the Rust code: message types come from the bundle's
descriptor set (`shop-events.binpb`), exchanges, routing keys, properties,
header names and their AMQP types, aggregates and the partition count from
its AsyncAPI document (`asyncapi.yaml`). The partition function and the
signature's canonical bytes are the documented algorithms.

Offline (always): every golden envelope of the bundle decodes: its body with
the descriptor set (and equals its canonical JSON), its header table with
both pika's and py-amqp's decoders (the minimum versions the bundle's page
names) to the headers and AMQP types it lists, which are the AsyncAPI ones.

Live (`--amqp-url`): binds a queue of its own to every channel of the
document, prints `ready`, and checks every event that arrives until it has
seen `--count` of them: type known, body decodes, `message_id` a UUIDv7,
headers with the documented types, `aggregate_version` equal to the body's
version and consecutive per aggregate from 1, `partition` recomputed here,
and the producer's signature where the event carries one. Exits 1 on any
violation, listing them all.

    consume_events.py --bundle docs/contract
    consume_events.py --bundle docs/contract --amqp-url amqp://guest:guest@localhost:5672/%2f \
        --exchange user.events=user.events --count 5 --expect-types shop.user.v1.UserCreated,...
"""

import argparse
import base64
import json
import pathlib
import struct
import sys
import time
import uuid

import amqp.serialization
import pika
import pika.data
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits: the documented partition hash."""
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


# --- AMQP header tables: the type letter of each value, read from the bytes


def _skip_value(raw: bytes, at: int):
    """(letter, offset after the value) of the field value at `at`."""
    letter = chr(raw[at])
    at += 1
    sizes = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8,
             "f": 4, "d": 8, "T": 8, "D": 5, "V": 0}
    if letter in sizes:
        return letter, at + sizes[letter]
    if letter in "SxFA":
        (length,) = struct.unpack_from(">I", raw, at)
        return letter, at + 4 + length
    raise ValueError(f"unknown AMQP field type {letter!r}")


def table_letters(raw: bytes, at: int = 0) -> dict:
    """{name: letter} of the field table encoded at `at` (with its length)."""
    (length,) = struct.unpack_from(">I", raw, at)
    at += 4
    end = at + length
    letters = {}
    while at < end:
        name_length = raw[at]
        name = raw[at + 1:at + 1 + name_length].decode()
        at += 1 + name_length
        letter, at = _skip_value(raw, at)
        letters[name] = letter
    return letters


# pika decodes the header table and keeps no letters: remember them, keyed by
# the dict pika returns (which becomes `properties.headers`).
_LETTERS = {}
_pika_decode_table = pika.data.decode_table


def _decode_table_keeping_letters(encoded, offset):
    letters = table_letters(bytes(encoded), offset)
    table, end = _pika_decode_table(encoded, offset)
    _LETTERS[id(table)] = letters
    return table, end


pika.data.decode_table = _decode_table_keeping_letters


# --- The bundle


class Bundle:
    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.doc = yaml.safe_load((folder / "asyncapi.yaml").read_text())
        fds = descriptor_pb2.FileDescriptorSet.FromString((folder / "shop-events.binpb").read_bytes())
        self.pool = descriptor_pool.DescriptorPool()
        for file in fds.file:
            self.pool.Add(file)
        components = self.doc["components"]["messages"]
        self.messages = {}  # type name -> its AsyncAPI message, plus channel facts
        for channel in self.doc["channels"].values():
            exchange = channel["bindings"]["amqp"]["exchange"]["name"]
            for ref in channel["messages"].values():
                message = components[ref["$ref"].rsplit("/", 1)[1]]
                self.messages[message["name"]] = {
                    "message": message,
                    "exchange": exchange,
                    "routing_key": channel["address"],
                }
        partition = next(iter(components.values()))["headers"]["properties"]["partition"]
        self.partitions = partition["maximum"] + 1

    def message_class(self, type_name):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(type_name))

    def headers_schema(self, type_name):
        return self.messages[type_name]["message"]["headers"]


class Checker:
    def __init__(self, bundle: Bundle, trusted_keys: dict):
        self.bundle = bundle
        self.trusted_keys = trusted_keys
        self.violations = []
        self.versions = {}  # (aggregate type, id) -> last version seen
        self.seen_types = {}

    def fail(self, what, text):
        self.violations.append(f"{what}: {text}")

    def check_headers(self, what, type_name, headers, letters):
        schema = self.bundle.headers_schema(type_name)
        for name in schema.get("required", []):
            if name not in headers:
                self.fail(what, f"contract header {name} missing")
        for name, letter in letters.items():
            spec = schema["properties"].get(name)
            if spec is None:
                self.fail(what, f"header {name} is not in the contract")
            elif spec["x-amqp-field-type"] != letter:
                self.fail(what, f"header {name} sent as {letter!r}, the contract says {spec['x-amqp-field-type']!r}")

    def check_event(self, what, type_name, properties, headers, letters, body, exchange=None, routing_key=None,
                    sequence=True):
        """Checks one event; returns a one-line summary."""
        known = self.bundle.messages.get(type_name)
        if known is None:
            self.fail(what, f"unknown type {type_name!r}")
            return None
        message = known["message"]
        if routing_key is not None and routing_key != known["routing_key"]:
            self.fail(what, f"routing key {routing_key!r}, the contract says {known['routing_key']!r}")
        for name, spec in message["x-amqp-properties"].items():
            if name not in properties or properties[name] is None:
                self.fail(what, f"property {name} missing")
            elif "value" in spec and str(properties[name]) != spec["value"]:
                self.fail(what, f"property {name} is {properties[name]!r}, the contract says {spec['value']!r}")
        try:
            if uuid.UUID(str(properties.get("message_id"))).version != 7:
                self.fail(what, f"message_id {properties.get('message_id')} is not a UUIDv7")
        except ValueError:
            self.fail(what, f"message_id {properties.get('message_id')!r} is not a UUID")
        try:
            decoded = self.bundle.message_class(type_name).FromString(body)
        except Exception as error:  # noqa: BLE001 - any decode failure is the finding
            self.fail(what, f"body does not decode as {type_name}: {error}")
            return None
        self.check_headers(what, type_name, headers, letters)
        aggregate = message["x-aggregate"]
        aggregate_id = getattr(decoded, aggregate["idField"])
        version = getattr(decoded, aggregate["versionField"])
        if headers.get("aggregate_type") != aggregate["type"]:
            self.fail(what, f"aggregate_type {headers.get('aggregate_type')!r}, the contract says {aggregate['type']!r}")
        if headers.get("aggregate_id") != aggregate_id:
            self.fail(what, f"aggregate_id header {headers.get('aggregate_id')!r} differs from the body's {aggregate_id!r}")
        if headers.get("aggregate_version") != version:
            self.fail(what, f"aggregate_version header {headers.get('aggregate_version')!r} differs from the body's version {version}")
        partition = fnv1a_32(aggregate_id.encode()) % self.bundle.partitions
        if headers.get("partition") != partition:
            self.fail(what, f"partition header {headers.get('partition')!r}, FNV-1a gives {partition}")
        if headers.get("CC") != [f"partition.{partition}"]:
            self.fail(what, f"CC header {headers.get('CC')!r}, expected ['partition.{partition}']")
        if sequence:
            key = (aggregate["type"], aggregate_id)
            expected = self.versions.get(key, 0) + 1
            # A snapshot repeats a version or jumps to one; never goes back.
            if aggregate.get("snapshot") and version >= expected - 1:
                expected = version
            if version != expected:
                self.fail(what, f"{key[0]}/{aggregate_id} version {version} after {expected - 1}: not consecutive")
            self.versions[key] = max(version, self.versions.get(key, 0))
        signed = self.check_signature(what, type_name, properties, headers, body)
        self.seen_types[type_name] = self.seen_types.get(type_name, 0) + 1
        return (f"{type_name} {aggregate['type']}/{aggregate_id} v{version} partition {partition} "
                f"message_id {properties.get('message_id')}{' signed by ' + signed if signed else ''}")

    def check_signature(self, what, type_name, properties, headers, body):
        """The producer's Ed25519 signature over the documented canonical
        bytes, where the event carries one; the key id it was made with."""
        signature = headers.get("signature")
        key_id = headers.get("signature_key_id")
        if signature is None and key_id is None:
            if self.trusted_keys:
                self.fail(what, "unsigned, and this consumer trusts signing keys")
            return None
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = self.trusted_keys.get(key_id)
        if key is None:
            self.fail(what, f"signed with key {key_id!r}, which this consumer does not trust")
            return None

        def field(data):
            data = data if isinstance(data, bytes) else str(data).encode()
            return len(data).to_bytes(4, "big") + data

        signed = (field(b"shop.event-signature.v1") + field(key_id) + field(properties.get("message_id"))
                  + field(type_name) + field(headers.get("aggregate_type")) + field(headers.get("aggregate_id"))
                  + int(headers.get("aggregate_version")).to_bytes(8, "big", signed=True)
                  + field(properties.get("app_id")) + field(body))
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(base64.b64decode(signature), signed)
        except (InvalidSignature, ValueError) as error:
            self.fail(what, f"signature does not verify with key {key_id!r} ({str(error) or 'invalid signature'})")
            return None
        return key_id


def check_envelopes(bundle: Bundle, checker: Checker):
    """Every golden envelope, offline."""
    envelopes = sorted((bundle.folder / "envelopes").glob("*.json"))
    if len(envelopes) != len(bundle.messages):
        checker.fail("envelopes", f"{len(envelopes)} envelopes for {len(bundle.messages)} event types")
    for path in envelopes:
        envelope = json.loads(path.read_text())
        what = f"envelope {path.name}"
        raw = base64.b64decode(envelope["header_table"])
        letters = table_letters(raw)
        listed = {name: h["type"] for name, h in envelope["headers"].items()}
        if letters != listed:
            checker.fail(what, f"header_table letters {letters} differ from the listed types {listed}")
        by_pika, _ = _pika_decode_table(raw, 0)
        (by_py_amqp,), _ = amqp.serialization.loads("F", raw, 0)
        values = {name: (h["value"] if h["type"] != "A" else [item["value"] for item in h["value"]])
                  for name, h in envelope["headers"].items()}
        for client, decoded in (("pika", by_pika), ("py-amqp", by_py_amqp)):
            if decoded != values:
                checker.fail(what, f"{client} decodes the header table to {decoded}, the envelope lists {values}")
        body = base64.b64decode(envelope["body"])
        decoded = bundle.message_class(envelope["type"]).FromString(body)
        as_json = json_format.MessageToDict(decoded)
        if as_json != envelope["body_json"]:
            checker.fail(what, f"body decodes to {as_json}, the envelope's canonical JSON is {envelope['body_json']}")
        # An envelope is signed by a fixture key it names (none before signing existed).
        trusted, signing = checker.trusted_keys, envelope.get("signing_key")
        if signing:
            checker.trusted_keys = {signing["key_id"]: base64.b64decode(signing["public_key"])}
        summary = checker.check_event(what, envelope["type"], envelope["properties"], by_pika, letters, body,
                                      routing_key=envelope["routing_key"], sequence=False)
        checker.trusted_keys = trusted
        if summary:
            print(f"envelope ok: {summary} (pika and py-amqp read its header table)", flush=True)


def consume(bundle: Bundle, checker: Checker, args):
    exchanges = dict(item.split("=", 1) for item in args.exchange)
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    for facts in bundle.messages.values():
        actual = exchanges.get(facts["exchange"])
        if actual is None:
            continue
        channel.queue_bind(queue=queue, exchange=actual, routing_key=facts["routing_key"])
    channel.basic_qos(prefetch_count=1)
    print(f"ready: queue {queue} bound to {sorted(exchanges.values())}", flush=True)

    deadline = time.monotonic() + args.timeout
    checked = 0
    for method, props, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            if time.monotonic() > deadline:
                checker.fail("consumer", f"only {checked} of {args.count} events arrived within {args.timeout} s")
                break
            continue
        headers = props.headers or {}
        letters = _LETTERS.pop(id(props.headers), {})
        properties = {
            "content_type": props.content_type, "type": props.type, "message_id": props.message_id,
            "app_id": props.app_id, "timestamp": props.timestamp, "delivery_mode": props.delivery_mode,
            "user_id": props.user_id,
        }
        what = f"delivery {method.delivery_tag} ({props.type})"
        summary = checker.check_event(what, props.type, properties, headers, letters, body,
                                      routing_key=method.routing_key)
        channel.basic_ack(method.delivery_tag)
        checked += 1
        if summary:
            print(f"checked: {summary}", flush=True)
        if checked >= args.count:
            break
    channel.cancel()
    connection.close()
    for type_name in filter(None, args.expect_types.split(",")):
        if not checker.seen_types.get(type_name):
            checker.fail("consumer", f"no {type_name} event arrived")


def trusted_keys(path):
    keys = {}
    if path:
        for line in pathlib.Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                key_id, key = line.split()
                key = key.replace("+", "-").replace("/", "_")  # standard or URL-safe alphabet
                keys[key_id] = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    return keys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, type=pathlib.Path)
    parser.add_argument("--amqp-url")
    parser.add_argument("--exchange", action="append", default=[],
                        help="DEFAULT=ACTUAL: consume the exchange the contract names DEFAULT under the name ACTUAL")
    parser.add_argument("--count", type=int, default=0, help="events to check before stopping")
    parser.add_argument("--expect-types", default="", help="comma-separated types that must arrive")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--trusted-keys", help="the producer's public keys: `<key id> <base64 key>` a line")
    args = parser.parse_args()

    bundle = Bundle(args.bundle)
    checker = Checker(bundle, trusted_keys(args.trusted_keys))
    print(f"bundle: {len(bundle.messages)} event types, {bundle.partitions} partitions; "
          f"pika {pika.__version__}, py-amqp {amqp.__version__}", flush=True)
    check_envelopes(bundle, checker)
    checker.seen_types = {}
    if args.amqp_url:
        consume(bundle, checker, args)
    for violation in checker.violations:
        print(f"VIOLATION {violation}", flush=True)
    counts = ", ".join(f"{t} {n}" for t, n in sorted(checker.seen_types.items()))
    print(f"{'FAILED' if checker.violations else 'ok'}: {len(checker.violations)} violations; checked {counts}",
          flush=True)
    sys.exit(1 if checker.violations else 0)


if __name__ == "__main__":
    main()
