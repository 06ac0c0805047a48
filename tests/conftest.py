import os

import torch
from hypothesis import settings

# Small, fast and repeatable: CI has 2 cores.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# One intra-op thread: tiny test shapes gain nothing from more, and oversubscribed OpenMP barriers
# (other processes on the same cores) make small ops orders of magnitude slower.
torch.set_num_threads(1)
