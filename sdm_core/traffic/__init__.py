"""The traffic store: every verification the server makes, with the label a client later gives it.

Shared by the server (which writes it) and ``training.update`` (which reads labelled rows back into a head's
support); neither imports the other, so the schema and its access code live here. The SDM estimator modules never
import this package: it needs SQLAlchemy and Alembic (``pip install 'sdm-lm[store]'``).
"""

from sdm_core.traffic.schema import LABELS
from sdm_core.traffic.store import (
    Feedback,
    FeedbackResult,
    StoreError,
    TrafficRecord,
    TrafficStore,
    redact_url,
    sqlite_url,
)

__all__ = [
    "LABELS",
    "Feedback",
    "FeedbackResult",
    "StoreError",
    "TrafficRecord",
    "TrafficStore",
    "redact_url",
    "sqlite_url",
]
