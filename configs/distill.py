"""Distillation (bit-distill): Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent" (arXiv:2106.05237), as defaults.

  bit-distill --config configs/distill.py --workdir /tmp/distilled \
      --config.teacher=/tmp/bit_flowers_r152x2 --config.student=R50x1 --config.dataset=oxford_flowers102 \
      [--config.unlabeled=/data/more_flower_photos]

The teacher is a fine-tune of the dataset's classes (a bit-train workdir, its model.npz, or a registry name
with the right head); the student a bare architecture (from scratch, the paper's setting: BiT-M-R152x2
teachers distilled into randomly initialized R50x1 students) or a checkpoint (a new zero head).

The paper's recipe, kept here: function matching (teacher and student see the very same augmented view,
MixUp on: Beta(1, 1), the paper's mixup p=1), the KL divergence between the two softmaxes at temperature 1
(`temperature`; the paper also sweeps 2 to 10 on the small datasets), batch 512, and patience: its schedules
are thousands of epochs. The lengths of the paper's runs (Fig. 3 / Tab. 4; also big_vision's
configs/proj/distill): Flowers102 10,000 / 100,000 / 1,000,000 epochs (fast / medium / long); Pets 1,000 /
3,000 / 30,000; Food101 and SUN397 100 / 1,000 / 3,000; ImageNet 1,200 to 9,600 epochs at batch 4096
(82.8% top-1 for the R50x1 student at 9,600). `epochs` (default 1,000, the middle of the small datasets'
range) sets the schedule from the number of examples trained on when `schedule` is unset; the schedule has
the hyper-rule's shape (warmup, then /10 at 30, 60 and 90%). Differences from the paper, on purpose: the
optimizer is the project's one SGD with momentum (the paper: Adam with decoupled weight decay, cosine decay,
gradient clipping), and the crop is the hyper-rule's random crop of the resized image (the paper: an
inception crop).

Every key of bit/config.py but `model` (here `student` and `teacher`) means what it means there.
"""

import ml_collections
from ml_collections import config_dict

from bit import config


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The distillation config; `arg`, if given, is the student."""
  c = config.get_config()
  with c.unlocked():
    del c['model']  # the student and the teacher instead
    c.student = arg or 'R50x1'  # registry name or .npz (new zero head), or an architecture (from scratch)
    c.teacher = config_dict.placeholder(str)  # a bit-train workdir, an official .npz or a registry name
    c.teacher_dtype = 'float32'  # the teacher's compute dtype: 'float32' or 'bfloat16' (forward only)
    c.temperature = 1.0  # softmax temperature of both models; the KL is multiplied by temperature**2
    c.label_weight = 0.0  # w: loss = (1 - w) * KL + w * cross-entropy of the labeled examples
    c.unlabeled = config_dict.placeholder(str)  # a folder of images (any layout) or a TFDS name, no labels
    c.unlabeled_split = 'train'  # the split of a TFDS `unlabeled`
    c.include_labeled = True  # also distill on the labeled train split (its labels count only with w > 0)
    c.epochs = 1000.0  # schedule length in passes over the examples, when `schedule` is unset
  c.batch_size = 512
  c.base_lr = 0.01  # SGD; a student from scratch takes a larger lr than a fine-tune's 0.003
  c.mixup_alpha = 1.0  # "consistent": MixUp on every batch, Beta(1, 1)
  c.lock()
  return c
