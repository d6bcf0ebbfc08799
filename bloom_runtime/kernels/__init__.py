"""The matmul kernels, by role, and the choice of which one serves on this machine.

Roles: "dense16" (a bfloat16/float16 linear, dense.py), "w8a16" and "w8a8" (int8.py),
"w4a16" and "w4a8" (int4.py). Each lists candidate kernels; selection.py probes them on the
running machine against exact math, times the correct ones and caches the choice.
Modules ask for a role through `KernelOwner` (owner.py) and never name a kernel.
"""

from . import dense, int4, int8  # noqa: F401  (each registers its roles)
from .owner import KernelOwner
from .report import describe
from .selection import ROLES, Decision, Kernel, Problem, Selector, probe, selector

__all__ = ["ROLES", "Decision", "Kernel", "KernelOwner", "Problem", "Selector", "describe", "probe",
           "selector"]
