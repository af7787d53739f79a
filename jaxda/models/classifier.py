"""Classification networks and domain discriminators (METHODS.md §9, §12).

Architecture of the thuml recipe that TADA and DANN share:
feature extractor G_f -> last conv map (B, h, w, C) -> global average pool ->
bottleneck G_b (Dense + ReLU) -> classifier G_y (Dense). TADA re-weights the
conv map between G_f and the pooling, so `ImageClassifier` exposes the two
halves as methods (`features`, `head`) besides `__call__`.

Feature extractors:

* ``'resnet50'``: ResNet-50 built from the same bottleneck blocks as the
  segmentation backbones (`jaxda.models.resnet`), with the classification
  geometry: floor-mode stem max-pool and strides (1, 2, 2, 2) without
  dilation, so 224x224 gives a 7x7x2048 map (K = 49 regions, as in TADA).
  Like the DeepLab blocks (and Caffe's ResNet) the stride sits on the first
  1x1 conv.
* ``'resnet_tiny'``: the same structure with one block per stage and width
  8 (tests, CPU smoke runs).
* ``'torchvision_resnet50'``: torchvision's ResNet-50 (v1.5, stride on
  the 3×3; `jaxda.models.torchvision_resnet`), the geometry of the ImageNet
  weights the Office recipes start from (`experiments.import_weights
  --arch=torchvision_resnet50 --drop=fc`, then `model.init_weights`);
  ``'torchvision_resnet_tiny'`` is its width-8, one-block-per-stage copy.
* ``'lenet'``: ADDA's / DAM's LeNet (`LeNet`; with ``bottleneck_dim``
  500 the bottleneck is its fc3 and the classifier its fc4).
* ``'small_cnn'``: the digits network: two 3x3 conv + ReLU + 2x2 max-pool
  stages (SAME padding, 32 and 64 channels), so 28x28 digits give a 7x7x64
  map, K = 49 like ResNet-50 at 224. Its head flattens the (attended) map
  instead of average-pooling it, as DANN's MNIST network does: after two
  small convs the receptive field is ~10 pixels, and a global average would
  throw away where the strokes are. (DANN's network uses 5x5 kernels; 3x3
  needs 9/25 of the multiplications.) No BatchNorm: no method can gain from
  target images reaching normalisation statistics.

`DomainDiscriminator` is the MLP of DANN / TADA's global discriminator;
`RegionDiscriminators` are TADA's K independent region discriminators as one
module, the MLP under `nn.vmap` over the region axis (K parameter sets, one
batched computation).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models import resnet
from jaxda.models import torchvision_resnet


class SmallCNN(nn.Module):
  """Digits feature extractor: [conv -> ReLU -> maxpool2] x len(widths).

  Attributes:
    widths: output channels of the conv stages.
    kernel: square kernel size of every conv.
  """
  widths: Sequence[int] = (32, 64)
  kernel: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False) -> jax.Array:
    """Maps (B, H, W, 3) images to (B, H / 2^n, W / 2^n, widths[-1])."""
    del train_bn  # No BatchNorm.
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (self.kernel, self.kernel), padding='SAME',
                  name=f'conv{i + 1}')(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return x


class LeNet(nn.Module):
  """ADDA's / DAM's LeNet feature extractor (``adda/models/lenet.py``).

  conv1 20@5x5 + ReLU, 2x2 max-pool, conv2 50@5x5 + ReLU, 2x2 max-pool,
  VALID padding (slim's arg scope there): 28x28 digits give a 4x4x50 map,
  which `ImageClassifier` flattens into fc3 (the bottleneck, 500 + ReLU) and
  fc4 (the classifier, 10 logits).
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False) -> jax.Array:
    del train_bn  # No BatchNorm.
    for i, width in enumerate((20, 50)):
      x = nn.Conv(width, (5, 5), padding='VALID', name=f'conv{i + 1}')(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return x


class DenseReLU(nn.Module):
  """``relu(x @ kernel + bias)`` with `nn.Dense`'s parameter names and init.

  The bottleneck G_b as one module, so its output (LeNet's fc3 after the
  ReLU, what DAM's fc3 discriminator sees) is one module call that
  `jaxda.methods.gam.taps` can tap. (A `nn.Dense` subclass would not do:
  its inner ``super().__call__`` is a second intercepted call.)

  Attributes:
    features: output width.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return nn.relu(jnp.dot(x, kernel) + bias)


class ClassificationResNet(nn.Module):
  """ResNet with output stride 32 (torchvision geometry, Caffe stride place).

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    base_width: stem channels and layer1 width; the map has 32 * base_width
      channels.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  base_width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False) -> jax.Array:
    """Maps (B, H, W, 3) images to (B, ~H/32, ~W/32, 32 * base_width)."""
    w = self.base_width
    x = nn.Conv(w, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, kernel_init=resnet.CONV_INIT, name='conv1')(x)
    x = nn.BatchNorm(use_running_average=not train_bn,
                     momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                     name='bn1')(x)
    # torchvision's floor-mode pool: 112 -> 56 at 224 (the DeepLab ceil
    # mode would give 57 and an 8x8 final map).
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2),
                    padding=((1, 1), (1, 1)))
    for k, num_blocks in enumerate(self.stage_sizes):
      x = resnet.ResNetLayer(num_blocks, w * 2**k, stride=1 if k == 0 else 2,
                             dilation=1, name=f'layer{k + 1}')(
                                 x, train_bn=train_bn)
    return x


# Backbones whose head flattens the conv map instead of averaging it.
_FLATTEN_HEAD = ('small_cnn', 'lenet')
_BACKBONES = {
    'small_cnn': lambda: SmallCNN(),
    'lenet': lambda: LeNet(),
    'resnet50': lambda: ClassificationResNet((3, 4, 6, 3), 64),
    'resnet_tiny': lambda: ClassificationResNet((1, 1, 1, 1), 8),
    'torchvision_resnet50': lambda: torchvision_resnet.TorchvisionResNet(
        (3, 4, 6, 3), 64),
    'torchvision_resnet_tiny': lambda: torchvision_resnet.TorchvisionResNet(
        (1, 1, 1, 1), 8),
}
CLASSIFIER_NAMES = tuple(_BACKBONES)


class ImageClassifier(nn.Module):
  """G_f (conv map) -> average pool -> G_b (bottleneck) -> G_y (logits).

  Attributes:
    backbone: one of `CLASSIFIER_NAMES`.
    num_classes: C.
    bottleneck_dim: width D of the bottleneck layer (thuml recipe: 256).
  """
  backbone: str
  num_classes: int
  bottleneck_dim: int = 256

  def setup(self):
    if self.backbone not in _BACKBONES:
      raise ValueError(f'unknown classifier backbone {self.backbone!r}; '
                       f'known: {CLASSIFIER_NAMES}')
    self.feature_extractor = _BACKBONES[self.backbone]()
    self.bottleneck = DenseReLU(self.bottleneck_dim)
    self.classifier = nn.Dense(self.num_classes)

  def features(self, x: jax.Array, *, train_bn: bool = False) -> jax.Array:
    """G_f: (B, H, W, 3) images -> (B, h, w, C) last conv map."""
    return self.feature_extractor(x, train_bn=train_bn)

  def head(self, feature_map: jax.Array) -> dict[str, jax.Array]:
    """Pool + G_b + G_y on a (possibly attended) (B, h, w, C) conv map.

    The pooling is a global average (ResNets) or a flatten (``small_cnn``,
    ``lenet``).

    Returns:
      ``{'pooled': (B, P), 'bottleneck': (B, D), 'logits': (B, C)}``.
    """
    if self.backbone in _FLATTEN_HEAD:
      pooled = feature_map.reshape(feature_map.shape[0], -1)
    else:
      pooled = jnp.mean(feature_map, axis=(1, 2))
    bottleneck = self.bottleneck(pooled)
    return {'pooled': pooled, 'bottleneck': bottleneck,
            'logits': self.classifier(bottleneck)}

  def __call__(self, x: jax.Array, *,
               train_bn: bool = False) -> dict[str, jax.Array]:
    """Full forward: ``{'features': (B, h, w, C), 'pooled', 'bottleneck',
    'logits'}``."""
    feature_map = self.features(x, train_bn=train_bn)
    return {'features': feature_map, **self.head(feature_map)}


class DomainDiscriminator(nn.Module):
  """MLP domain discriminator: (B, D) -> (B,) logits (sigmoid = P(d = 1)).

  Attributes:
    hidden: widths of the hidden Dense + ReLU layers (thuml: 1024, 1024).
  """
  hidden: Sequence[int] = (1024, 1024)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'dense{i}')(x))
    return nn.Dense(1, name='out')(x)[..., 0]


class RegionDiscriminators(nn.Module):
  """K independent region discriminators G_d^k, vectorised over regions.

  One `DomainDiscriminator` under `nn.vmap` over axis 1 of the input, with
  a leading K axis on every parameter (split init keys: the K sets start
  different), so the K MLPs run as one batched computation.

  Attributes:
    hidden: widths of each region MLP's hidden layers.
  """
  hidden: Sequence[int] = (256,)

  @nn.compact
  def __call__(self, regions: jax.Array) -> jax.Array:
    """(B, K, C) region features -> (B, K) logits; region k uses G_d^k."""
    vmapped = nn.vmap(DomainDiscriminator, in_axes=1, out_axes=1,
                      variable_axes={'params': 0},
                      split_rngs={'params': True})
    return vmapped(hidden=tuple(self.hidden), name='regions')(regions)
