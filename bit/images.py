"""The one image decoder: every reader (training, evaluation, probe, `bit.predict`, `bit.preprocess`) turns an
image file into pixels here, so the same file gives the same pixels everywhere.

  pixels = images.decode('photo.jpg')           # uint8 (h, w, 3) RGB, EXIF orientation applied

Formats: JPEG (and MPO, the multi-picture JPEG of many cameras), PNG, BMP, GIF (its first frame) and WebP,
decoded by Pillow. The EXIF orientation of phone and camera photos is applied (a portrait photo is upright).
Every mode becomes 8-bit RGB: grayscale and palette images are expanded, an alpha channel is dropped (not
composited), CMYK is converted, 16-bit images keep their top 8 bits. A file that is not one of these formats,
or does not decode (truncated), raises `ImageDecodeError` naming it; the dataset readers log it by path and
skip it, and count it.

`min_side`: a JPEG much larger than the size it is resized to next is decoded at 1/2, 1/4 or 1/8 scale in
the DCT (much faster), never below `min_side` on its short side. Every reader passes the size it resizes to,
so the same file at the same size gives the same pixels in every reader.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import numpy as np

from bit.errors import DataError

FORMATS = ('JPEG', 'MPO', 'PNG', 'BMP', 'GIF', 'WEBP')
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(DataError):
  """A file that is not an image of a supported format, or that does not decode."""


def _open(source):
  from PIL import Image

  if isinstance(source, (bytes, bytearray, memoryview, np.bytes_)):
    return Image.open(io.BytesIO(bytes(source)))
  return Image.open(os.fspath(source))


def _name(source, name) -> str:
  if name is not None:
    return str(name)
  if isinstance(source, (bytes, bytearray, memoryview, np.bytes_)):
    return 'an encoded image'
  return os.fspath(source)


def _check_format(im, name: str) -> None:
  if im.format not in FORMATS:
    raise ImageDecodeError(f'{name}: format {im.format} is not one of {"/".join(FORMATS)}.')


def _oriented_size(im) -> tuple[int, int]:
  w, h = im.size
  if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn swaps the sides
    w, h = h, w
  return h, w


def probe(source: Any, name: str | None = None) -> tuple[int, int]:
  """(h, w) of an image as `decode` returns it (orientation applied), from its header only."""
  name = _name(source, name)
  with _read_errors(name, 'not a readable image'), _open(source) as im:
    _check_format(im, name)
    return _oriented_size(im)


@contextlib.contextmanager
def _read_errors(name, failure: str):
  """Any failure to read the file as an ImageDecodeError naming it; `failure` says what else went wrong."""
  from PIL import UnidentifiedImageError

  try:
    yield
  except ImageDecodeError:
    raise
  except FileNotFoundError:
    raise ImageDecodeError(f'{name}: no such file.') from None
  except IsADirectoryError:
    raise ImageDecodeError(f'{name}: is a folder, not an image.') from None
  except UnidentifiedImageError:
    raise ImageDecodeError(f'{name}: not an image (or a format Pillow cannot read).') from None
  except Exception as e:  # noqa: BLE001 - truncated, damaged: the file cannot be used
    raise ImageDecodeError(f'{name}: {failure} ({type(e).__name__}: {e}).') from None


def to_rgb(im: Any) -> np.ndarray:
  """A PIL image of any mode as uint8 (h, w, 3) RGB (16-bit: the top 8 bits; alpha dropped)."""
  if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    # 16-bit (and 32-bit integer/float) grayscale: Pillow's convert('RGB') clips these to white.
    x = np.asarray(im, np.float64)
    gray = np.clip(x, 0, 65535).astype(np.uint16) >> 8 if im.mode != 'F' else np.clip(x, 0, 255)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
  if im.mode == 'RGB':
    return np.asarray(im, np.uint8)
  if im.mode in ('P', 'PA'):
    im = im.convert('RGBA')  # the palette's colours (a transparent index keeps its colour, as TensorFlow)
  return np.asarray(im.convert('RGB'), np.uint8)


def decode(source: Any, min_side: int | None = None, *, name: str | None = None) -> np.ndarray:
  """An image file (a path or its bytes) as uint8 (h, w, 3) RGB, EXIF orientation applied.

  `min_side`: the short side the image is resized to next; a JPEG at least twice that large is decoded at a
  reduced scale in the DCT (see the module docstring). Raises ImageDecodeError naming the file (`name`, or the
  path) when it is not a supported image or does not decode.
  """
  from PIL import ImageOps

  name = _name(source, name)
  with _read_errors(name, 'cannot decode the image'), _open(source) as im:
    _check_format(im, name)
    if min_side and im.format in ('JPEG', 'MPO'):
      h, w = _oriented_size(im)
      short = min(h, w)
      scale = max([r for r in (1, 2, 4, 8) if short // r >= min_side] or [1])
      if scale > 1:
        im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))  # PIL picks `scale` for this
    im.load()
    return to_rgb(ImageOps.exif_transpose(im))


def decode_op(tf: Any, raw: Any, min_side: int) -> Any:
  """`decode` as a tf.data op on a scalar string tensor of encoded bytes: uint8 (h, w, 3).

  A file that does not decode raises inside the op, so the pipeline's `ignore_errors` skips it (and
  `bit.data` logs it by path).
  """

  def run(data):
    return decode(data, min_side)

  image = tf.numpy_function(run, [raw], tf.uint8, stateful=False)
  image.set_shape([None, None, 3])
  return image


def to_unit_range(pixels):
  """Pixel values 0..255 as BiT's input range [-1, 1] (x / 127.5 - 1): numpy, JAX and TensorFlow values alike.

  Every reader (training and evaluation pipelines, prediction, the exported models) scales with this.
  """
  return pixels / 127.5 - 1.0
