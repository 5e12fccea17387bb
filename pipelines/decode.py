"""Reading an encoded image, the one place both pipeline backends decide what a bad image is.

* :func:`check_encoded_image` — the header only (cheap enough for every sample): the format is
  one both backends decode (:data:`IMAGE_FORMATS`), the size is under ``data.max_image_pixels``,
  a JPEG has its end marker. The DALI readers run it before the DALI decoder sees the bytes.
* :func:`decode_image` — the header check, then PIL's full decode (the torch backend, the DALI
  backend's search for the file its decoder failed on, ``fastlt data --decode``).

Whatever PIL raises — its DecompressionBombError is no OSError, and a crafted header can raise
anything — comes out as a ValueError naming the cause: a bad image under ``data.on_error``.
"""
from __future__ import annotations

import io
import re

from .spec import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["IMAGE_FORMATS", "check_encoded_image", "decode_image", "describe_error"]


def describe_error(e: BaseException) -> str:
    """'Type: message' of a read/decode failure, without PIL's '<_io.BytesIO object at 0x…>'."""
    return f"{type(e).__name__}: " + re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))


#: The image formats fastlt decodes: those both backends read (PIL and DALI's decoders). PIL
#: knows many more, some of which run programs to decode (EPS runs Ghostscript on the file): a
#: crafted file named like an image must not get there.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")  # JPEG opens MPO (camera) files too


def _pil_open(data: bytes, max_pixels: int):
    """PIL's lazy open of ``data`` (the header only) among :data:`IMAGE_FORMATS`, with PIL's own
    pixel limit no lower than ``max_pixels`` (fastlt checks the size itself, naming
    data.max_image_pixels) and its DecompressionBombWarning silenced."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:  # PIL refuses above 2 x its limit, warns above it
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            try:  # name the format for the message; the header is parsed, nothing is decoded
                with Image.open(io.BytesIO(data)) as other:
                    found = other.format
            except Exception:  # noqa: BLE001 - not an image at all
                raise UnidentifiedImageError("cannot identify image file") from None
            raise UnidentifiedImageError(f"it is in {found} format; fastlt reads {', '.join(IMAGE_FORMATS)} "
                                         "only: convert it") from None


def check_encoded_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Parse the header of an encoded image and return its (height, width).

    Raises ValueError for data that PIL cannot identify, whatever PIL raised (its
    DecompressionBombError is no OSError, and a crafted header can raise anything), for an
    image whose header claims more than ``max_pixels`` pixels (``data.max_image_pixels``:
    refused before a byte of it is decoded), and for a JPEG without its end-of-image marker (a
    truncated file: decoders may otherwise fill the rest grey, or abort deep inside a DALI graph
    where the file name is no longer known). Only the header is parsed, not the pixels: this
    is cheap enough to run on every sample, and both backends run it before decoding.
    """
    if len(data) == 0:
        raise ValueError("the file is empty")
    from PIL import Image

    try:
        with _pil_open(data, max_pixels) as im:
            w, h = im.size
            fmt = im.format
    except Image.DecompressionBombError as e:  # over PIL's own limit, which is above ours
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise ValueError(_too_many_pixels(claimed.group(1) if claimed else "more", max_pixels)) from None
    except Exception as e:  # noqa: BLE001 - every failure to parse a header is a bad image
        raise ValueError(f"not a readable image ({describe_error(e)})") from None
    if fmt == "JPEG" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError("truncated JPEG (no end-of-image marker)")
    if h < 1 or w < 1:
        raise ValueError(f"empty image of size {h}x{w}")
    if h * w > max_pixels:
        raise ValueError(_too_many_pixels(f"{w}x{h} = {w * h}", max_pixels))
    return h, w


def _too_many_pixels(claimed: str, max_pixels: int) -> str:
    return (f"its header claims {claimed} pixels, more than data.max_image_pixels ({max_pixels}), so it is not "
            "decoded (a decompression bomb, or a huge scan: shrink it, or raise data.max_image_pixels if such "
            "images belong in the dataset)")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """``data`` decoded fully to an RGB PIL image, after :func:`check_encoded_image`. Every
    failure, whatever its exception class, is a ValueError naming it (a bad image for the
    ``data.on_error`` policy); a MemoryError too, since it comes from this image's size."""
    check_encoded_image(data, max_pixels)
    try:
        with _pil_open(data, max_pixels) as im:
            img = im.convert("RGB")  # convert forces the full decode: a truncated file fails here
            img.load()
            return img
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise ValueError(f"cannot decode ({describe_error(e)})") from None
