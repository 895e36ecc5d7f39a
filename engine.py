"""`import engine; engine.train(engine.TrainConfig(...))`, as users' scripts call it.

The training engine lives in blockswap/engine.py (the loop and evaluation); this module keeps
the documented entry points at their old address."""
from blockswap.engine import (  # noqa: F401 (re-exported)
    TrainConfig, TrainResult, candidate_config, train, train_candidate)
