"""Pictures for UDA runs: predictions, pseudo labels, curves, maps.

Colour helpers (`default_palette`, `colorize`, `overlay`; module `palette`)
are pure NumPy. The `save_*` functions render PNG files with matplotlib's
object-oriented API on an Agg canvas (module `figures`): no pyplot, so
rendering works headless, never switches the backend of an interactive
session and leaves no open figure behind.

Conventions: images are uint8 (N, H, W, 3) (float images are taken to be in
[0, 1]); label maps are integer (N, H, W) with `jaxda.types.IGNORE_LABEL`
drawn black. Every `save_*` function creates missing parent directories and
returns the path it wrote.

Modules: `palette` (colours), `figures` (shared plumbing), `label_maps`
(segmentation prediction and pseudo-label grids), `image_grid`
(classification grids), `curves` (training curves, heat maps, confusion
matrices), `depth_maps` and `activations` (anchor / GAM pictures). The
names below are re-exported so that callers write `visualize.save_segmentation_grid(...)`.
"""

from jaxda.visualize.curves import save_confusion_matrix
from jaxda.visualize.curves import save_heatmap_grid
from jaxda.visualize.curves import save_training_curves
from jaxda.visualize.image_grid import save_classification_grid
from jaxda.visualize.label_maps import save_pseudo_label_grid
from jaxda.visualize.label_maps import save_segmentation_grid
from jaxda.visualize.palette import CITYSCAPES_PALETTE
from jaxda.visualize.palette import colorize
from jaxda.visualize.palette import default_palette
from jaxda.visualize.palette import overlay

__all__ = [
    "CITYSCAPES_PALETTE",
    "colorize",
    "default_palette",
    "overlay",
    "save_classification_grid",
    "save_confusion_matrix",
    "save_heatmap_grid",
    "save_pseudo_label_grid",
    "save_segmentation_grid",
    "save_training_curves",
]
