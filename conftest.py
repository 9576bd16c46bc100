"""Test-session settings shared by the unit tests (tests/) and the notebooks (nbval).

With pytest-xdist (``-n auto``) several workers share the machine's cores. Each worker, and every
notebook kernel or subprocess it starts, then uses one torch thread: two threads per worker on a
2-core machine would oversubscribe it, which makes torch several times slower, not faster.
"""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["ADAPTERLAB_THREADS"] = "1"
    torch.set_num_threads(1)
