"""pysparse_attn: sparse attention for video diffusion transformers.

Tile skipping inside a FlashAttention-style loop (BLASST, CEF and a certified-recall rule),
top-k / top-p / mask plans, and SLA sparse + linear attention, with one float64 reference
semantics and CPU (C++/OpenMP) and GPU (CUDA via CuPy) backends.
"""

from ._api import (attention, attention_vjp, block_scores, plan, recall, sla_attention,
                   sla_vjp)
from ._plan import Plan
from ._rules import Blasst, Cef, Recall
from ._select import BlockMask, TopK, TopP
from ._stats import AttentionStats
from .calibrate import calibrate_blasst, calibrate_cef, calibrate_recall
from .reuse import PlanReuse

__version__ = "0.1.0"

__all__ = [
    "attention",
    "sla_attention",
    "attention_vjp",
    "sla_vjp",
    "block_scores",
    "recall",
    "plan",
    "Plan",
    "BlockMask",
    "TopK",
    "TopP",
    "Blasst",
    "Cef",
    "Recall",
    "AttentionStats",
    "calibrate_blasst",
    "calibrate_cef",
    "calibrate_recall",
    "PlanReuse",
]
