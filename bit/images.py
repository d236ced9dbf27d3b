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

The tf.data pipelines (`decode_op`) decode the common files (8-bit JPEG and PNG, RGB or gray) with
TensorFlow's own kernels, set to give these very pixels (libjpeg's accurate integer IDCT, as Pillow; the same
reduced scale; the EXIF orientation read from the header), and the rest with `decode`; tests/test_images.py
checks that both give identical pixels on every kind of file (docs/input-pipeline.md).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, NamedTuple

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


class Header(NamedTuple):
  """What an image file's header says: its (h, w) as `decode` returns it (orientation applied), and how
  `decode_op` decodes it (`how`: _PILLOW, _NATIVE_JPEG or _NATIVE_PNG; `orientation`: the EXIF orientation
  1-8 it applies, 1 when Pillow decodes)."""

  height: int
  width: int
  how: int
  orientation: int


def read_header(source: Any, name: str | None = None) -> Header:
  """The `Header` of an image file (a path or its bytes), from its header only (no pixels are decoded). Raises
  ImageDecodeError naming the file when it is not a supported image."""
  name = _name(source, name)
  with _read_errors(name, 'not a readable image'), _open(source) as im:
    _check_format(im, name)
    return Header(*_oriented_size(im), *_how(im, _first_bytes(source, 33)))


def probe(source: Any, name: str | None = None) -> tuple[int, int]:
  """(h, w) of an image as `decode` returns it (orientation applied), from its header only."""
  header = read_header(source, name)
  return header.height, header.width


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
      scale = _jpeg_scale(_oriented_size(im), min_side)
      if scale > 1:
        im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))  # PIL picks `scale` for this
    im.load()
    return to_rgb(ImageOps.exif_transpose(im))


# How `decode_op` decodes a file (the first value of `_plan`): natively in TensorFlow for the common formats, in
# Pillow (`decode`) for everything else.
_PILLOW, _NATIVE_JPEG, _NATIVE_PNG = 0, 1, 2
_SCALES = (1, 2, 4, 8)


def _jpeg_scale(size: tuple[int, int], min_side: int | None) -> int:
  """The DCT scale (1, 2, 4 or 8) of a JPEG whose oriented (h, w) is `size`: the largest that keeps `min_side`."""
  if not min_side:
    return 1
  return max([r for r in _SCALES if min(size) // r >= min_side] or [1])


def encoded_bytes(data: Any) -> bytes:
  """The bytes a tf.numpy_function passes: np.bytes_ in a graph (tf.data), a 0-d object array eagerly."""
  return data.item() if isinstance(data, np.ndarray) else bytes(data)


def _png_is_8bit(data: bytes) -> bool:
  """True for an 8-bit gray, gray+alpha, RGB or RGBA PNG (IHDR bit depth 8, colour type 0, 2, 4 or 6)."""
  return len(data) > 26 and data[24] == 8 and data[25] in (0, 2, 4, 6)


def _first_bytes(source: Any, n: int) -> bytes:
  if isinstance(source, (bytes, bytearray, memoryview, np.bytes_)):
    return bytes(source[:n])
  with open(os.fspath(source), 'rb') as f:
    return f.read(n)


def _how(im, head: bytes) -> tuple[int, int]:
  """(how, orientation) of an opened image whose file starts with `head` (see `Header`)."""
  orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
  orientation = orientation if orientation in range(1, 9) else 1  # as exif_transpose: others do nothing
  if im.format in ('JPEG', 'MPO') and im.mode in ('RGB', 'L'):  # MPO: its first picture, a JPEG
    return _NATIVE_JPEG, orientation
  if im.format == 'PNG' and im.mode in ('RGB', 'RGBA', 'L', 'LA') and _png_is_8bit(head):
    return _NATIVE_PNG, orientation
  return _PILLOW, 1


def decode_plans(sizes: Any, headers: Any, min_side: int | None) -> np.ndarray:
  """int32 (N, 3) [how, orientation, scale index in _SCALES]: `decode_op`'s plan of N images whose (h, w) are
  `sizes` (N, 2) and whose (how, orientation) are `headers` (N, 2), both from `read_header`, for `min_side`."""
  sizes, headers = np.asarray(sizes, np.int64).reshape(-1, 2), np.asarray(headers, np.int32).reshape(-1, 2)
  short = sizes.min(axis=1)
  scale = sum((short // r >= min_side).astype(np.int32) for r in _SCALES[1:]) if min_side else 0
  scale = np.where(headers[:, 0] == _NATIVE_JPEG, scale, 0)
  return np.column_stack([headers, scale]).astype(np.int32)


def _plan(data, min_side: int | None) -> np.ndarray:
  """int32 [how, orientation, scale index in _SCALES] for `decode_op`, from the header only (Pillow reads no pixels here).

  `how`: _NATIVE_JPEG for a baseline or progressive JPEG of 8-bit gray or YCbCr/RGB, _NATIVE_PNG for an 8-bit
  gray/RGB(A) PNG, _PILLOW for the rest (CMYK, palette, 16-bit, WebP, BMP, GIF). `orientation` is the EXIF
  orientation `decode` applies, `scale` its reduced-scale JPEG decode. Raises ImageDecodeError as `decode`.
  """
  header = read_header(encoded_bytes(data), 'an encoded image')
  return decode_plans([header[:2]], [header[2:]], min_side)[0]


def _oriented(tf, image, orientation):
  """`ImageOps.exif_transpose` in TensorFlow: the stored pixels turned upright by EXIF `orientation` (1-8)."""
  transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  turns = [
    lambda: image,  # 1 upright
    lambda: tf.reverse(image, [1]),  # 2 mirrored left-right
    lambda: tf.image.rot90(image, 2),  # 3 upside down
    lambda: tf.reverse(image, [0]),  # 4 mirrored top-bottom
    lambda: transpose(image),  # 5 transposed
    lambda: tf.image.rot90(image, 3),  # 6 the camera turned clockwise
    lambda: tf.image.rot90(transpose(image), 2),  # 7 transversed
    lambda: tf.image.rot90(image, 1),  # 8 the camera turned counter-clockwise
  ]
  return tf.switch_case(orientation - 1, turns)


# The most entries of an EXIF's first IFD read in TensorFlow ops (cameras write 10-30); with more, Pillow decides.
_IFD_ENTRIES = 64


def _jpeg_plan(tf, raw, min_side: int):
  """`_plan` of a JPEG in TensorFlow ops, without Python: its APP1 segments found for the EXIF orientation.

  Native when the JPEG has 1 or 3 components and its orientation is plain to read: no APP1 segment, or one
  Exif segment whose first IFD holds the orientation as one SHORT (either byte order). Anything else (CMYK, an
  XMP segment, which Pillow also reads the orientation from, several APP1 segments, an odd EXIF) goes to
  Pillow, which decides as `decode` does.

  An APP1 segment starts with the bytes FF E1. A file without that pair has no APP1 (most JPEGs of datasets);
  a file with one pair, at the first or second segment (after an APP0, as JFIF writes), has that one APP1
  (most camera photos); otherwise the marker segments are walked up to the scan, as Pillow reads them.
  """
  b = tf.io.decode_raw(raw, tf.uint8)
  n = tf.size(b)
  pairs = (b[:-1] == 0xFF) & (b[1:] == 0xE1)

  def at(i):  # the bytes at positions i as int32, positions clipped into the file
    return tf.cast(tf.gather(b, tf.clip_by_value(i, 0, n - 1)), tf.int32)

  def app1():  # (orientation, plain to read) of a file with an FF E1 pair
    t, app1s, at_scan = _app1_segments(tf, at, n, pairs)
    orientation, tiff_ok = _exif_orientation(tf, at, n, t)
    return orientation, tf.where(t < 0, app1s == 0, (app1s == 1) & tiff_ok) & at_scan

  orientation, readable = tf.cond(tf.reduce_any(pairs), app1, lambda: (tf.constant(1), tf.constant(True)))
  h, w, channels = tf.unstack(tf.io.extract_jpeg_shape(raw, output_type=tf.int32))
  native = readable & ((channels == 1) | (channels == 3))
  plan = tf.stack([_NATIVE_JPEG, orientation, _jpeg_scale_op(tf, h, w, min_side)])
  return tf.where(native, plan, tf.constant([_PILLOW, 1, 0]))


def _jpeg_scale_op(tf, h, w, min_side: int):
  """`_jpeg_scale`'s index in _SCALES in TensorFlow ops."""
  scale = tf.reduce_sum(
    tf.cast(tf.minimum(h, w) // tf.constant(_SCALES[1:]) >= max(int(min_side), 1), tf.int32)
  )
  return tf.where(int(min_side) > 0, scale, 0)


def _app1_segments(tf, at, n, pairs):
  """(where the first Exif segment's TIFF header starts, or -1; the APP1 segments before the scan; whether
  the walk ended at the scan) of a JPEG whose FF E1 pairs are `pairs`.

  One pair in the file, at the first segment or right after a first APPn segment: that is its one APP1, at
  a place Pillow reads too (no other pair: no other APP1). Else the segments are walked.
  """
  p = tf.argmax(tf.cast(pairs, tf.int32), output_type=tf.int32)
  first = at(tf.range(2, 6))  # the first segment: FF En, its length
  after_first = 4 + first[2] * 256 + first[3]
  first_is_app = (first[0] == 0xFF) & (first[1] >= 0xE0) & (first[1] <= 0xEF)
  single = (tf.reduce_sum(tf.cast(pairs, tf.int32)) == 1) & ((p == 2) | (first_is_app & (p == after_first)))

  def one():
    is_exif = tf.reduce_all(at(p + 4 + tf.range(6)) == [69, 120, 105, 102, 0, 0])  # Exif\0\0
    return tf.where(is_exif, p + 10, -1), tf.constant(1), tf.constant(True)

  return tf.cond(single, one, lambda: _walk_segments(tf, at, n))


def _walk_segments(tf, at, n):
  """`_app1_segments` by walking every marker segment up to the scan (SOS), where Pillow stops reading."""
  ahead = tf.range(10)

  def walk(pos, head, exif, app1s):  # one marker segment: FF xx LEN LEN ...; head: its first 10 bytes
    app1 = head[1] == 0xE1
    is_exif = app1 & tf.reduce_all(head[4:] == [69, 120, 105, 102, 0, 0])
    exif = tf.where(is_exif & (exif < 0), pos + 10, exif)
    pos = pos + 2 + head[2] * 256 + head[3]
    return pos, at(pos + ahead), exif, app1s + tf.cast(app1, tf.int32)

  def more(pos, head, exif, app1s):
    marker = head[1]
    return (pos + 4 <= n) & (head[0] == 0xFF) & (marker >= 0xC0) & (marker <= 0xFE) & (marker != 0xDA)

  start = tf.constant(2)
  _, head, exif, app1s = tf.while_loop(
    more, walk, (start, at(start + ahead), tf.constant(-1), tf.constant(0))
  )
  # Else fill bytes or a marker out of place: Pillow decides.
  return exif, app1s, (head[0] == 0xFF) & (head[1] == 0xDA)


def _exif_orientation(tf, at, n, t):
  """(orientation, plain to read) of the TIFF header at t: its first IFD's orientation entry, which must be
  one SHORT, read in either byte order, with the whole IFD inside the file."""
  head = at(t + tf.range(8))
  little = (head[0] == 73) & (head[1] == 73)  # 'II'; 'MM' is big-endian
  big = (head[0] == 77) & (head[1] == 77)

  def u16(x0, x1):
    return tf.where(little, x0 + x1 * 256, x0 * 256 + x1)

  def u32(x):
    return tf.where(
      little, u16(x[0], x[1]) + u16(x[2], x[3]) * 65536, u16(x[0], x[1]) * 65536 + u16(x[2], x[3])
    )

  ifd = t + u32(head[4:8])
  block = at(ifd + tf.range(2 + 12 * _IFD_ENTRIES))
  count = u16(block[0], block[1])
  entries = tf.reshape(block[2:], [_IFD_ENTRIES, 12])
  hit = (tf.range(_IFD_ENTRIES) < count) & (u16(entries[:, 0], entries[:, 1]) == _EXIF_ORIENTATION)
  hits = tf.reduce_sum(tf.cast(hit, tf.int32))
  entry = entries[tf.argmax(tf.cast(hit, tf.int32), output_type=tf.int32)]
  orientation = tf.where(hits > 0, u16(entry[8], entry[9]), 1)
  plain = (hits == 0) | ((u16(entry[2], entry[3]) == 3) & (u32(entry[4:8]) == 1))  # a SHORT, count 1
  inside = (ifd > t) & (count <= _IFD_ENTRIES) & (ifd + 2 + 12 * count <= n)
  orientation = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
  return orientation, (little | big) & inside & (hits <= 1) & plain


def _plan_op(tf, raw, min_side: int):
  """`_plan` as a TensorFlow op: in TensorFlow ops for a JPEG (`_jpeg_plan`), with Pillow for the rest."""

  def python_plan():
    plan = tf.numpy_function(lambda data: _plan(data, min_side), [raw], tf.int32, stateful=False)
    return tf.ensure_shape(plan, [3])

  is_jpeg = tf.strings.substr(raw, 0, 3) == b'\xff\xd8\xff'
  return tf.cond(is_jpeg, lambda: _jpeg_plan(tf, raw, min_side), python_plan)


def _planned(tf, raw, plan):
  """A plan known beforehand (`decode_plans`), where the bytes still are of its format; else Pillow's path."""
  how = plan[0]
  fits = (
    (how == _PILLOW)
    | ((how == _NATIVE_JPEG) & (tf.strings.substr(raw, 0, 3) == b'\xff\xd8\xff'))
    | ((how == _NATIVE_PNG) & (tf.strings.substr(raw, 0, 8) == b'\x89PNG\r\n\x1a\n'))
  )
  return tf.where(fits, plan, tf.constant([_PILLOW, 1, 0]))


def decode_op(tf: Any, raw: Any, min_side: int, plan: Any = None) -> Any:
  """`decode` as a tf.data op on a scalar string tensor of encoded bytes: uint8 (h, w, 3), the same pixels.

  The common formats are decoded by TensorFlow's own kernels (no copies, no GIL): 8-bit JPEGs with libjpeg's
  accurate integer IDCT (Pillow's: `dct_method='INTEGER_ACCURATE'`, and `ratio=` for the reduced-scale decode,
  Pillow's `draft`), the EXIF orientation read from the header in TensorFlow ops (`_jpeg_plan`) and applied
  with tf.image; and 8-bit PNGs (their header read by Pillow). The rest goes through `decode` in a
  `tf.numpy_function`. tests/test_images.py checks both paths give identical pixels. A file that does not
  decode raises inside the op, so the pipeline's `ignore_errors` skips it (and `bit.data` logs it by path).

  `plan`: the file's int32 [how, orientation, scale] from `decode_plans` (its header read once, when the split
  was read), so the header is not read again here; the bytes must still be of the planned format, or Pillow
  decodes them.
  """

  def pillow():
    image = tf.numpy_function(
      lambda data: decode(encoded_bytes(data), min_side), [raw], tf.uint8, stateful=False
    )
    return tf.ensure_shape(image, [None, None, 3])

  plan = _plan_op(tf, raw, min_side) if plan is None else _planned(tf, raw, plan)
  how, orientation, scale = tf.unstack(plan)

  def jpeg(ratio):
    return lambda: tf.io.decode_jpeg(raw, channels=3, ratio=ratio, dct_method='INTEGER_ACCURATE')

  def png():
    return tf.io.decode_png(raw, channels=3, dtype=tf.uint8)

  # One switch (functional control flow costs per call): Pillow, JPEG at each scale, PNG.
  branch = tf.where(how == _NATIVE_JPEG, 1 + scale, tf.where(how == _NATIVE_PNG, 1 + len(_SCALES), 0))
  image = tf.switch_case(branch, [pillow, *(jpeg(r) for r in _SCALES), png])
  image = tf.cond(orientation == 1, lambda: image, lambda: _oriented(tf, image, orientation))
  image.set_shape([None, None, 3])
  return image


def to_unit_range(pixels: Any) -> Any:
  """Pixel values 0..255 as BiT's input range [-1, 1] (x / 127.5 - 1): numpy, JAX and TensorFlow values alike.

  Every reader (training and evaluation pipelines, prediction, the exported models) scales with this.
  """
  return pixels / 127.5 - 1.0
