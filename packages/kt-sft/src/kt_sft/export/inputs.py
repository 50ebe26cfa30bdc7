"""The inputs of an export, checked before anything is written: the adapter's config (with every
PEFT feature a plain ``W += s · B @ A`` does not reproduce refused by name) and weights, the base
checkpoint directory, the output directory, and the base architecture as a ``meta`` model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kt_sft.export.errors import ExportError

__all__ = [
    "check_output",
    "meta_model",
    "read_adapter_config",
    "read_adapter_weights",
    "resolve_base",
]

#: adapter_config.json fields that change what the adapter computes in a way a plain
#: ``W += s · B @ A`` does not reproduce: (field, is it set?, what to call it).
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_dora", bool, "DoRA (use_dora)"),
    ("modules_to_save", bool, "modules_to_save (fully trained copies of modules)"),
    ("trainable_token_indices", bool, "trainable_token_indices"),
    ("lora_bias", bool, "LoRA bias (lora_bias)"),
    ("fan_in_fan_out", bool, "fan_in_fan_out (Conv1D layers)"),
    ("layer_replication", bool, "layer_replication"),
    ("use_qalora", bool, "QALoRA (use_qalora)"),
    ("use_bdlora", bool, "BD-LoRA (use_bdlora)"),
    ("velora_config", bool, "VeLoRA (velora_config)"),
    ("kasa_config", bool, "KaSA (kasa_config)"),
    ("monteclora_config", bool, "MonteCLoRA (monteclora_config)"),
    ("arrow_config", bool, "Arrow routing (arrow_config)"),
    ("alora_invocation_tokens", bool, "activated LoRA (alora_invocation_tokens)"),
    ("megatron_config", bool, "Megatron parallel LoRA (megatron_config)"),
)

#: Initialisations that also rewrite the base weights; the adapter then only fits those
#: rewritten weights unless it was converted when saved (PEFT then records ``True``).
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json; refuses every adapter a plain merge does not reproduce."""
    path = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"{path} is not a JSON object")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ExportError(
            f"adapter {adapter_dir} is a {raw.get('peft_type')!r} PEFT adapter; "
            "kt-sft export merges LoRA adapters only"
        )
    for key, is_set, what in _UNSUPPORTED:
        if is_set(raw.get(key)):
            raise ExportError(
                f"adapter {adapter_dir} uses {what}, which kt-sft export does not merge"
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        raise ExportError(
            f"adapter {adapter_dir} was initialised with {init!r}, which also "
            "rewrites the base weights; save it with PEFT's "
            "path_initial_model_for_weight_conversion so it applies to the "
            "original base, then export that"
        )
    kt_meta = adapter_dir / "kt_adapter.json"
    if kt_meta.is_file():
        try:
            modules = json.loads(kt_meta.read_text(encoding="utf-8")).get("modules") or {}
        except (ValueError, AttributeError):
            modules = {}
        if modules:
            raise ExportError(
                f"adapter {adapter_dir} has kt LoRA experts (lora_experts > 0): "
                "extra always-active experts that the stock architecture has no "
                "place for, so they cannot be merged into a Hugging Face checkpoint"
            )
    return raw


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (adapter_model.safetensors, else adapter_model.bin)."""
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"cannot read {st} ({exc})") from exc
    binary = adapter_dir / "adapter_model.bin"
    if binary.is_file():
        state = torch.load(str(binary), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ExportError(f"{binary} does not hold a state dict")
        return state
    raise ExportError(f"adapter {adapter_dir} has no adapter_model.safetensors (nor .bin)")


def resolve_base(
    base_model: str | os.PathLike[str] | None, adapter_cfg: dict[str, Any], adapter_dir: Path
) -> Path:
    """The local base checkpoint directory: `base_model`, else the adapter's record of it."""
    name = str(base_model) if base_model is not None else adapter_cfg.get("base_model_name_or_path")
    if not name:
        raise ExportError(
            f"adapter {adapter_dir} does not record its base model "
            "(base_model_name_or_path); pass the base checkpoint directory"
        )
    if name == "embedded":
        from kt_sft.train.embedded import embedded_model_dir

        return embedded_model_dir(quiet=True)
    path = Path(name).expanduser()
    if not path.is_dir():
        where = "" if base_model is not None else " (the adapter's base_model_name_or_path)"
        raise ExportError(
            f"base model {name}{where} is not a local checkpoint directory; "
            "download it first (e.g. `hf download ORG/NAME --local-dir DIR`) and "
            "pass that directory"
        )
    if not (path / "config.json").is_file():
        raise ExportError(f"base model directory {path} has no config.json")
    return path


def check_output(output: Path, overwrite: bool, *inputs: Path) -> None:
    """Refuse an output directory that overlaps an input, or holds files without `overwrite`."""
    resolved = output.resolve()
    for p in inputs:
        rp = p.resolve()
        if resolved == rp or rp in resolved.parents or resolved in rp.parents:
            raise ExportError(f"output directory {output} overlaps the input {p}; choose another")
    if output.exists():
        if not output.is_dir():
            raise ExportError(f"output {output} exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise ExportError(
                f"output directory {output} is not empty; pass overwrite=True "
                "(--overwrite) to replace it"
            )


def meta_model(config: Any, trust_remote_code: bool) -> torch.nn.Module:
    """The base architecture on the ``meta`` device: names and shapes, no memory."""
    from kt_models.auto_class import auto_model_class

    cls = auto_model_class(config)
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)
