"""The JPEG marker reader against Pillow, which decodes whatever it hands over."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from loupe.dev.catalog import load_catalog
from loupe.encoders.jpeg_markers import read_jpeg_info


def _pillow(data: bytes) -> tuple[int, int, str, int | None]:
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
        return (*image.size, image.mode, image.getexif().get(0x0112))


def _info(data: bytes) -> tuple[int, int, str, int | None]:
    info = read_jpeg_info(data)
    assert info is not None
    mode = {1: "L", 3: "RGB", 4: "CMYK"}[info.components]
    return (info.width, info.height, mode, info.orientation)


def _jpeg(mode: str = "RGB", size=(40, 24), *, exif=None, xmp=None, **params) -> bytes:
    out = io.BytesIO()
    if exif is not None:
        params["exif"] = exif
    if xmp is not None:
        params["xmp"] = xmp
    Image.new(mode, size, "white").save(out, "JPEG", **params)
    return out.getvalue()


def _exif(orientation: int, big_endian: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x0110] = "a phone"  # another tag first, so the reader has to walk the IFD
    exif[0x0112] = orientation
    data = exif.tobytes()
    if big_endian:  # Pillow writes little-endian; rebuild the same IFD big-endian by hand
        data = (
            b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01"
            + b"\x01\x12\x00\x03\x00\x00\x00\x01"
            + orientation.to_bytes(2, "big")
            + b"\x00\x00\x00\x00\x00\x00"
        )
    return data


def test_real_catalog_photos_read_as_pillow_reads_them():
    for product in load_catalog()[::10]:
        data = product.image_path.read_bytes()
        assert _info(data) == _pillow(data)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 42])
@pytest.mark.parametrize("big_endian", [False, True])
def test_exif_orientation_as_pillow_reads_it(orientation, big_endian):
    data = _jpeg(exif=_exif(orientation, big_endian))
    assert _info(data) == _pillow(data)
    assert _info(data)[3] == orientation


def test_xmp_orientation_counts_only_without_exif():
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    only_xmp = _jpeg(xmp=xmp)
    assert _info(only_xmp) == _pillow(only_xmp)
    assert _info(only_xmp)[3] == 6
    both = _jpeg(exif=_exif(3), xmp=xmp)
    assert _info(both) == _pillow(both)
    assert _info(both)[3] == 3


@pytest.mark.parametrize(
    "data",
    [
        _jpeg("L"),
        _jpeg("CMYK"),
        _jpeg(progressive=True),
        _jpeg(size=(3000, 17), quality=20),
        _jpeg(subsampling=0),
    ],
    ids=["grey", "cmyk", "progressive", "strip", "444"],
)
def test_modes_and_frames_as_pillow_reads_them(data):
    assert _info(data) == _pillow(data)


def test_unusual_headers_are_left_to_pillow():
    plain = _jpeg()
    assert read_jpeg_info(b"") is None
    assert read_jpeg_info(b"\x89PNG\r\n\x1a\n") is None
    assert read_jpeg_info(plain[:20]) is None  # truncated before the frame header
    assert read_jpeg_info(b"\xff\xd8\xff\xe0\xff\xff") is None  # a length past the end
    assert read_jpeg_info(b"\xff\xd8\x00\x00") is None  # garbage where a marker belongs
    sof = plain.index(b"\xff\xc0")
    twelve_bit = plain[: sof + 4] + b"\x0c" + plain[sof + 5 :]
    assert read_jpeg_info(twelve_bit) is None
    two_frames = plain[:sof] + plain[sof : sof + 19] + plain[sof:]
    assert read_jpeg_info(two_frames) is None
    broken_ifd = _jpeg(exif=b"Exif\x00\x00II*\x00\xff\xff\x00\x00")
    assert read_jpeg_info(broken_ifd) is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_headers_never_crash_and_agree_with_pillow_when_both_read(data):
    """Any byte of the header overwritten, or the file cut anywhere: never an exception, and
    where Pillow also reads the header, the same size, mode and orientation."""
    original = _jpeg(exif=_exif(6), xmp=b'tiff:Orientation="3"')
    header_end = original.index(b"\xff\xda") + 2
    damaged = bytearray(original)
    if data.draw(st.booleans(), label="cut"):
        damaged = damaged[: data.draw(st.integers(0, header_end), label="at")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="bytes")):
            damaged[data.draw(st.integers(0, header_end), label="where")] = data.draw(
                st.integers(0, 255), label="value"
            )
    info = read_jpeg_info(bytes(damaged))
    if info is None:
        return
    try:
        expected = _pillow(bytes(damaged))
    except Exception:
        return  # Pillow refuses it: the batch decode will fail it and Pillow says why
    assert _info(bytes(damaged)) == expected
