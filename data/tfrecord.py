"""TFRecord files and `tf.train.Example` protos, without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

(little-endian; masked_crc = rotr15(crc32c) + 0xA282EAD8). RLDS datasets written by
tensorflow-datasets store one episode per record, serialised as a `tf.train.Example` whose keys are
the flattened feature paths (`steps/observation/image_0`, `episode_metadata/file_path`, ...).

The Example message is declared here from its public .proto definition and parsed by protobuf's C
implementation; nothing from TensorFlow is imported.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from configs.errors import UserError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class CorruptShardError(UserError):
    """A shard that is truncated or fails its checksums."""


def _crc32c(data: bytes | memoryview) -> int:
    import google_crc32c

    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def masked_crc32c(data: bytes | memoryview) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord(path: str | Path, verify: bool = True) -> Iterator[memoryview]:
    """Yield the payload of every record of a TFRecord file.

    Raises `CorruptShardError` naming the file and byte offset on truncation or a checksum mismatch.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos, end = 0, len(data)
    while pos < end:
        if pos + _HEADER.size > end:
            raise CorruptShardError(_corrupt(path, pos, "truncated record header"))
        length, length_crc = _HEADER.unpack_from(data, pos)
        if verify and masked_crc32c(data[pos : pos + 8]) != length_crc:
            raise CorruptShardError(_corrupt(path, pos, "length checksum mismatch"))
        start = pos + _HEADER.size
        stop = start + length
        if stop + _FOOTER.size > end:
            raise CorruptShardError(_corrupt(path, pos, f"truncated record ({length} bytes announced)"))
        payload = data[start:stop]
        if verify and masked_crc32c(payload) != _FOOTER.unpack_from(data, stop)[0]:
            raise CorruptShardError(_corrupt(path, pos, "data checksum mismatch"))
        yield payload
        pos = stop + _FOOTER.size


def _corrupt(path: Path, offset: int, what: str) -> str:
    return (
        f"Corrupt shard {path} ({what} at byte {offset}). Re-download this file, or pass "
        f"data.skip_corrupt=true to skip the rest of the shard and count it."
    )


def write_tfrecord(path: str | Path, records: list[bytes]) -> None:
    """Write records with TFRecord framing (used by tests and tools; the RLDS writer uses TFDS)."""
    with open(path, "wb") as f:
        for rec in records:
            header = struct.pack("<Q", len(rec))
            f.write(header + struct.pack("<I", masked_crc32c(header)))
            f.write(rec + struct.pack("<I", masked_crc32c(rec)))


def _example_classes() -> type:
    """Build the `tf.train.Example` message class from its .proto definition (feature.proto)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fd = descriptor_pb2.FieldDescriptorProto
    pkg = "robosteer.tfexample"
    file = descriptor_pb2.FileDescriptorProto(name="robosteer/tf_example.proto", package=pkg)
    file.syntax = "proto3"
    for name, kind in (("BytesList", fd.TYPE_BYTES), ("FloatList", fd.TYPE_FLOAT), ("Int64List", fd.TYPE_INT64)):
        value = file.message_type.add(name=name).field.add(name="value", number=1, label=fd.LABEL_REPEATED, type=kind)
        if kind != fd.TYPE_BYTES:
            value.options.packed = True
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), start=1
    ):
        feature.field.add(
            name=name, number=number, label=fd.LABEL_OPTIONAL, type=fd.TYPE_MESSAGE,
            type_name=f".{pkg}.{type_name}", oneof_index=0,
        )  # fmt: skip
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=fd.LABEL_OPTIONAL, type=fd.TYPE_STRING)
    entry.field.add(name="value", number=2, label=fd.LABEL_OPTIONAL, type=fd.TYPE_MESSAGE, type_name=f".{pkg}.Feature")
    features.field.add(
        name="feature", number=1, label=fd.LABEL_REPEATED, type=fd.TYPE_MESSAGE,
        type_name=f".{pkg}.Features.FeatureEntry",
    )  # fmt: skip
    file.message_type.add(name="Example").field.add(
        name="features", number=1, label=fd.LABEL_OPTIONAL, type=fd.TYPE_MESSAGE, type_name=f".{pkg}.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.Example"))


_EXAMPLE: type | None = None


def parse_example(payload: bytes | memoryview):
    """Parse a serialised `tf.train.Example`; `.features.feature[key]` holds one of the lists."""
    global _EXAMPLE
    if _EXAMPLE is None:
        _EXAMPLE = _example_classes()
    return _EXAMPLE.FromString(bytes(payload))


def example_message_class() -> type:
    """The generated `Example` class (for building examples in tests and tools)."""
    parse_example(b"")
    assert _EXAMPLE is not None
    return _EXAMPLE
