"""The LoRA layers PEFT injected into the meta model, each with the adapter's factors and scaling:
what is added to which in-model parameter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kt_sft.export.errors import ExportError

__all__ = ["ADAPTER_NAME", "LoraTarget", "lora_targets"]

#: The name the adapter is injected under.
ADAPTER_NAME = "default"


@dataclass
class LoraTarget:
    """One adapted parameter: ``param`` (in-model name), its LoRA factors and scaling."""

    name: str
    param: str
    shape: tuple[int, ...]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    rank: int
    #: The base weight the adapter carries itself (PEFT saves the output / input embeddings'
    #: base weight with the adapter when it targets them; stock PEFT loads that copy).
    base_weight: torch.Tensor | None = None

    def delta(self, rows: slice | None = None) -> torch.Tensor:
        """``s · B @ A`` (float32), optionally only output rows ``rows``."""
        b = self.lora_b if rows is None else self.lora_b[rows]
        return (b @ self.lora_a) * self.scaling

    def expert_delta(self, e: int, rows: slice | None = None) -> torch.Tensor:
        """Expert ``e``'s ``s · B_e @ A_e`` in the parameter's ``out x in`` layout."""
        num_experts, r = self.shape[0], self.rank
        a = self.lora_a[e * r : (e + 1) * r]
        b = self.lora_b[:, e::num_experts]  # column k·E + e holds rank k of expert e
        if rows is not None:
            b = b[rows]
        return (b @ a) * self.scaling


def lora_targets(
    model: torch.nn.Module, adapter_state: dict[str, torch.Tensor], adapter_dir: Path
) -> dict[str, LoraTarget]:
    """Every LoRA layer PEFT injected into the meta ``model``, with the adapter's tensors."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    targets: dict[str, LoraTarget] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, ParamWrapper):
            owner = name
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            param = f"{owner}.{module.parameter_name}" if owner else module.parameter_name
            shape = tuple(module.get_param().shape)
            if len(shape) == 3 and not module._did_swap_in_out_features:
                raise ExportError(
                    f"LoRA on {param}: experts stored transposed (E x in x out) "
                    "are not supported by kt-sft export"
                )
        elif type(module) is LoraLinear:
            param = f"{name}.weight"
            shape = tuple(module.get_base_layer().weight.shape)
        else:
            raise ExportError(
                f"adapter {adapter_dir} puts a {type(module).__name__} LoRA layer "
                f"on {name}; kt-sft export merges LoRA on nn.Linear modules and on "
                "parameters (target_parameters) only"
            )
        if ADAPTER_NAME not in module.lora_A:
            continue
        keys = {}
        for kind in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{kind}.weight"
            keys[kind] = key
            expected[key] = tuple(getattr(module, kind)[ADAPTER_NAME].weight.shape)
        saved_base = f"base_model.model.{name}.base_layer.weight"
        if type(module) is LoraLinear and saved_base in adapter_state:
            expected[saved_base] = shape
        scaling = float(module.scaling[ADAPTER_NAME])
        targets[param] = LoraTarget(
            name=name,
            param=param,
            shape=shape,
            lora_a=adapter_state.get(keys["lora_A"], torch.empty(0)),
            lora_b=adapter_state.get(keys["lora_B"], torch.empty(0)),
            scaling=scaling,
            rank=int(module.r[ADAPTER_NAME]),
            base_weight=adapter_state.get(saved_base),
        )
    if not targets:
        raise ExportError(
            f"adapter {adapter_dir} targets no module or parameter of the base "
            "model (nothing to merge)"
        )
    missing = sorted(k for k in expected if k not in adapter_state)
    unexpected = sorted(k for k in adapter_state if k not in expected)
    mismatched = [
        f"{k}: adapter {tuple(adapter_state[k].shape)}, base model needs {shape}"
        for k, shape in expected.items()
        if k in adapter_state and tuple(adapter_state[k].shape) != shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(
            f"tensors missing from the adapter ({len(missing)}): " + ", ".join(missing[:3])
        )
    if unexpected:
        problems.append(
            f"adapter tensors the base model has no LoRA layer for "
            f"({len(unexpected)}): " + ", ".join(unexpected[:3])
        )
    if problems:
        raise ExportError(
            f"adapter {adapter_dir} does not fit the base model (trained on another "
            f"model?): {' | '.join(problems)}"
        )
    for t in targets.values():
        t.lora_a = t.lora_a.to(torch.float32)
        t.lora_b = t.lora_b.to(torch.float32)
    return targets
