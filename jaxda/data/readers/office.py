"""Office-31 and Office-Home read from their distributed layouts.

Layouts::

  Office-31:   ROOT/<domain>/images/<class>/*.jpg    domains amazon, dslr,
                                                     webcam (31 classes)
  Office-Home: ROOT/<Domain>/<class>/*.jpg           domains Art, Clipart,
                                                     Product, 'Real World'
                                                     (65 classes)

Config names: 'office31:amazon' (or a / d / w, any case),
'officehome:Art' (or ar / cl / pr / rw; 'Real World' also matches
'Real_World', tllib's renaming). Class index = position in the sorted class
list of `tables` (torchvision `ImageFolder` order), so a domain missing some
class folders keeps the same indices. Both splits return the whole domain:
the UDA protocol trains on the unlabelled target domain and reports accuracy
on the same images.
"""

import os

import numpy as np

from jaxda.data import errors
from jaxda.data.readers import common
from jaxda.data import tables

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_DATASETS = {
    'office31': dict(
        name='Office-31', classes=tables.OFFICE31_CLASSES,
        domains=tables.OFFICE31_DOMAINS, sub='images',
        layout='ROOT/<domain>/images/<class>/*.jpg (domains amazon, dslr, '
        'webcam)',
        aliases={'a': 'amazon', 'd': 'dslr', 'w': 'webcam'}),
    'officehome': dict(
        name='Office-Home', classes=tables.OFFICEHOME_CLASSES,
        domains=tables.OFFICEHOME_DOMAINS, sub='',
        layout="ROOT/<Domain>/<class>/*.jpg (domains Art, Clipart, Product, "
        "'Real World')",
        aliases={'ar': 'Art', 'cl': 'Clipart', 'pr': 'Product',
                 'rw': 'Real World'}),
}

# Expected layout per data set, for messages and the TFDS builders.
LAYOUTS = {k: v['layout'] for k, v in _DATASETS.items()}


def _domain_dir(root, spec, domain):
  """The existing folder of `domain` under root (aliases, any case)."""
  key = domain.strip().lower()
  wanted = spec['aliases'].get(key, domain)
  canon = {d.lower().replace(' ', '_'): d for d in spec['domains']}
  wanted = canon.get(wanted.lower().replace(' ', '_'))
  if wanted is None:
    raise errors.DataError(
        f'{spec["name"]}: unknown domain {domain!r}; use one of '
        f'{list(spec["domains"])} (or {sorted(spec["aliases"])})')
  for candidate in (wanted, wanted.replace(' ', '_')):
    path = os.path.join(root, candidate)
    if os.path.isdir(path):
      return wanted, path
  raise errors.DataError(
      f'{spec["name"]}: domain directory {os.path.join(root, wanted)} does not '
      f'exist; expected layout: {spec["layout"]}')


class Office:
  """Random-access Office-31 / Office-Home domain: image (H, W, 3), label int.

  Args:
    root: directory holding the domain folders.
    dataset: 'office31' or 'officehome'.
    domain: domain name or alias (module docstring).
    split: ignored (the whole domain; module docstring).
  """

  label_kind = 'per_image'

  def __init__(self, root, dataset, domain, split='train'):
    spec = _DATASETS[dataset]
    self.layout = spec['layout']
    self.class_names = spec['classes']
    common.require_dir(root, spec['name'], self.layout)
    if not domain:
      raise errors.DataError(
          f'{spec["name"]}: name the domain, e.g. {dataset}:'
          f'{spec["domains"][0]}')
    domain, domain_dir = _domain_dir(root, spec, domain)
    self.name = f'{spec["name"]} {domain}'
    class_root = (os.path.join(domain_dir, spec['sub']) if spec['sub']
                  else domain_dir)
    common.require_dir(class_root, spec['name'], self.layout)
    index = {c: i for i, c in enumerate(self.class_names)}
    self.paths, labels, self.ids = [], [], []
    for folder in sorted(os.listdir(class_root)):
      path = os.path.join(class_root, folder)
      if not os.path.isdir(path):
        continue
      if folder not in index:
        raise errors.DataError(
            f'{spec["name"]}: class folder {path} is not one of the '
            f'{len(index)} {spec["name"]} classes; expected layout: '
            f'{self.layout}')
      for name in sorted(os.listdir(path)):
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
          self.paths.append(os.path.join(path, name))
          labels.append(index[folder])
          self.ids.append(f'{folder}/{name}')
    if not self.paths:
      raise errors.DataError(
          f'{spec["name"]}: no images under {class_root}; expected layout: '
          f'{self.layout}')
    self.class_labels = np.asarray(labels, np.int64)
    self.summary = common.report(self.name, root, split, len(self.paths))

  def example_id(self, i):
    return self.ids[i]

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return {'image': common.read_rgb(self.paths[i]),
            'label': int(self.class_labels[i]), 'id': self.ids[i]}
