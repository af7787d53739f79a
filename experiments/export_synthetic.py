"""Exports the embedded benchmark to the folder layout.

  python -m experiments.export_synthetic --out DIR [--num_train 800]

Writes ``DIR/source`` and ``DIR/target``, each ``classes.txt`` +
``{train,val}/{images,labels}/*.png``, readable with ``name='folder'``.
"""

import os

from absl import app
from absl import flags

from jaxda.data.readers import folder
from jaxda.data.embedded import synthetic

_OUT = flags.DEFINE_string("out", None, "Output root.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 800, "Train images per domain.")
_NUM_VAL = flags.DEFINE_integer("num_val", 200, "Val images per domain.")
_HEIGHT = flags.DEFINE_integer("height", 64, "Image height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Image width.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")


def _main(argv):
  del argv
  for domain in synthetic.DOMAINS:
    for split, n in (("train", _NUM_TRAIN.value), ("val", _NUM_VAL.value)):
      images, labels = synthetic.generate(
          domain, n, height=_HEIGHT.value, width=_WIDTH.value,
          seed=synthetic.split_seed(_SEED.value, split))
      out = folder.export_folder(os.path.join(_OUT.value, domain), split,
                                 images, labels, synthetic.CLASS_NAMES)
      print(f"{domain}/{split}: {n} images -> {out}")


if __name__ == "__main__":
  app.run(_main)
