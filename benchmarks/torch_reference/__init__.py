"""PyTorch reference models with the original code bases' state-dict names.

Written by hand (torchvision cannot be installed here) to match
`wasidennis/AdaptSegNet:model/{deeplab_multi,deeplab,deeplab_vgg,
discriminator}.py`, `valeoai/ADVENT:advent/model/{deeplabv2,discriminator}.py`
and torchvision's `vgg16`, parameter name for parameter name. Used to test
`jaxda.weights.torch_import` (same outputs after conversion) and for
side-by-side PyTorch/JAX benchmarks. PyTorch is the optional extra `torch`;
only this package and tests import it.

  from benchmarks.torch_reference import deeplab_v2, discriminator, vgg16
  model = deeplab_v2.ResNetMulti(block_counts=(3, 4, 23, 3), num_classes=19)
"""
