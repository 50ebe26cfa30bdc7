"""Adapters: standard PEFT adapter directories, written atomically, plus kt's extras.

:func:`save_adapter` (also what ``peft_model.save_pretrained`` does after
:func:`kt_sft.get_peft_model`) lets PEFT write the adapter (``adapter_config.json`` +
``adapter_model.safetensors``) into a temporary sibling directory, adds kt's extras, and renames
it into place, so a reader never sees a half-written adapter. The PEFT part is standard: stock
``transformers`` + ``peft`` load it on the stock model. kt's extras are the LoRA experts
(``kt_lora_experts.safetensors``, only when ``lora_experts > 0``) and ``kt_adapter.json``
describing them; stock PEFT ignores both files.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the adapter's parameters are sharded
``DTensor``s: :func:`save_adapter` then gathers the full adapter tensors first (a collective:
call ``save_pretrained`` on every rank) and only the main process (global rank 0, or
``is_main_process=``) writes, so the directory holds the same standard, unsharded adapter as a
single-process run.

:func:`load_adapter` loads such a directory into a kt-wrapped model (to resume training or to
serve), checking every tensor's shape against the model first, so an adapter trained on another
model fails with the mismatching names rather than deep inside PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kt_sft._swap import fsync_tree, swap_into_place
from kt_sft.install import ensure_installed
from kt_sft.lora_experts import LoRAExperts

__all__ = [
    "KTAdapterError",
    "gather_adapter_state_dict",
    "install_save",
    "load_adapter",
    "save_adapter",
]

LORA_EXPERTS_FILE = "kt_lora_experts.safetensors"
KT_ADAPTER_FILE = "kt_adapter.json"


class KTAdapterError(ValueError):
    """An adapter directory does not fit the model it is loaded into."""


def _lora_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def _canonical(name: str) -> str:
    """Module name without PEFT's wrapper prefixes (so base and PEFT models agree)."""
    parts = [p for p in name.split(".") if p not in ("base_model", "base_layer")]
    if parts[:1] == ["model"] and len(parts) > 1 and parts[1] == "model":
        parts = parts[1:]
    return ".".join(parts)


def _write_extras(
    model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    from safetensors.torch import save_file

    experts = _lora_experts(model)
    if not experts:
        return
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": "kt-lora-experts", "version": 1, "modules": {}}
    for name, module in experts.items():
        key = _canonical(name)
        for pname, p in module.named_parameters():
            value = state.get(f"{name}.{pname}", p) if state is not None else p
            tensors[f"{key}.{pname}"] = value.detach().to("cpu").contiguous()
        meta["modules"][key] = {
            "num_experts": module.num_experts,
            "width": module.width,
            "hidden_size": module.hidden_size,
            "activation": module.activation,
        }
    save_file(tensors, str(directory / LORA_EXPERTS_FILE))
    (directory / KT_ADAPTER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _atomic_replace(tmp: Path, target: Path) -> None:
    fsync_tree(tmp)
    swap_into_place(tmp, target)


def save_adapter(peft_model: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write ``peft_model``'s adapter(s) to ``save_directory`` atomically (temp dir + rename).

    ``kwargs`` go to PEFT's ``save_pretrained``. kt's LoRA experts, if any, are saved beside.
    """
    from peft import PeftModel

    gathered = _gather_sharded(peft_model, kwargs)
    if gathered is not None:
        kwargs["state_dict"] = gathered
        main = kwargs.pop("is_main_process", None)
        if main is None:
            import torch.distributed as dist

            main = not dist.is_initialized() or dist.get_rank() == 0
        if not main:
            return
    target = Path(save_directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        PeftModel.save_pretrained(peft_model, str(tmp), **kwargs)
        _write_extras(peft_model, tmp, kwargs.get("state_dict"))
        _atomic_replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(value, DTensor)


def _full_tensor(value: Any) -> torch.Tensor:
    """The whole tensor behind a DTensor (collective unless it is replicated), on the CPU."""
    from torch.distributed.tensor import Replicate

    if all(isinstance(p, Replicate) for p in value.placements):
        full = value.to_local()
    else:
        full = value.full_tensor()
    return full.detach().to("cpu")


def _gather_sharded(peft_model: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A state dict whose adapter tensors are whole, when the model (or the ``state_dict``
    given) holds FSDP2-sharded ``DTensor``s; ``None`` otherwise. Collective in that case:
    every rank gathers the same tensors in the same order."""
    state = kwargs.get("state_dict")
    if state is None:
        if not any(_is_dtensor(p) for p in peft_model.parameters()):
            return None
        state = peft_model.state_dict()
    elif not any(_is_dtensor(v) for v in state.values()):
        return None
    from peft.utils import get_peft_model_state_dict

    wanted: set[int] = set()
    names = kwargs.get("selected_adapters") or list(peft_model.peft_config)
    for adapter in names:
        selected = get_peft_model_state_dict(
            peft_model,
            state_dict=state,
            adapter_name=adapter,
            save_embedding_layers=kwargs.get("save_embedding_layers", "auto"),
        )
        wanted.update(id(v) for v in selected.values())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    out: dict[str, Any] = {}
    for key, value in state.items():
        if _is_dtensor(value) and (id(value) in wanted or key in trainable):
            value = _full_tensor(value)
        out[key] = value
    return out


def gather_adapter_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The state-dict entries an adapter save writes (every adapter's tensors, the trainable
    parameters, kt's LoRA experts), whole and on the CPU, under the model's own key names.

    Collective when the model holds FSDP2-sharded ``DTensor``s (call it on every rank); the
    result can go to ``save_pretrained(..., state_dict=...)`` on the main process alone, which
    then writes the same standard adapter as :func:`save_adapter`."""
    state = peft_model.state_dict()
    kwargs: dict[str, Any] = {"state_dict": state}
    gathered = _gather_sharded(peft_model, kwargs)
    full = gathered if gathered is not None else state
    from peft.utils import get_peft_model_state_dict

    wanted = set()
    for adapter in list(peft_model.peft_config):
        selected = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter)
        wanted.update(id(v) for v in selected.values())
    keep = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    keep.update(
        f"{name}.{pname}"
        for name, module in _lora_experts(peft_model).items()
        for pname, _ in module.named_parameters()
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if id(value) in wanted or key in keep:
            value = full[key]
            out[key] = value.detach().to("cpu") if not _is_dtensor(value) else _full_tensor(value)
    return out


def install_save(peft_model: Any) -> None:
    """Make ``peft_model.save_pretrained`` call :func:`save_adapter` (instance attribute)."""

    def save_pretrained(self: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        save_adapter(self, save_directory, **kwargs)

    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)


def _size_mismatches(error: BaseException) -> list[str]:
    lines = [line.strip() for line in str(error).splitlines()]
    return [line for line in lines if line.startswith("size mismatch for")]


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> Any:
    """Load a PEFT adapter directory into a kt-wrapped model; returns the ``PeftModel``.

    Works on a bare wrapped model (a ``PeftModel`` is created) and on a ``PeftModel`` (the
    adapter is added under ``adapter_name``). kt's LoRA experts saved with the adapter are
    loaded into the model's LoRA experts (which ``KTConfig.lora_experts`` must have created).

    Raises:
        KTAdapterError: a tensor's shape differs from the model's (names listed), or the
            adapter has LoRA experts the model lacks (or of another size).
    """
    from peft import PeftModel

    directory = Path(adapter_dir)
    if not (directory / "adapter_config.json").is_file():
        raise KTAdapterError(
            f"{directory} is not a PEFT adapter directory (no adapter_config.json)"
        )
    ensure_installed()
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(
                str(directory), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
            )
            peft_model = model
        else:
            peft_model = PeftModel.from_pretrained(
                model,
                str(directory),
                adapter_name=adapter_name,
                is_trainable=is_trainable,
                **kwargs,
            )
    except RuntimeError as exc:
        mismatched = _size_mismatches(exc)
        if not mismatched:
            raise
        raise KTAdapterError(
            f"adapter {directory} does not fit this model (trained on another model?); shape "
            f"mismatch for {len(mismatched)} tensor(s): "
            + "; ".join(mismatched[:8])
            + (" ..." if len(mismatched) > 8 else "")
        ) from exc
    _load_extras(peft_model, directory, trainable=is_trainable)
    install_save(peft_model)
    return peft_model


def _load_extras(model: nn.Module, directory: Path, *, trainable: bool) -> None:
    path = directory / LORA_EXPERTS_FILE
    experts = {_canonical(n): m for n, m in _lora_experts(model).items()}
    if not path.is_file():
        return
    from safetensors.torch import load_file

    state = load_file(str(path))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, pname = key.rpartition(".")
        by_module.setdefault(module, {})[pname] = value
    missing = sorted(set(by_module) - set(experts))
    if missing:
        raise KTAdapterError(
            f"adapter {directory} has LoRA experts for {missing[:4]} but the "
            "model has none there; wrap it with KTConfig(lora_experts=N, "
            "lora_expert_intermediate_size=W) matching the adapter"
        )
    for name, tensors in by_module.items():
        module = experts[name]
        for pname, value in tensors.items():
            p = getattr(module, pname)
            if tuple(p.shape) != tuple(value.shape):
                raise KTAdapterError(
                    f"LoRA experts {name}.{pname}: adapter {list(value.shape)} "
                    f"vs model {list(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(value)
        module.requires_grad_(trainable)
