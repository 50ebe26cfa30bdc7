"""Merge a LoRA adapter into its base checkpoint, streaming the checkpoint one tensor at a time.

:func:`export_merged` writes a Hugging Face checkpoint that stock ``from_pretrained`` loads: the
base model's safetensors shards with every LoRA delta added to the weight it adapts, the same
tensor names, on-disk layout and shard files as the base (per-expert or fused experts, as the
base stores them, so transformers converts them at load exactly as it converts the base), plus
the base's ``config.json``, generation config and tokenizer files.

How, and why this way:

* The model is never instantiated with real weights. A ``meta``-device model (no memory) gives
  the parameter names and shapes, PEFT itself injects the adapter into it (so its rank, alpha,
  ``rank_pattern``, ``alpha_pattern`` and rsLoRA scaling rules apply unchanged), and
  transformers' own checkpoint conversion rules map each on-disk key to the parameter it loads
  into. Routed-expert keys are mapped through the kt-models registry (the per-expert / fused
  names that :class:`kt_models.CheckpointReader` reads).
* Output shards are written tensor by tensor: the safetensors header is computed from the base's
  headers first, then each tensor is read (:class:`kt_models.CheckpointReader`: memory mapped,
  cast or FP8-dequantized, unmapped again), merged in float32, cast and appended; fused 3-D
  expert tensors go one expert at a time. Peak memory is the adapter plus the largest 2-D tensor
  (in float32 when it is merged; usually the embeddings or ``lm_head``) or one expert matrix,
  plus its output copy: never a whole shard and never the model.
* The output is written into a temporary directory beside the target and renamed into place at the
  end: a crash or Ctrl-C leaves the previous state, never a half-written checkpoint.

Merged LoRA kinds: PEFT ``lora.Linear`` (attention, dense and shared MLPs, ``lm_head``, linear
routers): ``W += s · B @ A``; PEFT ``target_parameters`` on 2-D parameters (e.g. a router weight)
the same way; and ``target_parameters`` on fused 3-D experts (``gate_up_proj``: ``E x 2I x H``,
``down_proj``: ``E x H x I``), where PEFT's ``ParamWrapper`` stores ``lora_A`` as ``(E·r) x in``
(expert-major: rows ``e·r … e·r + r - 1``) and ``lora_B`` as ``out x (r·E)`` (expert-fastest:
column ``k·E + e``), so ``ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]``. Everything else (DoRA,
``modules_to_save``, embedding or convolution LoRA, LoRA bias, other PEFT methods, kt's LoRA
experts) is refused with a :class:`ExportError` naming it.

FP8 base checkpoints (DeepSeek-style ``weight_scale_inv`` block scales): every FP8 weight is
dequantized and written in the output dtype (``"auto"``: bfloat16), the scale tensors are dropped
and ``quantization_config`` is removed from ``config.json``; the export is then about twice the
size of the FP8 base. Other quantized checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXPORT_DTYPES", "ExportError", "ExportResult", "export_merged"]

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

_ST_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_ST_DTYPES = {name: dtype for dtype, name in _ST_NAMES.items()}
_FLOAT = {"BF16", "F16", "F32", "F64"}
_FP8 = {"F8_E4M3", "F8_E5M2"}
_SCALE_SUFFIX = "_scale_inv"
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
)
_WEIGHT_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
_ADAPTER = "default"

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


class ExportError(ValueError):
    """The adapter, the base checkpoint or the output directory cannot be used for an export;
    the message names the file, tensor or feature and says why."""


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


# ---------------------------------------------------------------------------------------------
# LoRA targets


@dataclass
class _Target:
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


def _lora_targets(
    model: torch.nn.Module, adapter_state: dict[str, torch.Tensor], adapter_dir: Path
) -> dict[str, _Target]:
    """Every LoRA layer PEFT injected into the meta ``model``, with the adapter's tensors."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    targets: dict[str, _Target] = {}
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
        if _ADAPTER not in module.lora_A:
            continue
        keys = {}
        for kind in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{kind}.weight"
            keys[kind] = key
            expected[key] = tuple(getattr(module, kind)[_ADAPTER].weight.shape)
        saved_base = f"base_model.model.{name}.base_layer.weight"
        if type(module) is LoraLinear and saved_base in adapter_state:
            expected[saved_base] = shape
        scaling = float(module.scaling[_ADAPTER])
        targets[param] = _Target(
            name=name,
            param=param,
            shape=shape,
            lora_a=adapter_state.get(keys["lora_A"], torch.empty(0)),
            lora_b=adapter_state.get(keys["lora_B"], torch.empty(0)),
            scaling=scaling,
            rank=int(module.r[_ADAPTER]),
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


# ---------------------------------------------------------------------------------------------
# inputs


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
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


def _read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
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


def _resolve_base(
    base_model: str | os.PathLike[str] | None, adapter_cfg: dict[str, Any], adapter_dir: Path
) -> Path:
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


def _check_output(output: Path, overwrite: bool, *inputs: Path) -> None:
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


def _meta_model(config: Any, trust_remote_code: bool) -> torch.nn.Module:
    from kt_models.auto_class import auto_model_class

    cls = auto_model_class(config)
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------
# disk key -> what to add to it


#: Adds LoRA deltas to a float32 base tensor, or to its slice ``index`` (one expert) when given.
_Op = Callable[[torch.Tensor, "int | None"], None]


@dataclass
class _Plan:
    """Where LoRA deltas go on disk: ``ops[disk_key]`` adds its deltas to a float32 tensor."""

    ops: dict[str, list[_Op]] = field(default_factory=dict)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Base weights taken from the adapter instead of the checkpoint.
    replace: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, shape: tuple[int, ...], op: _Op) -> None:
        self.ops.setdefault(key, []).append(op)
        self.expected[key] = shape


def _disk_names(reader: Any, model: torch.nn.Module) -> dict[str, str]:
    """In-model parameter name -> on-disk key, by transformers' own renaming rules, for every
    key that loads into one parameter as is (keys that a converter fuses, such as per-expert
    weights, are left out; the registry maps those)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict.fromkeys(model.state_dict())
    disk_of: dict[str, str] = {}
    for key in reader.keys():
        if key.endswith(_SCALE_SUFFIX):
            continue
        renamed, pattern = rename_source_key(
            key, renamings, converters, model.base_model_prefix, meta_state
        )
        if pattern is None:
            disk_of.setdefault(renamed, key)
    return disk_of


def _plan_merges(reader: Any, disk_of: dict[str, str], targets: dict[str, _Target]) -> _Plan:
    spec = reader.spec
    plan = _Plan()
    experts_of = {
        f"{spec.layers_path}.{layer}.{spec.moe_block_attr}.{spec.experts_attr}": layer
        for layer in reader.moe_layer_indices
    }
    for target in targets.values():
        owner, _, pname = target.param.rpartition(".")
        if len(target.shape) == 3:
            layer = experts_of.get(owner)
            if layer is None or pname not in ("gate_up_proj", "down_proj"):
                raise ExportError(
                    f"LoRA on the 3-D parameter {target.param}: only the routed "
                    "experts' gate_up_proj / down_proj of an MoE layer are merged"
                )
            _plan_experts(plan, reader, target, layer, pname.removesuffix("_proj"))
            continue
        if len(target.shape) != 2:
            raise ExportError(
                f"LoRA on {target.param} of shape {target.shape}: only 2-D weights "
                "and 3-D experts are merged"
            )
        key = disk_of.get(target.param)
        if key is None:
            raise ExportError(
                f"LoRA target {target.param} has no tensor of its own in the base "
                "checkpoint (a weight tied to another, e.g. lm_head with "
                "tie_word_embeddings?); such adapters cannot be merged tensor by "
                "tensor"
            )
        plan.add(key, target.shape, _adder(target.delta))
        if target.base_weight is not None:
            plan.replace[key] = target.base_weight
    return plan


def _adder(delta: Callable[[], torch.Tensor]) -> _Op:
    def op(t: torch.Tensor, index: int | None) -> None:
        t.add_(delta())

    return op


def _plan_experts(plan: _Plan, reader: Any, target: _Target, layer: int, which: str) -> None:
    spec = reader.spec
    num_experts, out_dim, in_dim = target.shape
    inter = out_dim // 2 if which == "gate_up" else in_dim
    if reader.layout(layer) == "per_expert":
        for e in range(num_experts):
            if which == "gate_up":
                for proj, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))):
                    key = spec.checkpoint_expert_key(layer, e, proj)
                    plan.add(
                        key,
                        (inter, in_dim),
                        _adder(lambda e=e, rows=rows: target.expert_delta(e, rows)),
                    )
            else:
                key = spec.checkpoint_expert_key(layer, e, "down")
                plan.add(key, (out_dim, in_dim), _adder(lambda e=e: target.expert_delta(e)))
    else:
        key = spec.checkpoint_fused_key(layer, which)
        stored = reader.tensor_info(key).shape
        transposed = (
            spec.checkpoint_fused_transposed
            and stored != target.shape
            and stored == (num_experts, in_dim, out_dim)
        )
        shape = (num_experts, in_dim, out_dim) if transposed else target.shape

        def op(t: torch.Tensor, index: int | None) -> None:
            # 3-D tensors are streamed one expert (index) at a time
            for e in range(num_experts) if index is None else (index,):
                d = target.expert_delta(e)
                (t if index is not None else t[e]).add_(d.t() if transposed else d)

        plan.add(key, shape, op)


# ---------------------------------------------------------------------------------------------
# writing


def _shard_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return raw, offset


def _write_tensor(fh: Any, tensor: torch.Tensor) -> None:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel():
        fh.write(flat.view(torch.uint8).numpy().data)


@dataclass
class _ShardWriter:
    """Writes output shards: header first (from the base's headers), then tensor by tensor."""

    reader: Any
    plan: _Plan
    out_dtype: torch.dtype | None
    dropped: set[str]

    def dtype_of(self, stored: str) -> torch.dtype:
        """Output dtype of a tensor stored as ``stored`` (a safetensors dtype name)."""
        if stored in _FP8:
            return self.out_dtype or torch.bfloat16
        if stored in _FLOAT:
            return self.out_dtype or _ST_DTYPES[stored]
        return _ST_DTYPES[stored]

    def pieces(self, key: str) -> Iterator[torch.Tensor]:
        """Output tensor ``key`` in consecutive pieces: 3-D tensors (fused experts) one expert
        at a time, everything else whole; LoRA deltas added in float32."""
        reader, info = self.reader, self.reader.tensor_info(key)
        if info.dtype not in _FP8 and info.dtype not in _FLOAT:
            yield reader.get_tensor(key)
            return
        ops = self.plan.ops.get(key, [])
        want = self.dtype_of(info.dtype)
        compute = torch.float64 if info.dtype == "F64" else torch.float32
        read = compute if ops else want
        saved = self.plan.replace.get(key)
        parts: Iterator[tuple[int | None, torch.Tensor]]
        if saved is not None:
            parts = iter([(None, saved.to(read, copy=True))])
        elif len(info.shape) == 3:
            parts = ((e, reader.get_slice(key, e, dtype=read)) for e in range(info.shape[0]))
        else:
            parts = iter([(None, reader.get_tensor(key, dtype=read))])
        for index, t in parts:
            for op in ops:
                op(t, index)
            yield t if t.dtype == want else t.to(want)

    def write(self, path: Path, keys: list[str]) -> tuple[int, int]:
        """Write ``keys`` as the safetensors file ``path``; ``(data bytes, tensors merged)``."""
        entries = []
        for key in keys:
            info = self.reader.tensor_info(key)
            entries.append((key, self.dtype_of(info.dtype), info.shape))
        header, data_size = _shard_header(entries)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            for key, kind, shape in entries:
                numel = 0
                for piece in self.pieces(key):
                    if piece.dtype != kind:  # pragma: no cover
                        raise RuntimeError(f"internal: {key} came out {piece.dtype}, not {kind}")
                    _write_tensor(fh, piece)
                    numel += piece.numel()
                    del piece
                if numel != torch.Size(shape).numel():  # pragma: no cover
                    raise RuntimeError(f"internal: {key} wrote {numel} values, planned {shape}")
        return data_size, sum(key in self.plan.ops for key in keys)


def _copy_side_files(base: Path, out: Path, config: dict[str, Any]) -> tuple[str, ...]:
    copied = []
    for f in sorted(base.iterdir()):
        if (
            not f.is_file()
            or f.name.startswith(".")
            or f.name == "config.json"
            or f.name in _WEIGHT_FILES
            or f.name.endswith(_WEIGHT_SUFFIXES)
        ):
            continue
        shutil.copy2(f, out / f.name)
        copied.append(f.name)
    (out / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return ("config.json", *copied)


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
    adapter_cfg = _read_adapter_config(adapter_dir)
    base = _resolve_base(base_model, adapter_cfg, adapter_dir)
    output = Path(output_dir).expanduser()
    _check_output(output, overwrite, base, adapter_dir)

    config_raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    qcfg = config_raw.get("quantization_config") or {}
    fp8_base = isinstance(qcfg, dict) and qcfg.get("quant_method") == "fp8"
    if qcfg and not fp8_base:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        raise ExportError(
            f"base {base} is quantized with {method!r}; kt-sft export merges into "
            "float or FP8 block-scaled checkpoints only"
        )
    reader = CheckpointReader(base)
    model = _meta_model(reader.config, trust_remote_code)
    trained_on = (adapter_cfg.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != type(model).__name__:
        raise ExportError(
            f"adapter {adapter_dir} was trained on a {trained_on}, but the base "
            f"{base} is a {type(model).__name__}"
        )

    disk_of = _disk_names(reader, model)

    from peft import LoraConfig, inject_adapter_in_model

    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    lora_config.inference_mode = True
    try:
        with warnings.catch_warnings():
            # PEFT checks rank / alpha patterns against target_modules before it wraps the
            # target_parameters they apply to; the shapes are checked below instead
            warnings.filterwarnings(
                "ignore", message=r".*_pattern keys did not match", category=RuntimeWarning
            )
            inject_adapter_in_model(
                lora_config, model, adapter_name=_ADAPTER, low_cpu_mem_usage=True
            )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ExportError(
            f"adapter {adapter_dir} does not fit the base model {base}: {exc}"
        ) from exc
    targets = _lora_targets(model, _read_adapter_weights(adapter_dir), adapter_dir)
    plan = _plan_merges(reader, disk_of, targets)
    del model

    dropped: set[str] = set()  # the block scales of FP8 weights, which are dequantized
    for key in reader.keys():
        info = reader.tensor_info(key)
        if info.dtype in _FP8:
            if key + _SCALE_SUFFIX not in reader:
                raise ExportError(
                    f"FP8 tensor {key} in {info.file} has no {key}{_SCALE_SUFFIX} "
                    "block scales; kt-sft export cannot dequantize it"
                )
            dropped.add(key + _SCALE_SUFFIX)
        elif info.dtype not in _ST_DTYPES:
            raise ExportError(f"tensor {key} in {info.file} has the unsupported dtype {info.dtype}")
    for key, shape in plan.expected.items():
        stored = reader.tensor_info(key).shape
        if stored != shape:
            raise ExportError(
                f"base tensor {key} has shape {stored}, the adapter's LoRA delta has {shape}"
            )

    config_out = dict(config_raw)
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

    writer = _ShardWriter(reader, plan, out_dtype, dropped)
    files: dict[Path, list[str]] = {}
    for key in reader.keys():
        if key not in dropped:
            files.setdefault(reader.tensor_info(key).file, []).append(key)
    weight_map: dict[str, str] = {}
    sizes: list[int] = []
    copied: tuple[str, ...] = ()

    def write_all(tmp: Path) -> None:
        nonlocal copied
        for i, (file, keys) in enumerate(sorted(files.items()), 1):
            size, merged = writer.write(tmp / file.name, keys)
            weight_map.update(dict.fromkeys(keys, file.name))
            sizes.append(size)
            if progress is not None:
                progress(
                    f"shard {i}/{len(files)} {file.name}: {len(keys)} tensors, {merged} merged, "
                    f"{size / 2**20:.1f} MiB"
                )
        if reader.index_path is not None:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / reader.index_path.name).write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        copied = _copy_side_files(base, tmp, config_out)

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(output, write_all)
    return ExportResult(
        output_dir=output,
        base_dir=base,
        adapter_dir=adapter_dir,
        shards=tuple(f.name for f in sorted(files)),
        merged_tensors=len(plan.ops),
        total_tensors=len(weight_map),
        lora_targets=len(targets),
        dtype=dtype,
        total_bytes=sum(sizes),
        seconds=time.monotonic() - start,
        dequantized_fp8=len(dropped),
        copied_files=copied,
    )
