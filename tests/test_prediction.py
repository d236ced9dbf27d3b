"""Predictions for arrays and for image files, with class names; bad files are reported by name."""

import functools
import http.server
import json
import threading

import jax
import numpy as np
import pytest
from helpers import fast_params, run_cli
from PIL import Image

from bit import checkpoints, data, models, prediction
from bit.errors import BitError
from bit.tools import cli

CLASSES = ('cat', 'dog', 'emu')


@pytest.fixture(scope='module')
def tiny():
  model = models.create_model('R26x1', num_classes=len(CLASSES))
  params = fast_params(model, head_std=0.05)
  return model, params


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """ROOT/test/<class>/<i>.png, plus odd files: grayscale, RGBA, a GIF, a text file, a truncated PNG."""
  root = tmp_path_factory.mktemp('pred')
  rng = np.random.default_rng(0)
  for c in CLASSES:
    (root / 'test' / c).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / 'test' / c / f'{i}.png')
  odd = root / 'odd'
  odd.mkdir()
  Image.fromarray(rng.integers(0, 255, (50, 50), np.uint8), 'L').save(odd / 'gray.png')
  Image.fromarray(rng.integers(0, 255, (33, 70, 4), np.uint8), 'RGBA').save(odd / 'rgba.png')
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(odd / 'anim.gif')
  (odd / 'notes.txt').write_text('not an image')
  full = (root / 'test' / 'cat' / '0.png').read_bytes()
  (odd / 'broken.png').write_bytes(full[: len(full) // 2])
  return root


def test_predict_arrays(tiny):
  model, params = tiny
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  probs = prediction.predict(model, params, pixels)
  assert probs.shape == (4, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # uint8 and the equivalent [-1, 1] floats give the same answer; padding 3 images to 4 changes nothing.
  floats = pixels.astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(prediction.predict(model, params, floats[:3]), probs[:3], rtol=1e-4, atol=1e-6)
  expected = jax.nn.softmax(jax.jit(model.apply)({'params': params}, floats))
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
  assert len(np.unique(probs.argmax(-1))) > 1  # the random head separates some images
  top_p, top_i = prediction.predict(model, params, pixels, top=2)
  assert top_p.shape == top_i.shape == (4, 2)
  np.testing.assert_array_equal(top_i[:, 0], probs.argmax(-1))
  assert np.all(top_p[:, 0] >= top_p[:, 1])
  single = prediction.predict(model, params, pixels[0])
  np.testing.assert_allclose(single, probs[0], rtol=1e-4, atol=1e-6)


def test_predict_refuses_out_of_range_floats(tiny):
  model, params = tiny
  with pytest.raises(BitError, match=r'\[-1, 1\]'):
    prediction.predict(model, params, np.full((1, 32, 32, 3), 200.0, np.float32))
  with pytest.raises(BitError, match='NHWC'):
    prediction.predict(model, params, np.zeros((1, 32, 32), np.uint8))


def test_load_image_matches_the_eval_pipeline(folder):
  # The same file through predict's loader and through data.eval_iterator gives the same pixels.
  (batch,) = data.eval_iterator(str(folder), split='test', global_batch_size=6, crop=32)
  files = sorted((folder / 'test').glob('*/*.png'))
  ours = np.stack([prediction.load_image(f, 32) for f in files])
  np.testing.assert_allclose(ours, batch['image'], atol=1e-4)


def test_predict_files_names_and_errors(folder, tiny):
  model, params = tiny
  paths = [
    folder / 'test' / 'dog',
    folder / 'odd' / 'gray.png',
    folder / 'odd' / 'notes.txt',
    folder / 'odd' / 'rgba.png',
    folder / 'odd' / 'anim.gif',
    folder / 'odd' / 'missing.jpg',
    folder / 'odd' / 'broken.png',
  ]
  with pytest.warns(UserWarning) as caught:
    results = prediction.predict_files(model, params, paths, list(CLASSES), top=2, size=32, batch_size=4)
  assert [r['path'].split('/')[-1] for r in results] == [
    '0.png',
    '1.png',
    'gray.png',
    'notes.txt',
    'rgba.png',
    'anim.gif',
    'missing.jpg',
    'broken.png',
  ]
  errors = {r['path'].split('/')[-1]: r['error'] for r in results if 'error' in r}
  assert set(errors) == {'notes.txt', 'missing.jpg', 'broken.png'}
  assert 'not an image' in errors['notes.txt'] and 'no such file' in errors['missing.jpg']
  warned = ' '.join(str(w.message) for w in caught)
  assert 'notes.txt' in warned and 'missing.jpg' in warned and 'broken.png' in warned
  good = [r for r in results if 'error' not in r]
  assert len(good) == 5
  images = np.stack([prediction.load_image(r['path'], 32) for r in good])
  probs = prediction.predict(model, params, images)
  for r, p in zip(good, probs, strict=True):
    assert len(r['predictions']) == 2
    best = r['predictions'][0]
    assert best['label'] == CLASSES[best['index']] == CLASSES[int(p.argmax())]
    assert best['probability'] == pytest.approx(float(p.max()), rel=1e-4)
  text = prediction.format_results(results)
  assert 'notes.txt: error:' in text and '%)' in text


def test_predict_files_checks_the_class_names(tiny, folder):
  model, params = tiny
  with pytest.raises(BitError, match='2 class names'):
    prediction.predict_files(model, params, [folder / 'odd' / 'gray.png'], ['a', 'b'], size=32)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny):
  _, params = tiny
  w = tmp_path_factory.mktemp('work')
  checkpoints.save_npz(params, w / 'model.npz')
  (w / 'labels.txt').write_text(''.join(f'{c}\n' for c in CLASSES))
  (w / 'config.json').write_text(json.dumps({'dataset': 'unused', 'crop': 32, 'model': 'R26x1'}))
  return w


def test_bit_predict_with_a_workdir(workdir, folder, tiny, capsys, monkeypatch):
  files = [folder / 'test' / 'cat' / '0.png', folder / 'odd' / 'notes.txt', folder / 'odd' / 'gray.png']
  code, out, err = run_cli(
    cli.predict_main, ['bit-predict', '--workdir', workdir, '--top', '2', *files], capsys, monkeypatch
  )
  assert code == 1  # one file failed; the others were still predicted
  assert 'Traceback' not in err
  assert [line for line in err.splitlines() if 'error' in line] == [
    f'bit-predict: error: {files[1]}: not an image (or a format Pillow cannot read).'
  ]
  lines = out.strip().splitlines()
  assert [line.split(':')[0] for line in lines] == [str(files[0]), str(files[2])]
  model, params = tiny
  probs = prediction.predict(model, params, np.stack([prediction.load_image(files[0], 32)]))[0]
  best = CLASSES[int(probs.argmax())]
  assert lines[0].split(': ')[1].startswith(f'{best} ({100 * probs.max():.1f}%)')
  assert lines[0].count('%') == 2
  code, out, err = run_cli(
    cli.predict_main, ['bit-predict', f'--workdir={workdir}', '--json', files[0]], capsys, monkeypatch
  )
  assert code == 0, err
  record = json.loads(out)
  assert record['predictions'][0]['label'] == best and len(record['predictions']) == 3


@pytest.fixture
def model_server(tmp_path, workdir, monkeypatch):
  """A local stand-in for the checkpoint bucket holding a tiny registry entry and its labels file."""
  served = tmp_path / 'bucket'
  served.mkdir()
  (served / 'tiny.npz').write_bytes((workdir / 'model.npz').read_bytes())
  (served / 'tiny_labels.txt').write_text('ant\nbee\ncow\n')
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv('BIT_MODELS_URL', f'http://127.0.0.1:{server.server_address[1]}/')
  monkeypatch.setenv('BIT_CACHE', str(tmp_path / 'cache'))
  cfg = checkpoints.PretrainedCfg('BiT-T-R26x1-test', 'tiny.npz', 'R26x1', 3, 'tiny_labels.txt', 32)
  monkeypatch.setitem(checkpoints.REGISTRY, cfg.name, cfg)
  yield cfg.name
  server.shutdown()
  server.server_close()


def test_bit_predict_with_a_registry_model(model_server, folder, capsys, monkeypatch):
  image = folder / 'test' / 'dog' / '1.png'
  code, out, err = run_cli(
    cli.predict_main, ['bit-predict', '--model', model_server, '--top=3', image], capsys, monkeypatch
  )
  assert code == 0, err
  line = out.strip()
  assert line.startswith(f'{image}: ')
  assert sorted(p.split(' (')[0] for p in line.split(': ')[1].split(', ')) == ['ant', 'bee', 'cow']


def test_bit_predict_usage_errors(workdir, capsys, monkeypatch):
  code, _, err = run_cli(cli.predict_main, ['bit-predict', '--workdir', workdir], capsys, monkeypatch)
  assert code != 0 and 'no image files given' in err and 'Traceback' not in err
  code, _, err = run_cli(cli.predict_main, ['bit-predict', 'x.jpg'], capsys, monkeypatch)
  assert code != 0 and 'either --workdir' in err


def test_bit_predict_on_a_folder_without_images_says_so(workdir, tmp_path, capsys, monkeypatch):
  (tmp_path / 'only_subfolders' / 'cats').mkdir(parents=True)
  Image.new('RGB', (32, 32)).save(tmp_path / 'only_subfolders' / 'cats' / '0.png')
  for folder in (tmp_path / 'only_subfolders', tmp_path / 'only_subfolders' / 'cats' / 'missing'):
    folder.mkdir(exist_ok=True)
    code, out, err = run_cli(
      cli.predict_main, ['bit-predict', '--workdir', workdir, folder], capsys, monkeypatch
    )
    assert code == 2 and f'{folder} holds no image files' in err and not out.strip()


# --- bit.predict and bit.preprocess: what a timm or Keras user passes ----------------------------------------


def test_predict_takes_files_folders_pil_images_and_arrays(folder, tiny):
  model, params = tiny
  dogs = folder / 'test' / 'dog'
  files = sorted(dogs.glob('*.png'))
  expected = prediction.predict(model, params, np.stack([prediction.load_image(f, 32) for f in files]))
  np.testing.assert_allclose(prediction.predict(model, params, dogs, size=32), expected, rtol=1e-5)
  np.testing.assert_allclose(prediction.predict(model, params, str(dogs), size=32), expected, rtol=1e-5)
  mixed = [files[0], Image.open(files[1]), np.asarray(Image.open(files[0]))]
  probs = prediction.predict(model, params, mixed, size=32)
  # A batch of 3 compiles another kernel than the folder's batch: float32 rounding, not other pixels (those
  # would move the probabilities by far more than 1e-5).
  np.testing.assert_allclose(probs, expected[[0, 1, 0]], rtol=1e-5, atol=1e-5)
  # One file, one PIL image: one row of probabilities, as for one HWC array.
  one = prediction.predict(model, params, str(files[1]), size=32)
  assert one.shape == (len(CLASSES),)
  np.testing.assert_allclose(one, expected[1], rtol=1e-5)
  p, i = prediction.predict(model, params, Image.open(files[0]), size=32, top=2)
  assert p.shape == i.shape == (2,) and i[0] == expected[0].argmax()


# (height, width): up- and downscaling, odd sizes, non-square both ways, one pixel wide or high, already square.
_SIZES = [(1, 40), (40, 1), (1, 1), (7, 13), (31, 33), (32, 32), (17, 17), (64, 48), (100, 3), (250, 190)]


@pytest.mark.parametrize('crop', [32, 17])
def test_predictions_numpy_resize_is_the_eval_pipelines_on_many_sizes(tmp_path, crop):
  """prediction's numpy bilinear resize (the only copy of tf.image.resize's sampling) gives eval_iterator's
  pixels for images smaller and larger than the crop, of odd and 1-pixel sides."""
  rng = np.random.default_rng(crop)
  files = []
  for i, (h, w) in enumerate(_SIZES):
    d = tmp_path / 'test' / CLASSES[i % 2]
    d.mkdir(parents=True, exist_ok=True)
    files.append(d / f'{i:02d}.png')
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(files[-1])
  (batch,) = data.eval_iterator(str(tmp_path), split='test', global_batch_size=len(files), crop=crop)
  expected = batch['image'][batch['mask']]
  ours = np.stack(
    [prediction.load_image(f, crop) for f in sorted(files, key=lambda f: (f.parent.name, f.name))]
  )
  assert ours.shape == expected.shape == (len(_SIZES), crop, crop, 3)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_preprocess_gives_the_pixels_of_evaluation(folder):
  (batch,) = data.eval_iterator(str(folder), split='test', global_batch_size=6, crop=32)
  files = sorted((folder / 'test').glob('*/*.png'))
  x = prediction.preprocess(files, 32)
  assert x.dtype == np.float32 and x.shape == (6, 32, 32, 3)
  np.testing.assert_allclose(x, batch['image'], atol=1e-4)
  np.testing.assert_allclose(prediction.preprocess([Image.open(f) for f in files], 32), x, atol=1e-6)
  assert prediction.preprocess(files[0], 32).shape == (1, 32, 32, 3)  # a single image: a batch of one
  assert prediction.preprocess(np.zeros((2, 40, 40, 3), np.uint8)).shape == (2, 40, 40, 3)  # arrays keep size
  assert prediction.preprocess(files[0]).shape == (1, 224, 224, 3)  # decoded images default to 224


def test_pil_images_of_every_mode_are_converted(tmp_path):
  rng = np.random.default_rng(3)
  rgb = Image.fromarray(rng.integers(0, 255, (36, 36, 3), np.uint8))
  modes = {
    'CMYK': (rgb.convert('CMYK'), 'cmyk.jpg'),
    'P': (rgb.convert('P'), 'p.png'),
    'RGBA': (rgb.convert('RGBA'), 'rgba.png'),
    'I;16': (Image.fromarray((rng.integers(0, 65535, (36, 36))).astype(np.uint16)), 'i16.png'),
  }
  for mode, (im, name) in modes.items():
    assert im.mode == mode
    im.save(tmp_path / name)
    from_pil = prediction.preprocess(Image.open(tmp_path / name), 32)
    from_file = prediction.preprocess(tmp_path / name, 32)
    np.testing.assert_allclose(from_pil, from_file, atol=1e-6, err_msg=mode)  # the decoder of every reader
    assert from_pil.shape == (1, 32, 32, 3) and -1 <= from_pil.min() and from_pil.max() <= 1
    assert from_pil.std() > 0.1, mode  # real pixels, not a flat white or black image
  i16 = np.asarray(Image.open(tmp_path / 'i16.png'), np.float64)
  x = prediction.preprocess(Image.open(tmp_path / 'i16.png'), 36)[0, ..., 0]
  np.testing.assert_allclose((x + 1) * 127.5, np.floor(i16 / 256), atol=1e-3)  # the top 8 of 16 bits


def test_bad_images_are_named(folder, tiny, tmp_path):
  model, params = tiny
  notes = folder / 'odd' / 'notes.txt'
  with pytest.raises(BitError, match=rf'images=: {notes}: not an image.*item 2 of 2'):
    prediction.predict(model, params, [folder / 'odd' / 'gray.png', notes], size=32)
  with pytest.raises(BitError, match=r'broken.png: cannot decode'):
    prediction.preprocess([folder / 'odd' / 'broken.png'], 32)
  (tmp_path / 'sub').mkdir()
  with pytest.raises(BitError, match=rf'{tmp_path} holds no image files.*1 subfolders'):
    prediction.predict(model, params, tmp_path)
  with pytest.raises(BitError, match=r'no such file: .*missing.jpg'):
    prediction.preprocess(['missing.jpg'], 32)
  with pytest.raises(BitError, match=r'images= must be .* got a dict'):
    prediction.preprocess({'a': 1}, 32)
  with pytest.raises(BitError, match=r'images= is an empty list'):
    prediction.predict(model, params, [])
  with pytest.raises(BitError, match=r'different sizes \(32x32 and 40x40\)'):
    prediction.preprocess([np.zeros((32, 32, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)])
  with pytest.raises(BitError, match=r'size= must be an image side'):
    prediction.preprocess(folder / 'odd' / 'gray.png', 16)


def test_predict_uses_the_models_input_size(tiny):
  model, params = tiny
  pixels = np.random.default_rng(4).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
  at_32 = prediction.predict(model, params, prediction.preprocess(pixels, 32))
  sized = model.clone(input_size=32)
  np.testing.assert_allclose(prediction.predict(sized, params, pixels), at_32, rtol=1e-5)
  assert not np.allclose(prediction.predict(model, params, pixels), at_32, rtol=1e-3)  # 48 px as given


def test_progress_bar_for_long_inputs(tiny, capsys, monkeypatch):
  model, params = tiny
  pixels = np.zeros((5, 32, 32, 3), np.uint8)
  prediction.predict(model, params, pixels, batch_size=2)
  assert 'predict' not in capsys.readouterr().err  # short: no bar
  monkeypatch.setattr(prediction, 'PROGRESS_MIN', 4)
  prediction.predict(model, params, pixels, batch_size=2)
  assert '5/5' in capsys.readouterr().err
  prediction.predict(model, params, pixels, batch_size=2, progress=False)
  assert capsys.readouterr().err == ''


def test_bit_predict_shows_python_errors_as_flags(workdir, folder, capsys, monkeypatch):
  argv = ['bit-predict', '--workdir', workdir, '--size', '16', folder / 'odd' / 'gray.png']
  code, _, err = run_cli(cli.predict_main, argv, capsys, monkeypatch)
  assert code == 2 and 'error: --size= must be an image side in pixels, at least 32, got 16.' in err
  assert 'bit.predict_files' not in err and 'Traceback' not in err
