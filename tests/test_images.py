"""The one decoder of every reader (bit.images): EXIF orientation, every mode to 8-bit RGB, WebP, and the
same pixels and the same skip policy in training/eval, probe and predict."""

import io
import logging
import struct

import numpy as np
import pytest
from helpers import fast_params
from PIL import Image

from bit import data, data_sources, evaluation, images, models, prediction
from bit.errors import DataError

# An upright picture whose quadrants tell every rotation and mirror apart.
QUADRANTS = {'tl': (230, 20, 20), 'tr': (20, 230, 20), 'bl': (20, 20, 230), 'br': (230, 230, 20)}


def upright(h=48, w=64) -> np.ndarray:
  x = np.zeros((h, w, 3), np.uint8)
  x[: h // 2, : w // 2], x[: h // 2, w // 2 :] = QUADRANTS['tl'], QUADRANTS['tr']
  x[h // 2 :, : w // 2], x[h // 2 :, w // 2 :] = QUADRANTS['bl'], QUADRANTS['br']
  return x


# EXIF orientation -> how the camera stored the upright picture (the decoder must undo it).
STORED = {
  3: lambda x: np.rot90(x, 2),  # upside down
  6: lambda x: np.rot90(x, 1),  # the camera turned clockwise: stored turned counter-clockwise
  8: lambda x: np.rot90(x, -1),
}


def jpeg_with_orientation(path, orientation):
  stored = np.ascontiguousarray(STORED[orientation](upright()))
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(stored).save(path, 'JPEG', quality=95, exif=exif.tobytes())
  return path


def quadrant_colors(x):
  h, w = x.shape[:2]
  q = {'tl': x[: h // 4, : w // 4], 'tr': x[: h // 4, -w // 4 :], 'bl': x[-h // 4 :, : w // 4]}
  q['br'] = x[-h // 4 :, -w // 4 :]
  return {k: tuple(np.asarray(v, np.float64).reshape(-1, 3).mean(0).round(-1)) for k, v in q.items()}


def expected_colors(scale=lambda c: c):
  return {k: tuple(np.round(np.array(scale(np.array(v, np.float64))), -1)) for k, v in QUADRANTS.items()}


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """A folder ROOT/test/<class>/ with photos carrying EXIF orientations 3, 6, 8 and other modes."""
  root = tmp_path_factory.mktemp('photos')
  d = root / 'test' / 'photo'
  d.mkdir(parents=True)
  for o in STORED:
    jpeg_with_orientation(d / f'orient{o}.jpg', o)
  other = root / 'test' / 'other'
  other.mkdir()
  Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(other / 'gray16.png')  # mode I;16
  Image.fromarray(upright()).convert('P', palette=Image.Palette.ADAPTIVE, colors=8).save(
    other / 'palette.png'
  )
  Image.fromarray(upright()).convert('CMYK').save(other / 'cmyk.jpg', quality=95)
  Image.fromarray(upright()).save(other / 'photo.webp', lossless=True)
  return root


@pytest.mark.parametrize('orientation', [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
  path = jpeg_with_orientation(tmp_path / 'p.jpg', orientation)
  x = images.decode(path)
  assert x.shape == (48, 64, 3)  # upright: quarter turns swap the stored sides back
  assert quadrant_colors(x) == expected_colors()
  assert images.probe(path) == (48, 64)


def test_modes_become_8bit_rgb(photos):
  other = photos / 'test' / 'other'
  gray = images.decode(other / 'gray16.png')
  assert Image.open(other / 'gray16.png').mode.startswith('I')
  assert gray.dtype == np.uint8 and gray.shape == (40, 40, 3) and (gray == 128).all()  # not all white
  for name in ('palette.png', 'cmyk.jpg', 'photo.webp'):
    x = images.decode(other / name)
    assert x.shape == (48, 64, 3) and quadrant_colors(x) == expected_colors(), name
  with pytest.raises(images.ImageDecodeError, match='notes.txt'):
    (other.parent / 'notes.txt').write_text('not an image')
    images.decode(other.parent / 'notes.txt')


def test_every_reader_gives_the_same_pixels(photos):
  """The eval pipeline (train/eval/probe) and bit-predict read a file the same: same decoder, same scale."""
  records = data_sources.load_split(str(photos), 'test')
  assert len(records) == 7  # the WebP file is a dataset image too
  batches = list(data.eval_iterator(str(photos), split='test', global_batch_size=8, crop=32))
  pipeline = np.concatenate([b['image'] for b in batches])[np.concatenate([b['mask'] for b in batches])]
  for path, x in zip(records.payload, pipeline, strict=True):
    np.testing.assert_allclose(prediction.load_image(path, 32), x, atol=2e-5, err_msg=path)
  for i, path in enumerate(records.payload):  # oriented upright in the pipeline too
    if 'orient' in path:
      assert quadrant_colors((pipeline[i] + 1) * 127.5) == expected_colors(), path


def test_a_file_that_does_not_decode_is_skipped_and_counted_by_evaluate(tmp_path, caplog):
  d = tmp_path / 'test' / 'a'
  d.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(upright()).save(d / f'{i}.jpg')
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, 'JPEG')
  (d / 'trunc.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  model = models.create_model('R26x1', num_classes=1)
  with caplog.at_level(logging.WARNING):
    result = evaluation.evaluate(model, fast_params(model), str(tmp_path), crop=32, batch_size=4)
  assert result['count'] == 3 and result['skipped'] == 1  # as training: logged, skipped, counted
  assert 'trunc.jpg' in caplog.text
  assert evaluation.summary(result)['skipped'] == 1
  with pytest.raises(DataError, match='trunc.jpg'):
    prediction.load_image(d / 'trunc.jpg', 32)


# --- the native decode of the tf.data pipelines: the same pixels as `images.decode` -------------------------


def _photo(rng, h, w) -> np.ndarray:
  """A photo-like picture: smooth colour fields with fine noise (compresses and decodes like a photo)."""
  coarse = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8))
  field = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


@pytest.fixture(scope='module')
def corpus():
  """Real-size photos of every kind the readers meet -> (encoded bytes, how `decode_op` should decode them)."""
  rng = np.random.default_rng(0)
  native, pillow = images._NATIVE_JPEG, images._PILLOW
  out = {}
  for o in range(1, 9):
    exif = Image.Exif()
    exif[0x0112] = o
    for name, (h, w) in (('', (375, 500)), ('_big', (1200, 1600))):
      photo = Image.fromarray(_photo(rng, h, w))
      out[f'exif{o}{name}'] = (_encoded(photo, 'JPEG', quality=90, exif=exif.tobytes()), native)
  photo = Image.fromarray(_photo(rng, 375, 500))
  out['progressive'] = (_encoded(Image.fromarray(_photo(rng, 900, 1200)), 'JPEG', progressive=True), native)
  out['4:4:4'] = (_encoded(photo, 'JPEG', quality=95, subsampling=0), native)
  out['gray'] = (_encoded(photo.convert('L'), 'JPEG'), native)
  out['gray_big'] = (_encoded(Image.fromarray(_photo(rng, 1500, 1000)).convert('L'), 'JPEG'), native)
  out['cmyk'] = (_encoded(photo.convert('CMYK'), 'JPEG'), pillow)
  plain = _encoded(Image.fromarray(_photo(rng, 375, 500)), 'JPEG', quality=90)
  for o in (5, 8):  # a big-endian EXIF (as some cameras write), after a comment segment
    ifd = struct.pack('>2sHIH', b'MM', 42, 8, 1) + struct.pack('>HHIHH', 0x0112, 3, 1, o, 0) + b'\0' * 4
    app1 = b'Exif\0\0' + ifd
    segments = (
      b'\xff\xfe' + struct.pack('>H', 7) + b'hello' + b'\xff\xe1' + struct.pack('>H', len(app1) + 2) + app1
    )
    out[f'big_endian_exif{o}'] = (plain[:2] + segments + plain[2:], native)
  jfif = 4 + int.from_bytes(out['exif6'][0][4:6], 'big')  # where the APP1 starts, after the JFIF APP0
  out['exif6_first_segment'] = (out['exif6'][0][:2] + out['exif6'][0][jfif:], native)  # no APP0: at byte 2
  out['no_app1'] = (plain, native)  # no EXIF at all: the header read skips the segment walk
  comment = (
    b'\xff\xfe' + struct.pack('>H', 8) + b'a\xff\xe1b\xff\xe1'
  )  # an FF E1 pair that is no APP1 segment
  out['ffe1_in_comment'] = (plain[:2] + comment + plain[2:], native)
  second = Image.fromarray(_photo(rng, 375, 500))
  out['mpo'] = (_encoded(photo, 'MPO', save_all=True, append_images=[second]), native)  # its first picture
  xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
  out['xmp_orientation'] = (_encoded(photo, 'JPEG', xmp=xmp), pillow)  # Pillow reads it: Pillow decides
  exif = Image.Exif()
  exif[0x0112] = 6
  out['png'] = (_encoded(photo, 'PNG', exif=exif.tobytes()), images._NATIVE_PNG)
  out['png_rgba'] = (_encoded(photo.convert('RGBA'), 'PNG'), images._NATIVE_PNG)
  out['png_gray'] = (_encoded(photo.convert('L'), 'PNG'), images._NATIVE_PNG)
  out['png_16bit'] = (
    _encoded(Image.fromarray(_photo(rng, 375, 500)[..., 0].astype(np.uint16) * 257), 'PNG'),
    pillow,
  )
  out['palette'] = (_encoded(photo.convert('P', palette=Image.Palette.ADAPTIVE), 'PNG'), pillow)
  out['webp'] = (_encoded(photo, 'WEBP'), pillow)
  out['bmp'] = (_encoded(photo, 'BMP'), pillow)
  return out


@pytest.mark.parametrize('min_side', [None, 150, 300, 600])
def test_the_pipelines_native_decode_gives_the_pixels_of_the_one_decoder(corpus, min_side):
  """tf.data decodes common JPEGs/PNGs with TensorFlow's kernels, the rest with Pillow: every kind of file,
  every EXIF orientation and every reduced-scale JPEG decode gives exactly `images.decode`'s pixels."""
  tf = data_sources.tf_hidden()
  names = list(corpus)
  ds = tf.data.Dataset.from_tensor_slices([corpus[n][0] for n in names])
  ds = ds.map(lambda raw: (images.decode_op(tf, raw, min_side or 0), images._plan_op(tf, raw, min_side or 0)))
  decoded = list(ds.as_numpy_iterator())
  plans = {name: plan for name, (_, plan) in zip(names, decoded, strict=True)}
  for name, (got, _) in zip(names, decoded, strict=True):
    raw, how = corpus[name]
    assert plans[name][0] == how, name  # the common kinds really take the native path
    expected = images.decode(raw, min_side)
    assert got.shape == expected.shape and np.array_equal(got, expected), name
    if how != images._PILLOW:  # the header read in TensorFlow ops finds what Pillow finds
      np.testing.assert_array_equal(plans[name], images._plan(raw, min_side), err_msg=name)
  if min_side == 300:  # a big JPEG is decoded at a reduced scale: 1200x1600 at 1/4
    assert plans['exif6_big'][2] == images._SCALES.index(4)


@pytest.mark.parametrize('min_side', [None, 300])
def test_a_plan_read_with_the_split_gives_the_same_pixels(corpus, min_side):
  """Folders read every header once (`read_header`, with the sizes) and the pipelines decode by that plan
  without reading it again: every kind of file gives `images.decode`'s pixels, and a plan whose file changed
  format since (a JPEG's plan on a PNG's bytes) falls back to Pillow instead of failing."""
  tf = data_sources.tf_hidden()
  names = list(corpus)
  headers = [images.read_header(corpus[n][0]) for n in names]
  plans = images.decode_plans([h[:2] for h in headers], [h[2:] for h in headers], min_side or 0)
  for name, header in zip(names, headers, strict=True):
    assert (header.height, header.width) == images.decode(corpus[name][0]).shape[:2], name
    if name.startswith('exif') or name == 'gray':  # what Pillow's header says is what decode does
      assert header.how == images._NATIVE_JPEG, name
  raws = [corpus[n][0] for n in names] + [corpus['png_rgba'][0]]
  stale = np.concatenate([plans, plans[names.index('exif3')][None]])  # a JPEG's plan, a PNG's bytes
  ds = tf.data.Dataset.from_tensor_slices((raws, stale))
  decoded = list(ds.map(lambda raw, plan: images.decode_op(tf, raw, min_side or 0, plan)).as_numpy_iterator())
  for name, raw, got in zip([*names, 'stale'], raws, decoded, strict=True):
    expected = images.decode(raw, min_side)
    assert got.shape == expected.shape and np.array_equal(got, expected), name
