"""sdm_core: the SDM activation layer and estimator, shared by training and serving.

Public entry points: :class:`SDMEstimator` (fit / predict_scores / predict / save / load), :class:`SDMConfig`, the
formulas in :mod:`sdm_core.math`, and Algorithm 1 in :mod:`sdm_core.calibration`.
"""

__version__ = "0.1.0"

from sdm_core.config import SDMConfig  # noqa: E402
from sdm_core.estimator import SDMEstimator, SDMScores  # noqa: E402

__all__ = ["SDMConfig", "SDMEstimator", "SDMScores", "__version__"]
