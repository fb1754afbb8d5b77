"""One attempted step: gradients (no optimizer step yet), then apply or discard.

``attempt`` runs the user's ``step_fn`` over the step's batches (or once, ``manual``),
clips or measures the gradient norm, and, when a feature asked (``Feature.measures``),
brings the loss and the norm to the host in ONE sync. The ranks then vote; ``apply``
makes the optimizer, scaler and scheduler steps, ``discard`` drops the gradients.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from hardtrain._loop.protocol import StepReport
from hardtrain._loop.state import UserState

StepFn = Callable[[Any], Any]
_NO_CONTEXT = contextlib.nullcontext()


class Stepper:
    """Attempts steps of ``step_fn`` on ``state``'s objects; see the module docstring.

    accum: batches per step; max_grad_norm: clip to it, or None; manual: ``step_fn``
    applies the step itself; measure: bring loss and gradient norm to the host.
    """

    def __init__(self, state: UserState, step_fn: StepFn, *, accum: int,
                 max_grad_norm: float | None, manual: bool, measure: bool) -> None:
        self.state = state
        self.step_fn = step_fn
        self.accum = accum
        self.max_grad_norm = max_grad_norm
        self.manual = manual
        self.measure = measure
        self._parameters: list[torch.Tensor] = []
        self._one_kind = False
        self._no_sync = getattr(state.model, "no_sync", None)

    def attempt(self, max_steps: int) -> StepReport:
        """Run one step's forward and backward passes; nothing is applied yet."""
        state = self.state
        started, lr = time.perf_counter(), state.lr()  # the lr this step uses
        batches: tuple[tuple[int, int], ...]
        if self.manual:
            batch, batch_id = state.next_batch()
            loss, norm, batches = self.step_fn(batch), None, (batch_id,)
        else:
            loss, norm, batches = self._forward_backward()
        loss_value = grad_norm = None
        if self.measure and loss is not None:
            loss_value, grad_norm = _to_host(loss, norm)
        return StepReport(
            step=state.step, final=state.step + 1 == max_steps, loss=loss,
            loss_value=loss_value, grad_norm=grad_norm,
            # a disabled GradScaler (enabled=False for bf16/fp32) skips nothing itself
            scaled=state.scaler is not None and state.scaler.is_enabled(),
            lr=lr, batches=batches, manual=self.manual, started=started,
        )

    def _forward_backward(self) -> tuple[Any, Any, tuple[tuple[int, int], ...]]:
        """Gradients over ``accum`` batches, clipped if asked. Returns the (mean) loss,
        detached, the gradients' total norm (clipping's, or measured; None when neither
        is needed) and the batches' ids."""
        state, accum = self.state, self.accum
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses, batches = [], []
        for micro in range(accum):
            batch, batch_id = state.next_batch()
            batches.append(batch_id)
            sync = micro == accum - 1 or self._no_sync is None
            with _NO_CONTEXT if sync else self._no_sync():  # type: ignore[misc]
                loss = self.step_fn(batch)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"step_fn returned {type(loss).__name__}: expected the loss "
                                    "tensor (or use fit(..., manual=True))")
                scaled = loss / accum if accum > 1 else loss
                (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
            losses.append(loss.detach())
        norm = None
        if self.max_grad_norm is not None or self.measure:
            self._refresh_parameters()
        if self.max_grad_norm is not None:
            if state.scaler is not None:
                for optimizer in state.optimizers.values():
                    state.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self._parameters, self.max_grad_norm)
        elif self.measure:  # grads of a GradScaler are scaled: only finiteness counts
            norm = self._total_norm([p.grad for p in self._parameters if p.grad is not None])
        return (losses[0] if accum == 1 else torch.stack(losses).mean()), norm, tuple(batches)

    def _refresh_parameters(self) -> None:
        """The optimizers' parameters, in their order; again only when a param group was
        added (progressive unfreezing). One foreach norm over all gradients needs one
        dtype and device (a gradient has its parameter's): decided then, not every step."""
        state = self.state
        if len(self._parameters) == sum(len(g["params"]) for opt in state.optimizers.values()
                                        for g in opt.param_groups):
            return
        self._parameters = params = state.parameters()
        first = params[0] if params else None
        self._one_kind = first is not None and all(
            p.dtype == first.dtype and p.device == first.device for p in params)

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """The gradients' total 2-norm in few operations: one foreach norm and one norm of
        the norms when every gradient has the same device and dtype (torch's
        get_total_norm groups them first, several times the host cost on small steps),
        else get_total_norm."""
        if not grads:
            return None
        if self._one_kind:
            norm: torch.Tensor = torch.linalg.vector_norm(
                torch.stack(torch._foreach_norm(grads)))
            return norm
        return torch.nn.utils.get_total_norm(grads)

    def apply(self) -> None:
        """The optimizer, scaler and scheduler steps; the step count goes up."""
        state = self.state
        if not self.manual:
            for optimizer in state.optimizers.values():
                if state.scaler is not None:
                    state.scaler.step(optimizer)
                else:
                    optimizer.step()
            if state.scaler is not None:
                state.scaler.update()
            for scheduler in state.schedulers.values():
                scheduler.step()
        state.step += 1

    def discard(self) -> None:
        """Drop the step: no optimizer, scheduler or scaler step; ``step`` stays. (A
        manual step already happened: nothing to undo here.)"""
        state = self.state
        if self.manual:
            return
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None and self.max_grad_norm is not None:
            state.scaler.update()  # unscale_ ran: close the scaler's step without one


def _to_host(loss: Any, norm: Any) -> tuple[float, float | None]:
    """The loss and the gradient norm as floats: one host-device sync for both."""
    if not isinstance(loss, torch.Tensor):
        loss = torch.tensor(float(loss))
    if norm is None:
        return float(loss.detach().float()), None
    if not (loss.dtype is torch.float32 and norm.dtype is torch.float32 and loss.dim() == 0
            and norm.dim() == 0 and loss.device == norm.device):  # else made to fit first
        loss = loss.detach().float().reshape(())
        norm = norm.detach().float().reshape(()).to(loss.device)
    loss_value, grad_norm = torch.stack((loss.detach(), norm.detach())).tolist()
    return loss_value, grad_norm
