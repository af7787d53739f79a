"""Converts PyTorch weights to a jaxda checkpoint (METHODS.md §3.1).

  python -m experiments.import_weights --torch=FILE --arch=ARCH --out=DIR \
      [--drop=layer5,fc]

ARCH is one of `jaxda.weights.torch_import.ARCHS` (deeplabv2_r101,
deeplabv2_r50, deeplabv2_tiny, resnet101, resnet50, resnet_tiny, vgg16,
deeplabv2_vgg16, fc_discriminator) or of
`jaxda.weights.torchvision_import.ARCHS` (torchvision_resnet50: torchvision's
ImageNet ResNet-50 with `--drop=fc`, for the classifiers'
`config.model.init_weights`) or `mit` (SegFormer's ImageNet MiT-B0..B5
encoder, the original `mit_b5.pth` or a transformers SegFormer state dict;
its ImageNet `head` is dropped; for DAFormer / MIC with
`--config.daformer.network=mit_b5 --config.model.init_weights=DIR`). FILE is a PyTorch state dict
(`torch.load` with `weights_only=True`; needs the `torch` extra) or an `.npz`
of named arrays.
DIR gets an Orbax checkpoint in a run's layout (`DIR/checkpoints/0`) and
`DIR/import_info.json` (source file, SHA-256, arch, dropped prefixes).

Use it from a config:

* a whole segmenter (e.g. a trained AdaptSegNet / ADVENT model,
  `--arch=deeplabv2_r101`): `--config.model.init_checkpoint=DIR`, which needs
  every leaf;
* a backbone (the DeepLab ImageNet(+COCO) init, `--arch=resnet101
  --drop=layer5`, or torchvision VGG-16, `--arch=vgg16 --drop=classifier`
  for `DeepLabV2VGG`): `--config.model.init_weights=DIR`; the heads keep
  their random init, as in the originals.

Every tensor of FILE must land on a jaxda leaf and every leaf must be filled
(heads you do not want go in --drop); otherwise the error lists the names.
"""

import sys

from absl import app
from absl import flags

from jaxda.weights import torch_import
from jaxda.weights import torchvision_import

_TORCH = flags.DEFINE_string(
    "torch", None, "PyTorch state-dict file (.pth/.pt) or .npz.",
    required=True)
_ARCH = flags.DEFINE_enum("arch", None, list(torchvision_import.ALL_ARCHS),
                          "Architecture of the file.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DROP = flags.DEFINE_list(
    "drop", [], "Module prefixes to discard, e.g. layer5 (the DeepLab"
    " init's 21-class head), fc or classifier (ImageNet classifiers).")


def _main(argv):
  del argv
  try:
    weights, num_tensors = torchvision_import.convert_file(
        _TORCH.value, _ARCH.value, tuple(_DROP.value))
    directory = torch_import.save_converted(weights, _OUT.value, {
        "source": _TORCH.value,
        "sha256": torch_import.file_sha256(_TORCH.value),
        "arch": _ARCH.value,
        "dropped_prefixes": list(_DROP.value),
        "num_tensors_in_file": num_tensors,
    })
  except torch_import.WeightImportError as e:
    sys.exit(f"import_weights: {e}")
  print(f"{_ARCH.value}: {num_tensors} tensors from {_TORCH.value} ->"
        f" {directory}")


if __name__ == "__main__":
  app.run(_main)
