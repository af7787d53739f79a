"""DAFormer / HRDA / MIC self-training parts (METHODS.md §17), pure functions.

Submodules hold the math only (no Flax, no config, no I/O), so each piece can be
tested against an independent NumPy reference before the method is wired into
the registry:

* `teacher`: EMA teacher update, pseudo labels and their confidence weight;
* `mixing`: DACS ClassMix (class choice, masks, one_mix);
* `photometric`: on-device strong augmentation (colour jitter, Gaussian blur);
* `rare_class`: rare-class sampling statistics and a host-side sampler (NumPy);
* `feature_distance`: thing-class ImageNet feature distance;
* `masking`: MIC block masks;
* `schedule`: warm-up + poly learning rate and the parameter-group AdamW;
* `hrda_step`: HRDA's training views and losses (its pure geometry and
  fusion are `jaxda.hrda_fusion`, below the models that use it too).

Beside them, not pure: `ema_step` (the DAFormer / MIC step), `hrda_step`
(HRDA's student pass, network wrapper and config checks), `ema_driver`.
"""
