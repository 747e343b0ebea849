"""TFRecord framing, checksums and the tf.Example parser (no TensorFlow)."""

from __future__ import annotations

import struct

import pytest

from data.tfrecord import (
    CorruptShardError,
    example_message_class,
    iter_tfrecord,
    masked_crc32c,
    parse_example,
    write_tfrecord,
)


def test_masked_crc_reference_values() -> None:
    # CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720); TFRecord masks it as
    # ((crc >> 15) | (crc << 17)) + 0xA282EAD8 mod 2**32.
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == expected
    # Values TensorFlow wrote for an empty record: length CRC and data CRC.
    assert masked_crc32c(struct.pack("<Q", 0)) == 0x07980329
    assert masked_crc32c(b"") == 0xA282EAD8


# Bytes of a file written by tf.io.TFRecordWriter with the records b"" and b"123456789".
TF_WRITTEN = bytes.fromhex("000000000000000029039807d8ea82a2090000000000000037f97139313233343536373839e5b08ac7")


def test_reads_and_writes_tensorflows_bytes(tmp_path) -> None:
    (tmp_path / "tf.tfrecord").write_bytes(TF_WRITTEN)
    assert [bytes(r) for r in iter_tfrecord(tmp_path / "tf.tfrecord")] == [b"", b"123456789"]
    write_tfrecord(tmp_path / "ours.tfrecord", [b"", b"123456789"])
    assert (tmp_path / "ours.tfrecord").read_bytes() == TF_WRITTEN


def test_framing_round_trip(tmp_path) -> None:
    records = [b"", b"a", bytes(range(256)) * 100]
    write_tfrecord(tmp_path / "x.tfrecord", records)
    assert [bytes(r) for r in iter_tfrecord(tmp_path / "x.tfrecord")] == records


def test_truncated_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "train.tfrecord-00000-of-00001"
    write_tfrecord(path, [b"hello world" * 10, b"second"])
    path.write_bytes(path.read_bytes()[:-5])
    records = iter_tfrecord(path)
    assert bytes(next(records)) == b"hello world" * 10
    with pytest.raises(CorruptShardError, match=r"train.tfrecord-00000-of-00001.*truncated"):
        next(records)


def test_flipped_byte_fails_checksum(tmp_path) -> None:
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, [b"payload" * 20])
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="data checksum mismatch"):
        list(iter_tfrecord(path))
    assert len(list(iter_tfrecord(path, verify=False))) == 1


def test_example_parser_matches_tfds_proto() -> None:
    from tensorflow_datasets.proto import tf_example_pb2

    ours = example_message_class()()
    ours.features.feature["steps/action"].float_list.value.extend([0.5, -1.25])
    # one key: map-field order cannot differ, so the bytes must be identical
    assert tf_example_pb2.Example.FromString(ours.SerializeToString()).SerializeToString() == ours.SerializeToString()
    ours.features.feature["steps/is_first"].int64_list.value.extend([1, 0])
    ours.features.feature["episode_metadata/file_path"].bytes_list.value.append(b"/a/b")
    theirs = tf_example_pb2.Example.FromString(ours.SerializeToString())
    assert list(theirs.features.feature["steps/action"].float_list.value) == [0.5, -1.25]
    assert list(theirs.features.feature["episode_metadata/file_path"].bytes_list.value) == [b"/a/b"]
    back = parse_example(theirs.SerializeToString())
    assert list(back.features.feature["steps/is_first"].int64_list.value) == [1, 0]
    assert back.features.feature["steps/action"].WhichOneof("kind") == "float_list"
