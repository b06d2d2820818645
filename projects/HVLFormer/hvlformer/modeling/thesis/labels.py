"""Label-map helpers shared by the thesis modules (CAA's affinity targets, ECAC's class centres): the project's
:func:`~hvlformer.modeling.label_maps.downsample_labels` (the label at each cell's centre)."""
from ..label_maps import downsample_labels

__all__ = ["downsample_labels"]
