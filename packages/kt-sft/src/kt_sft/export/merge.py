"""`export_merged`: base checkpoint + LoRA adapter -> one merged Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kt_sft.export.errors import ExportError
from kt_sft.export.inputs import (
    check_output,
    meta_model,
    read_adapter_config,
    read_adapter_weights,
    resolve_base,
)
from kt_sft.export.plan import disk_names, plan_merges
from kt_sft.export.targets import ADAPTER_NAME, lora_targets
from kt_sft.export.writer import FP8_DTYPES, SCALE_SUFFIX, ST_DTYPES, ShardWriter, copy_side_files

__all__ = ["EXPORT_DTYPES", "ExportResult", "export_merged"]

#: Accepted ``dtype`` values: ``"auto"`` keeps each tensor's stored dtype (FP8 becomes bfloat16).
EXPORT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_merged` wrote."""

    #: The merged checkpoint directory.
    output_dir: Path
    #: The base checkpoint and the adapter directory that were merged.
    base_dir: Path
    adapter_dir: Path
    #: Safetensors files written (same names as the base's).
    shards: tuple[str, ...]
    #: On-disk tensors that received a LoRA delta / that were written in all.
    merged_tensors: int
    total_tensors: int
    #: LoRA modules / parameters of the adapter merged.
    lora_targets: int
    #: Output dtype (``"auto"``: the base's).
    dtype: str
    #: Bytes of tensor data written.
    total_bytes: int
    seconds: float
    #: FP8 weights that were dequantized (their scale tensors dropped).
    dequantized_fp8: int = 0
    #: Other files copied from the base (config, tokenizer, ...).
    copied_files: tuple[str, ...] = field(default=())


def export_merged(
    adapter: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write base + LoRA adapter as one merged Hugging Face checkpoint in ``output_dir``.

    Args:
        adapter: a PEFT LoRA adapter directory, a kt-sft checkpoint directory, or a kt-sft
            ``output_dir`` (its ``adapter/``, else its newest ``checkpoint-<step>/``).
        output_dir: where the merged checkpoint goes; created. An existing non-empty directory
            is refused unless ``overwrite``, and then replaced only once the new checkpoint is
            complete.
        base_model: the base checkpoint directory, or ``"embedded"`` for the demo model;
            default: the adapter's ``base_model_name_or_path``.
        dtype: ``"auto"`` (each tensor in the base's dtype; FP8 weights as bfloat16),
            ``"bfloat16"``, ``"float16"`` or ``"float32"`` (every floating tensor). Merging
            itself always runs in float32.
        overwrite: replace a non-empty ``output_dir``.
        trust_remote_code: allow a base whose config needs remote code.
        progress: called with one line per written shard.

    Returns:
        An :class:`ExportResult`.

    Raises:
        FileNotFoundError: no adapter at ``adapter``.
        ExportError: an unsupported adapter feature, an adapter that does not fit the base
            (another architecture or size), a base that is not a local safetensors checkpoint,
            a quantized base other than FP8 block-scaled, or an unusable ``output_dir``.
        kt_models.KtModelsError: the base checkpoint is broken (missing shard, truncated file,
            wrong tensor shape) or its architecture is not a supported MoE.
    """
    from kt_models import CheckpointReader
    from kt_sft.train.artifacts import atomic_dir, find_adapter_dir

    start = time.monotonic()
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if sys.byteorder != "little":  # safetensors stores little-endian data
        raise ExportError("kt-sft export needs a little-endian machine")
    out_dtype = EXPORT_DTYPES[dtype]
    adapter_dir = find_adapter_dir(adapter)
    adapter_cfg = read_adapter_config(adapter_dir)
    base = resolve_base(base_model, adapter_cfg, adapter_dir)
    output = Path(output_dir).expanduser()
    check_output(output, overwrite, base, adapter_dir)

    config_raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    fp8_base = _is_fp8_base(config_raw, base)
    reader = CheckpointReader(base)
    model = meta_model(reader.config, trust_remote_code)
    trained_on = (adapter_cfg.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != type(model).__name__:
        raise ExportError(
            f"adapter {adapter_dir} was trained on a {trained_on}, but the base "
            f"{base} is a {type(model).__name__}"
        )
    disk_of = disk_names(reader, model)
    _inject_adapter(model, adapter_dir, base)
    targets = lora_targets(model, read_adapter_weights(adapter_dir), adapter_dir)
    plan = plan_merges(reader, disk_of, targets)
    del model

    dropped = _fp8_scale_keys(reader)
    for key, shape in plan.expected.items():
        stored = reader.tensor_info(key).shape
        if stored != shape:
            raise ExportError(
                f"base tensor {key} has shape {stored}, the adapter's LoRA delta has {shape}"
            )
    config_out = _output_config(config_raw, out_dtype, fp8_base=fp8_base)

    writer = ShardWriter(reader, plan, out_dtype, dropped)
    files: dict[Path, list[str]] = {}
    for key in reader.keys():
        if key not in dropped:
            files.setdefault(reader.tensor_info(key).file, []).append(key)
    written = _Written()

    def write_all(tmp: Path) -> None:
        _write_shards(tmp, writer, files, written, progress)
        if reader.index_path is not None:
            index = {"metadata": {"total_size": sum(written.sizes)}, "weight_map": written.weights}
            (tmp / reader.index_path.name).write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        written.copied = copy_side_files(base, tmp, config_out)

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(output, write_all)
    return ExportResult(
        output_dir=output,
        base_dir=base,
        adapter_dir=adapter_dir,
        shards=tuple(f.name for f in sorted(files)),
        merged_tensors=len(plan.ops),
        total_tensors=len(written.weights),
        lora_targets=len(targets),
        dtype=dtype,
        total_bytes=sum(written.sizes),
        seconds=time.monotonic() - start,
        dequantized_fp8=len(dropped),
        copied_files=written.copied,
    )


def _is_fp8_base(config: dict[str, Any], base: Path) -> bool:
    """Whether the base is FP8 block-scaled; any other quantization is refused."""
    qcfg = config.get("quantization_config") or {}
    fp8_base = isinstance(qcfg, dict) and qcfg.get("quant_method") == "fp8"
    if qcfg and not fp8_base:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        raise ExportError(
            f"base {base} is quantized with {method!r}; kt-sft export merges into "
            "float or FP8 block-scaled checkpoints only"
        )
    return fp8_base


def _inject_adapter(model: torch.nn.Module, adapter_dir: Path, base: Path) -> None:
    """Let PEFT inject the adapter's LoRA layers into the meta model (its own rules for rank,
    alpha, patterns and rsLoRA scaling)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    lora_config.inference_mode = True
    try:
        with warnings.catch_warnings():
            # PEFT checks rank / alpha patterns against target_modules before it wraps the
            # target_parameters they apply to; the shapes are checked later instead
            warnings.filterwarnings(
                "ignore", message=r".*_pattern keys did not match", category=RuntimeWarning
            )
            inject_adapter_in_model(
                lora_config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True
            )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ExportError(
            f"adapter {adapter_dir} does not fit the base model {base}: {exc}"
        ) from exc


def _fp8_scale_keys(reader: Any) -> set[str]:
    """The block-scale tensors of the base's FP8 weights (dropped: the weights are written
    dequantized); refuses FP8 without scales and dtypes safetensors export cannot write."""
    dropped: set[str] = set()
    for key in reader.keys():
        info = reader.tensor_info(key)
        if info.dtype in FP8_DTYPES:
            if key + SCALE_SUFFIX not in reader:
                raise ExportError(
                    f"FP8 tensor {key} in {info.file} has no {key}{SCALE_SUFFIX} "
                    "block scales; kt-sft export cannot dequantize it"
                )
            dropped.add(key + SCALE_SUFFIX)
        elif info.dtype not in ST_DTYPES:
            raise ExportError(f"tensor {key} in {info.file} has the unsupported dtype {info.dtype}")
    return dropped


def _output_config(
    config: dict[str, Any], out_dtype: torch.dtype | None, *, fp8_base: bool
) -> dict[str, Any]:
    """The base's config.json for the merged checkpoint: no quantization_config after FP8
    dequantization, and the dtype the tensors were written in."""
    config_out = dict(config)
    if fp8_base:
        config_out.pop("quantization_config", None)
    out_name = (
        str(out_dtype).removeprefix("torch.")
        if out_dtype is not None
        else ("bfloat16" if fp8_base else None)
    )
    if out_name is not None:
        config_out["dtype"] = out_name
        if "torch_dtype" in config_out:
            config_out["torch_dtype"] = out_name
    return config_out


@dataclass
class _Written:
    """What the shards of an export hold, filled in while they are written."""

    weights: dict[str, str] = field(default_factory=dict)  # tensor key -> shard file name
    sizes: list[int] = field(default_factory=list)  # data bytes per shard
    copied: tuple[str, ...] = ()  # other files copied from the base


def _write_shards(
    tmp: Path,
    writer: ShardWriter,
    files: dict[Path, list[str]],
    written: _Written,
    progress: Callable[[str], None] | None,
) -> None:
    for i, (file, keys) in enumerate(sorted(files.items()), 1):
        size, merged = writer.write(tmp / file.name, keys)
        written.weights.update(dict.fromkeys(keys, file.name))
        written.sizes.append(size)
        if progress is not None:
            progress(
                f"shard {i}/{len(files)} {file.name}: {len(keys)} tensors, {merged} merged, "
                f"{size / 2**20:.1f} MiB"
            )
