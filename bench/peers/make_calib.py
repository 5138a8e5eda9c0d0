"""Dump OUR calibration windows (wikitext2:valid, seeded) so the peer calibrates on the very same tokens.

    .venv/bin/python bench/peers/make_calib.py --samples 128 --len 512 --out bench/peers/out/calib.pt
Also prints the FP checkpoint directory the peer should read.
"""

import argparse
from pathlib import Path

import torch

from haqmoe.data.text import calibration_ids
from haqmoe.models.embedded import ensure_embedded
from haqmoe.sources import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--samples", type=int, default=128)
ap.add_argument("--len", type=int, default=512)
ap.add_argument("--out", default="bench/peers/out/calib.pt")
a = ap.parse_args()
ids = calibration_ids(load_model(a.model).tokenizer, "wikitext2:valid", a.samples, a.len, 0, eval_spec="wikitext2:test")
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
torch.save(ids, a.out)
print(ensure_embedded(a.model))
