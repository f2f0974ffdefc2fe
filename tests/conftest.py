"""Shared test configuration: hypothesis profiles and small helpers."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# CI runs the same examples every time (reproducible failures); `HYPOTHESIS_PROFILE=explore`
# draws fresh ones for a longer local search.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "explore",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Small convs gain nothing from threads, and threads fight under a loaded CI machine.
torch.set_num_threads(1)
