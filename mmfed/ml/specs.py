"""The ml code's names for the model and training sections of the run config.

They are defined once, in ``mmfed.config`` (the schema), and re-exported here for the
modules that import them from the ml package; both stay free of torch, so the config,
the server's bookkeeping and a site's non-training message handlers never pay torch's
import time (seconds per ClientApp process in deployment).
"""

from __future__ import annotations

from mmfed.config import FUSIONS, MODALITY_NAMES, ModelSpec, TrainSpec

__all__ = ["FUSIONS", "MODALITY_NAMES", "ModelSpec", "TrainSpec"]
