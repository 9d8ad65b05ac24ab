"""Folder names of the converted MPM layout (facts §2), shared by the converter, pseudo labels and training.

A leaf module: it imports nothing from the kit, so any section can name these folders without
importing another section's module.

    train/img/<wnid>/                 ImageFolder of all training images
    train/seg/<wnid>/<n>.png          real part labels (the release's masks, converted)
    train/seg_pseudo_cf/<wnid>/...    real + pseudo labels from the part model with the Category Filter
    train/seg_pseudo_nocf/<wnid>/...  real + pseudo labels without the Category Filter (Table 6 ablation)
    train/whether_pseudo/<wnid>.txt   "<wnid>/<n>.JPEG 0|1" (1 = pseudo label)
"""
from __future__ import annotations

REAL_SEG_DIR = "seg"
PSEUDO_SEG_DIRS = {"nocf": "seg_pseudo_nocf", "cf": "seg_pseudo_cf"}
# Paper §4.2: real and pseudo (CF) labels are treated alike, so every part-supervised run trains on both.
TRAIN_SEG_DIR = PSEUDO_SEG_DIRS["cf"]
