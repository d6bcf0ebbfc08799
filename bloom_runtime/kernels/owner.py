"""`KernelOwner`: the side of a module that a kernel role serves.

A module says which problem it poses (`kernel_problem`: role, shape, dtype); at load,
`prepare_kernels` asks the selector which candidate serves it here and builds that
kernel as a child module, once. A kernel that replaces one of the module's tensors
(a packed layout) takes it over: the module holds the weight once, `state_dict`
still gives it back plain, and `release_kernels` restores the parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from .selection import Decision, Problem, candidate, selector


class KernelOwner(nn.Module):
    """Mixed in before the module class; `run_kernel` calls the kernel serving a call's rows."""

    KEEPS: ClassVar[tuple[str, ...]] = ()  # tensors only a kernel that looks rows up may take (lookup rows)
    decision: Decision | None = None  # the kernels themselves are the child module "kernels"

    def kernel_problem(self, dtype: torch.dtype) -> Problem | None:
        """The problem this module poses with activations of `dtype`; None: no kernel role."""
        return None

    def prepare_kernels(self, dtype: torch.dtype) -> None:
        """Choose and build this module's kernel(s) for activations of `dtype` (once)."""
        if self.decision is not None:
            return
        problem = self.kernel_problem(dtype)
        if problem is None:
            return
        decision = selector().decide(problem)
        built = {name: candidate(problem.role, name)(self) for name in sorted(set(decision.serves.values()))}
        for kernel in built.values():
            for name in self._taken(kernel):
                delattr(self, name)
        self.kernels, self.decision = nn.ModuleDict(built), decision
        self._by_rows: dict[int, Callable] = {}
        self._operands: dict[int, tuple | None] = {}

    def release_kernels(self) -> None:
        """Drop the kernels and give back, as parameters, the tensors they took."""
        if self.decision is None:
            return
        for kernel in self.kernels.values():
            for name in self._taken(kernel):
                self.register_parameter(name, nn.Parameter(kernel.restore(name), requires_grad=False))
        del self.kernels
        self.decision = None

    def _taken(self, kernel: nn.Module) -> list[str]:
        """The tensors of this module that `kernel` holds in its place: its `drops`, but those the module
        keeps for lookups only where the kernel looks rows up itself."""
        return [name for name in kernel.drops if name not in self.KEEPS or kernel.lookups]

    def taken_by(self, name: str) -> nn.Module:
        """The kernel that took over the module's tensor `name`."""
        return next(k for k in self.kernels.values() if name in self._taken(k))

    def run_kernel(self, dtype: torch.dtype, *inputs) -> torch.Tensor:
        """The serving kernel on `inputs` (rows first); prepares it on first use if load did not."""
        if self.decision is None:
            self.prepare_kernels(dtype)
        rows = inputs[0].shape[0]
        call = self._by_rows.get(rows)
        if call is None:  # bound once per row count (a kernel has no hooks: Module.__call__ is skipped)
            call = self._by_rows[rows] = self.kernels[self.decision.name_for(rows)].bind(self)
        return call(*inputs)

    def layer_operands(self, rows: int) -> tuple | None:
        """The kernel serving `rows` as a product of the native fused decode layer (selection.Kernel's
        `layer_operands`), where this module's `forward` on [rows, K] is that kernel's call and nothing
        more (`forwards_rows_as_is`); None otherwise (then the module runs itself)."""
        if self.decision is None or not self.forwards_rows_as_is():
            return None
        if rows not in self._operands:
            self._operands[rows] = self.kernels[self.decision.name_for(rows)].layer_operands(self)
        return self._operands[rows]

    def forwards_rows_as_is(self) -> bool:
        """Whether `forward` on rows [M, K] calls the serving kernel on them and does nothing else: the
        rows given as they are (an int8 role's left to the kernel to quantize per token) and its output,
        in their dtype, returned. A static scale, a padding or an all-reduce's reduction is more."""
        return False

    def _apply(self, fn, recurse: bool = True):
        """Moving or converting the module's tensors drops the calls bound to the old ones."""
        self._by_rows, self._operands = {}, {}
        return super()._apply(fn, recurse)

    def run_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] through `run_kernel` as rows [M, K], back in x's leading shape. Rows come as they
        are: the model's linears see [tokens, hidden], and a reshape and a view cost ~2 us a call."""
        if x.dim() == 2:
            return self.run_kernel(x.dtype, x)
        return self.run_kernel(x.dtype, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for kernel in (self.kernels.values() if self.decision is not None else ()):
            for name in self._taken(kernel):
                destination[prefix + name] = kernel.restore(name)
