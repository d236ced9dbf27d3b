"""The training augmentation (`bit.data._train_augment`: resize, random crop, flip, to [-1, 1]) with the whole
image resized against only the crop's window (`data._resized_window`), per image on this machine.

  taskset -c 0 python benchmarks/window_resize.py [--rounds 3]

Both ways give the same float32 values (tests/test_data.py); this says which is cheaper at each geometry, which
is what `data.WINDOW_SHARE` decides. Times a `tf.function` mapping the augmentation over 100 stream positions of
one decoded 375x500 image; rounds alternate the two ways, and the medians are printed, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

GEOMETRIES = ((512, 224), (512, 288), (512, 352), (512, 416), (512, 480), (384, 224), (160, 128))


def ms_per_image(tf, data, image, resize, crop, window: bool) -> float:
  share = data.WINDOW_SHARE
  data.WINDOW_SHARE = 1.0 if window else 0.0  # the switch `_train_augment` reads when it is traced
  try:

    @tf.function
    def run():
      def one(p):
        return tf.reduce_sum(data._train_augment(tf, image, p, resize, crop, 1, 2))

      return tf.reduce_sum(tf.map_fn(one, tf.range(100, dtype=tf.int64), fn_output_signature=tf.float32))

    run()  # traced and warm
    start = time.perf_counter()
    run().numpy()
    return (time.perf_counter() - start) / 100 * 1e3
  finally:
    data.WINDOW_SHARE = share


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--rounds', type=int, default=3)
  args = p.parse_args()
  from bit import data, data_sources, runtime

  runtime.configure_tool()
  tf = data_sources.tf_hidden()
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
  result = {
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'window_share': data.WINDOW_SHARE,
    'ms_per_image': {},
  }
  for resize, crop in GEOMETRIES:
    runs = {'whole': [], 'window': []}
    for _ in range(args.rounds):
      for way in runs:
        runs[way].append(ms_per_image(tf, data, image, resize, crop, way == 'window'))
    whole, window = (statistics.median(runs[w]) for w in ('whole', 'window'))
    used = 'window' if crop <= data.WINDOW_SHARE * resize else 'whole'
    print(f'{resize} -> {crop}: whole image {whole:.2f} ms, window {window:.2f} ms (bit uses: {used})')
    result['ms_per_image'][f'{resize}->{crop}'] = {
      'whole': round(whole, 3),
      'window': round(window, 3),
      'used': used,
    }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
