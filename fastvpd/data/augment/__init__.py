"""The augmentation engine every loader shares: one AugSpec rendered on whole batches.

geometry     crop sampling, per-axis source maps, the bilinear resample from a flat pixel store
draws        the per-sample photometric parameter draws
photometric  the torch reference rendering of the photometric ops (torchvision's formulas)
cpu          the numba kernel: the whole view per sample on host threads (the `cpu` extra)
triton       the Triton kernels: the whole view per pixel on a CUDA device (triton_kernels)
finish       PixelAugmenter (cache backend) and ViewFinisher (ffcv, dali): draws + one rendering
"""

from fastvpd.data.augment.finish import PixelAugmenter, ViewFinisher

__all__ = ["PixelAugmenter", "ViewFinisher"]
