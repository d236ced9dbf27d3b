"""A tiny TFDS image-classification dataset that downloads its files through TFDS's download manager.

`BitTinyDownload.URL` is the folder URL that serves `ARCHIVE` (tests set it to a local HTTP server);
`archive_bytes()` makes the archive: `<class>/<split>_<i>.png`, 32x32 images coloured by class.
"""

import io
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASSES = ('red', 'blue')
COLORS = {'red': (220, 30, 30), 'blue': (30, 30, 220)}
PER_CLASS = {'train': 4, 'test': 2}
ARCHIVE = 'bit_tiny_download.zip'


def archive_bytes() -> bytes:
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    for split, n in PER_CLASS.items():
      for name in CLASSES:
        for i in range(n):
          pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
          png = io.BytesIO()
          Image.fromarray(pixels).save(png, 'PNG')
          z.writestr(f'{name}/{split}_{i}.png', png.getvalue())
  return buf.getvalue()


class BitTinyDownload(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  URL = 'http://127.0.0.1:9/'  # set by the tests

  def _info(self):
    features = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(names=list(CLASSES)),
    }
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=('image', 'label')
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.download_and_extract(self.URL + ARCHIVE)
    return {split: self._generate_examples(root, split) for split in PER_CLASS}

  def _generate_examples(self, root, split):
    for name in CLASSES:
      for path in sorted((root / name).glob(f'{split}_*.png')):
        yield f'{name}/{path.name}', {'image': path, 'label': name}
