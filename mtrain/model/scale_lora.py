"""Scale-specific LoRA (Llama-MTSK) with PEFT: shared (MS), per_scale (SS), shared_plus_per_scale (MSS).

PEFT holds every adapter and all are active in every forward. A scale adapter's output is
multiplied by a mask: 1 on the tokens of its scale, 0 elsewhere. So in one forward over rows
of mixed scales each row gets exactly its own adapters (plus the shared one under MSS), and a
scale adapter's gradient comes only from its rows.

Why not PEFT's mixed-batch `adapter_names`: it refuses training mode, skips adapters absent from
the batch and iterates them in set order. Under ZeRO-3 both make ranks run different module
sequences, which deadlocks the parameter gathers. Here every rank calls every adapter, in one
fixed order, whatever its data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import nn

SHARED_ADAPTER = "shared"


def scale_adapter(scale: int) -> str:
    return f"scale_{scale}"


def adapter_names(strategy: str, scales: Sequence[int]) -> list[str]:
    """Adapters of a strategy, in the fixed order every rank uses."""
    per_scale = [scale_adapter(s) for s in scales]
    if strategy == "shared":
        return [SHARED_ADAPTER]
    if strategy == "per_scale":
        return per_scale
    if strategy == "shared_plus_per_scale":
        return [SHARED_ADAPTER, *per_scale]
    raise ValueError(f"model.lora.strategy: unknown strategy {strategy!r}")


class ScaleRouting:
    """The scale of each token (rows, tokens) in the current forward, read by the scale adapters' masks.

    Token-level because a packed row holds one sample at several scales."""

    def __init__(self) -> None:
        self.row_scales: torch.Tensor | None = None

    def set_rows(self, row_scales: torch.Tensor) -> None:
        self.row_scales = row_scales

    def clear(self) -> None:
        self.row_scales = None

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """`context_fn` of torch.utils.checkpoint: the backward's recomputation of a layer runs after
        the task cleared the rows, so it gets back the rows its forward saw."""
        return contextlib.nullcontext(), self._rows_restored(self.row_scales)

    @contextlib.contextmanager
    def _rows_restored(self, row_scales: torch.Tensor | None) -> Iterator[None]:
        previous, self.row_scales = self.row_scales, row_scales
        try:
            yield
        finally:
            self.row_scales = previous

    def mask_output(self, scale: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.row_scales is None:
            raise RuntimeError(
                "scale-specific LoRA adapters need the visual scale of every row; run the model through "
                "mtrain's Matryoshka token task (or mtrain.eval) with a scale"
            )
        mask = (self.row_scales.to(output.device) == scale).to(output.dtype)
        return output * mask.view(*mask.shape, *([1] * (output.dim() - mask.dim())))


def attach_scale_lora(model: nn.Module, peft_configs: list, names: list[str]) -> tuple[nn.Module, ScaleRouting]:
    """Add one PEFT adapter per name (the first config carries modules_to_save), all active and trainable."""
    from peft import get_peft_model  # noqa: PLC0415
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    peft_model = get_peft_model(model, peft_configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], peft_configs[1:], strict=True):
        peft_model.add_adapter(name, config)
    peft_model.base_model.set_adapter(names)  # every adapter active (and trainable) in every forward
    routing = ScaleRouting()
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name.startswith("scale_") and name in module.lora_B:
                    scale = int(name.removeprefix("scale_"))
                    module.lora_B[name].register_forward_hook(partial(routing.mask_output, scale))
    return peft_model, routing
