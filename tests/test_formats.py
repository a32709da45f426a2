"""Binary layouts (DESIGN.md section 3, detector_buffer.md): sizes, offsets, codes, pack."""

from __future__ import annotations

import numpy as np
import pytest

from fastcore import formats
from fastcore.detectors import gigafrost
from fastcore.detectors.eiger import HEADER as EIGER_HEADER
from fastcore.detectors.gigafrost import HEADER as GIGAFROST_HEADER
from fastcore.detectors.jungfrau import HEADER as JUNGFRAU_HEADER
from fastcore.formats import (
    IMAGE_METADATA,
    MODULE_FRAME,
    RAW_METADATA,
    SHM_HEADER,
    SHM_HEADER_BYTES,
    code_dtype,
    dtype_code,
    image_message,
    image_records,
    pack,
    parse_image_message,
    unpack,
)


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        (MODULE_FRAME, 64),
        (RAW_METADATA, 40),
        (IMAGE_METADATA, 80),
        (JUNGFRAU_HEADER, 48),
        (EIGER_HEADER, 48),
        (GIGAFROST_HEADER, 32),
    ],
)
def test_struct_sizes(dtype, size):
    assert dtype.itemsize == size


def test_shm_header_fits_its_page():
    assert SHM_HEADER.itemsize <= SHM_HEADER_BYTES


@pytest.mark.parametrize(
    ("dtype", "names"),
    [
        (MODULE_FRAME, ["id", "pulse_id", "frame_index", "daq_rec", "n_recv_packets",
                        "module_id", "pos_y", "pos_x"]),
        (RAW_METADATA, ["id", "pulse_id", "frame_index", "daq_rec", "status"]),
        (IMAGE_METADATA, ["id", "height", "width", "dtype", "encoding", "source_id", "status",
                          "user_1", "user_2", "frame_index"]),
    ],
)
def test_stream_structs_are_packed_little_endian_u64(dtype, names):
    assert list(dtype.names) == names
    for i, name in enumerate(names):
        field_dtype, offset = dtype.fields[name][:2]
        assert field_dtype == np.dtype("<u8"), name
        assert offset == 8 * i, name


# offsets and types as in research/detector_buffer.md
JUNGFRAU_LAYOUT = [
    ("framenum", 0, "<u8"),
    ("exptime", 8, "<u4"),
    ("packetnum", 12, "<u4"),
    ("bunchid", 16, "<f8"),
    ("timestamp", 24, "<u8"),
    ("module_id", 32, "<u2"),
    ("x", 34, "<u2"),
    ("y", 36, "<u2"),
    ("z", 38, "<u2"),
    ("debug", 40, "<u4"),
    ("round_robin", 44, "<u2"),
    ("detector_type", 46, "u1"),
    ("header_version", 47, "u1"),
]

EIGER_LAYOUT = [
    ("framenum", 0, "<u8"),
    ("exp_length", 8, "<u4"),
    ("packetnum", 12, "<u4"),
    ("det_spec1", 16, "<u8"),
    ("timestamp", 24, "<u8"),
    ("module_id", 32, "<u2"),
    ("row", 34, "<u2"),
    ("column", 36, "<u2"),
    ("det_spec2", 38, "<u2"),
    ("det_spec3", 40, "<u4"),
    ("round_robin", 44, "<u2"),
    ("detector_type", 46, "u1"),
    ("header_version", 47, "u1"),
]

GIGAFROST_LAYOUT = [
    ("protocol_id", 0, "u1"),
    ("quadrant_row_length_in_blocks", 1, "u1"),
    ("quadrant_rows", 2, "u1"),
    ("status_flags", 3, "u1"),
    ("scan_id", 4, "<u4"),
    ("frame_index", 8, "<u4"),
    ("image_status_flags", 12, "<u2"),
    ("packet_starting_row", 14, "<u2"),
    ("image_timing", 16, "<u8"),
    ("sync_time", 24, "<u4"),
    ("scan_time", 28, "<u4"),
]


@pytest.mark.parametrize(
    ("dtype", "layout"),
    [(JUNGFRAU_HEADER, JUNGFRAU_LAYOUT), (EIGER_HEADER, EIGER_LAYOUT),
     (GIGAFROST_HEADER, GIGAFROST_LAYOUT)],
    ids=["jungfrau", "eiger", "gigafrost"],
)
def test_packet_header_offsets(dtype, layout):
    assert list(dtype.names) == [name for name, _, _ in layout]
    for name, offset, type_ in layout:
        field_dtype, field_offset = dtype.fields[name][:2]
        assert field_offset == offset, name
        assert field_dtype == np.dtype(type_), name


def test_jungfrau_header_bytes_on_the_wire():
    """Fields land at the documented byte offsets, little-endian."""
    raw = pack(JUNGFRAU_HEADER, framenum=0x0102030405060708, packetnum=0x7F, bunchid=2.5,
               module_id=0xBEEF, debug=0xCAFEBABE, header_version=2)
    assert len(raw) == 48
    assert raw[0:8] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert raw[12:16] == b"\x7f\x00\x00\x00"
    assert np.frombuffer(raw[16:24], "<f8")[0] == 2.5
    assert raw[32:34] == b"\xef\xbe"
    assert raw[40:44] == b"\xbe\xba\xfe\xca"
    assert raw[47] == 2
    # every other byte is zero
    touched = set(range(0, 8)) | {12} | set(range(16, 24)) | {32, 33} | set(range(40, 44)) | {47}
    assert all(raw[i] == 0 for i in range(48) if i not in touched)


def test_gigafrost_header_bytes_on_the_wire():
    raw = pack(GIGAFROST_HEADER, protocol_id=gigafrost.PROTOCOL_ID,
               status_flags=0b1110_0000, frame_index=0x11223344, packet_starting_row=0x0506)
    assert raw[0] == 0xCB
    assert raw[3] == 0xE0
    assert raw[8:12] == b"\x44\x33\x22\x11"
    assert raw[14:16] == b"\x06\x05"


@pytest.mark.parametrize(
    "name",
    ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16",
     "float32", "float64"],
)
def test_dtype_code_round_trip(name):
    code = dtype_code(name)
    assert isinstance(code, int)
    assert code_dtype(code) == np.dtype(name)
    assert dtype_code(np.dtype(name)) == code
    assert dtype_code(np.dtype(name).type) == code


def test_dtype_codes_are_distinct_and_std_daq_numbered():
    names = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
             "float16", "float32", "float64"]
    codes = [dtype_code(n) for n in names]
    assert len(set(codes)) == len(codes)
    assert dtype_code("uint16") == 2
    assert dtype_code("float32") == 24


@pytest.mark.parametrize("dtype", ["complex64", "bool", "U4", [("a", "<u2")]])
def test_dtype_code_unknown_dtype(dtype):
    with pytest.raises(ValueError, match="no ImageMetadata code") as info:
        dtype_code(dtype)
    assert "uint16" in str(info.value)  # lists what is supported


@pytest.mark.parametrize("code", [0, 3, 99, -1])
def test_code_dtype_unknown_code(code):
    with pytest.raises(ValueError, match=f"unknown ImageMetadata dtype code {code}"):
        code_dtype(code)


@pytest.mark.parametrize("dtype", [MODULE_FRAME, RAW_METADATA, IMAGE_METADATA])
def test_pack_unpack_round_trip(dtype):
    values = {name: (i + 1) * 0x0101010101 + 2**63 for i, name in enumerate(dtype.names)}
    raw = pack(dtype, **values)
    assert len(raw) == dtype.itemsize
    record = unpack(dtype, raw)
    for name, value in values.items():
        assert int(record[name]) == value, name
    assert unpack(dtype, memoryview(raw)).tobytes() == raw


def test_pack_leaves_unnamed_fields_zero():
    record = unpack(RAW_METADATA, pack(RAW_METADATA, id=7))
    assert int(record["id"]) == 7
    assert all(int(record[n]) == 0 for n in RAW_METADATA.names[1:])


def test_pack_unknown_field_fails():
    with pytest.raises((ValueError, KeyError)):
        pack(RAW_METADATA, nonsense=1)


@pytest.mark.parametrize("size", [0, 39, 41, 64])
def test_unpack_size_mismatch(size):
    with pytest.raises(ValueError, match=f"expected a 40-byte message, got {size} bytes"):
        unpack(RAW_METADATA, bytes(size))


def test_image_status_flags_are_distinct_bits():
    flags = [formats.ImageStatus.MISSING_PACKETS, formats.ImageStatus.MISSING_MODULES,
             formats.ImageStatus.ID_MISMATCH]
    assert formats.ImageStatus.GOOD == 0
    for flag in flags:
        assert bin(int(flag)).count("1") == 1
    assert len({int(f) for f in flags}) == len(flags)
    assert formats.Encoding.RAW == 0 and formats.Encoding.BITSHUFFLE_LZ4 == 1


def test_pack_image_metadata_dtype_field():
    """ImageMetadata has a field called ``dtype``: pack must accept it as a keyword."""
    raw = pack(IMAGE_METADATA, id=3, dtype=dtype_code("uint16"), height=4, width=5)
    record = unpack(IMAGE_METADATA, raw)
    assert code_dtype(int(record["dtype"])) == np.dtype("uint16")
    assert (int(record["id"]), int(record["height"]), int(record["width"])) == (3, 4, 5)


def test_image_stream_messages_hold_one_or_more_records():
    records = np.zeros(3, IMAGE_METADATA)
    records["id"] = [7, 8, 9]
    assert list(image_records(records[:1].tobytes())["id"]) == [7]
    assert list(image_records(records.tobytes())["id"]) == [7, 8, 9]
    for bad in (b"", records.tobytes()[:100]):
        with pytest.raises(ValueError, match=f"whole 80-byte ImageMetadata records, got "
                           f"{len(bad)} bytes"):
            image_records(bad)


def test_replicated_image_message_reads_back_and_refuses_other_shapes():
    meta = np.zeros((), IMAGE_METADATA)
    meta["id"], meta["frame_index"], meta["height"], meta["width"] = 5, 99, 2, 3
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    frames = [bytes(memoryview(f)) for f in image_message(meta, image)]
    got, data = parse_image_message(frames)
    assert got.tobytes() == meta.tobytes() and int(got["frame_index"]) == 99
    np.testing.assert_array_equal(np.frombuffer(data, np.uint16).reshape(2, 3), image)
    for bad in ([frames[0]], [frames[0][:-8], frames[1]], [*frames, b""]):
        with pytest.raises(ValueError, match=r"expected \[ImageMetadata, image\], got "
                           f"{len(bad)} frame"):
            parse_image_message(bad)
