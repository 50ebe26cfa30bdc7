"""Stream routed-expert weights out of safetensors checkpoints, one MoE layer at a time.

A checkpoint is a directory holding ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` plus its shards, or a single ``.safetensors`` file. Opening a
:class:`CheckpointReader` reads only the JSON headers and checks them (every shard exists, every
key of the index is in its shard, no file is truncated). :meth:`CheckpointReader.layer_experts`
then memory-maps just the shards that hold one layer's experts, copies each expert matrix into the
output (casting, or dequantizing FP8 block by block) and unmaps them again, so peak memory is one
layer's output plus one expert matrix, whatever the checkpoint's size.

On-disk layouts: per-expert keys (``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``; what
real HF checkpoints and transformers 5 ``save_pretrained`` write) and fused keys
(``model.layers.{l}.mlp.experts.gate_up_proj``, ``E x 2I x H``, or ``E x H x 2I`` for
architectures that store them transposed). Float tensors: BF16, FP16, FP32, FP64, and FP8
(e4m3/e5m2) with DeepSeek-style ``weight_scale_inv`` block scales.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from kt_models.config_fields import has_field
from kt_models.errors import (
    ConfigFieldError,
    CorruptCheckpointError,
    MissingScaleError,
    MissingShardError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedTensorDtypeError,
)
from kt_models.fp8 import SCALE_SUFFIX, dequantize_fp8_blockwise, fp8_block_size
from kt_models.registry import ArchSpec, get_arch_spec
from kt_models.safetensors_file import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    STORED_DTYPES,
    ShardMaps,
    TensorInfo,
    read_safetensors_header,
)
from kt_models.weights import ExpertWeights

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointReader",
    "TensorInfo",
    "dequantize_fp8_blockwise",
    "read_safetensors_header",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _load_config(config_dir: Path) -> tuple[Any, dict[str, Any], Path]:
    path = config_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MissingShardError(
            "checkpoint has no config.json; pass config= explicitly", path=path
        ) from exc
    except ValueError as exc:
        raise CorruptCheckpointError(f"config.json is not valid JSON ({exc})", path=path) from exc
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(config_dir))
    except (ValueError, KeyError):
        from transformers import PretrainedConfig

        config = PretrainedConfig.from_dict(raw)
    return config, raw, path


class CheckpointReader:
    """Reads routed-expert weights from a safetensors checkpoint, one MoE layer at a time.

    Args:
        path: a checkpoint directory (``config.json`` + ``model.safetensors`` or
            ``model.safetensors.index.json``), an index file, or a single ``.safetensors`` file
            (its config is the ``config.json`` beside it unless ``config`` is given).
        config: the model config (transformers config or ``config.json`` dict); read from the
            checkpoint when omitted.
        spec: the registry entry; looked up from the config when omitted.

    Raises:
        MissingShardError, MissingTensorError, CorruptCheckpointError: the index names a file
            that does not exist or a key its shard lacks, or a file is truncated/unparsable.
        ConfigFieldError: ``config.json`` sets none of the aliases of a field the reader needs
            (instead of silently taking a transformers default).
        UnsupportedArchitectureError: the model type has no registry entry.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, config: Any = None, spec: ArchSpec | None = None
    ) -> None:
        path = Path(path)
        self.path = path
        self.index_path: Path | None = None
        if path.is_dir():
            root = path
            if (path / INDEX_NAME).is_file():
                self.index_path = path / INDEX_NAME
            elif (path / SINGLE_NAME).is_file():
                files = [path / SINGLE_NAME]
            else:
                found = sorted(path.glob("*.safetensors"))
                if len(found) != 1:
                    raise MissingShardError(
                        f"directory has neither {SINGLE_NAME} nor {INDEX_NAME}"
                        + (f" (and {len(found)} other .safetensors files)" if found else ""),
                        path=path,
                    )
                files = found
        elif path.is_file():
            root = path.parent
            if path.name.endswith(".json"):
                self.index_path = path
            else:
                files = [path]
        else:
            raise MissingShardError("checkpoint path does not exist", path=path)

        self._tensors: dict[str, TensorInfo] = {}
        if self.index_path is not None:
            self._read_index(self.index_path, root)
        else:
            for file in files:
                self._tensors.update(read_safetensors_header(file))

        self.config_path: Path | None = None
        raw: Any
        if config is None:
            config, raw, self.config_path = _load_config(root)
        else:
            raw = config
        self.config = config
        self.spec = spec or get_arch_spec(config)
        self._check_config(raw)
        self.num_experts = self.spec.num_experts(config)
        self.hidden_size = self.spec.hidden_size(config)
        self.intermediate_size = self.spec.intermediate_size(config)
        self.block_size = fp8_block_size(config)
        self._moe_layers = self.spec.moe_layer_indices(config)

    # ---- opening -----------------------------------------------------------------------------

    def _read_index(self, index_path: Path, root: Path) -> None:
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"index is not a valid safetensors index ({exc})", path=index_path
            ) from exc
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(str(name), []).append(key)
        for name, keys in by_file.items():
            file = _shard_path(root, name, index_path, keys[0])
            if not file.is_file():
                raise MissingShardError(
                    f"shard named by {index_path.name} does not exist ({len(keys)} tensors map "
                    "to it)",
                    path=file,
                    key=keys[0],
                )
            header = read_safetensors_header(file)
            for key in keys:
                if key not in header:
                    raise MissingTensorError(
                        f"{index_path.name} maps this key to a shard that does not contain it",
                        path=file,
                        key=key,
                    )
                self._tensors[key] = header[key]

    def _check_config(self, raw: Any) -> None:
        spec = self.spec
        if spec.discovered is not None:
            return  # sizes and MoE layers come from the module tree, not from config fields
        needed = {
            "number of routed experts": spec.num_experts_fields,
            "number of experts per token (top-k)": spec.top_k_fields,
            "hidden size": spec.hidden_size_fields,
            "routed expert intermediate size": spec.intermediate_size_fields,
        }
        where = f" in {self.config_path}" if self.config_path else ""
        for what, fields in needed.items():
            if not has_field(raw, fields):
                raise ConfigFieldError(
                    f"config{where} (model_type={spec.model_type!r}) does not set the {what}: "
                    f"none of {', '.join(fields)} is present",
                    fields=tuple(fields),
                )

    # ---- metadata ----------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint."""
        return sorted({info.file for info in self._tensors.values()})

    @property
    def moe_layer_indices(self) -> list[int]:
        """Decoder layers with routed experts."""
        return list(self._moe_layers)

    def keys(self) -> list[str]:
        """Every tensor key in the checkpoint."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def tensor_info(self, key: str) -> TensorInfo:
        """Header entry of ``key`` (``MissingTensorError`` when absent)."""
        try:
            return self._tensors[key]
        except KeyError:
            raise MissingTensorError(
                "tensor is not in the checkpoint", path=self.index_path or self.path, key=key
            ) from None

    def layout(self, layer_idx: int) -> Literal["per_expert", "fused"]:
        """How layer ``layer_idx``'s experts are stored on disk."""
        self._check_layer(layer_idx)
        if self.spec.checkpoint_expert_key(layer_idx, 0, "gate") in self._tensors:
            return "per_expert"
        if self.spec.checkpoint_fused_key(layer_idx, "gate_up") in self._tensors:
            return "fused"
        raise MissingTensorError(
            f"no routed-expert weights for layer {layer_idx}: neither the per-expert key nor "
            f"the fused key {self.spec.checkpoint_fused_key(layer_idx, 'gate_up')!r} is present",
            path=self.index_path or self.path,
            key=self.spec.checkpoint_expert_key(layer_idx, 0, "gate"),
        )

    def expert_keys(self, layer_idx: int) -> list[str]:
        """The on-disk keys (weights and their scales) of layer ``layer_idx``'s experts."""
        if self.layout(layer_idx) == "fused":
            keys = [self.spec.checkpoint_fused_key(layer_idx, w) for w in ("gate_up", "down")]
        else:
            keys = [
                self.spec.checkpoint_expert_key(layer_idx, e, p)
                for e in range(self.num_experts)
                for p in ("gate", "up", "down")
            ]
        return keys + [k + SCALE_SUFFIX for k in keys if k + SCALE_SUFFIX in self._tensors]

    def non_expert_keys(self) -> list[str]:
        """Keys that are not routed-expert weights of any MoE layer (nor their scales)."""
        prefixes = tuple(self.spec.checkpoint_experts_prefix(i) + "." for i in self._moe_layers)
        return [k for k in self._tensors if not k.startswith(prefixes)]

    def _check_layer(self, layer_idx: int) -> None:
        if layer_idx not in self._moe_layers:
            raise ValueError(
                f"{self.spec.model_type}: decoder layer {layer_idx} has no routed "
                f"experts; MoE layers are {self._moe_layers}"
            )

    # ---- reading -----------------------------------------------------------------------------

    def _plan(self, key: str, shape: tuple[int, ...]) -> tuple[TensorInfo, TensorInfo | None]:
        """Check ``key`` (shape, dtype, FP8 scales) without reading any data."""
        info = self.tensor_info(key)
        if info.shape != shape:
            raise TensorShapeError(
                f"tensor has shape {info.shape}, the config implies {shape}",
                path=info.file,
                key=key,
            )
        if info.dtype in FLOAT_DTYPES:
            return info, None
        if info.dtype not in FP8_DTYPES:
            raise UnsupportedTensorDtypeError(
                f"weights stored as {info.dtype} are not supported (BF16, F16, F32, F64, or "
                "F8_E4M3/F8_E5M2 with weight_scale_inv block scales)",
                path=info.file,
                key=key,
            )
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self._tensors:
            raise MissingScaleError(
                f"FP8 weight has no block scales ({scale_key!r} is absent)", path=info.file, key=key
            )
        scale = self._tensors[scale_key]
        b0, b1 = self.block_size
        lead, (rows, cols) = shape[:-2], shape[-2:]
        want = (*lead, math.ceil(rows / b0), math.ceil(cols / b1))
        if scale.shape != want:
            raise TensorShapeError(
                f"block scales have shape {scale.shape}; weight {shape} with "
                f"{b0}x{b1} blocks needs {want}",
                path=scale.file,
                key=scale_key,
            )
        if scale.dtype not in FLOAT_DTYPES:
            raise UnsupportedTensorDtypeError(
                f"block scales stored as {scale.dtype}", path=scale.file, key=scale_key
            )
        return info, scale

    def _copy_into(
        self,
        out: torch.Tensor,
        handles: ShardMaps,
        info: TensorInfo,
        key: str,
        scale: TensorInfo | None,
        index: int | None = None,
        transpose: bool = False,
    ) -> None:
        """Read ``key`` (or its slice ``index`` along dim 0) into ``out``."""
        try:
            if index is None:
                src = handles.get(info.file).get_tensor(key)
            else:
                src = handles.get(info.file).get_slice(key)[index]
            if scale is not None:
                s = (
                    handles.get(scale.file).get_tensor(key + SCALE_SUFFIX)
                    if index is None
                    else handles.get(scale.file).get_slice(key + SCALE_SUFFIX)[index]
                )
                if transpose:
                    tmp = dequantize_fp8_blockwise(src, s, self.block_size, out.dtype)
                    out.copy_(tmp.t())
                else:
                    dequantize_fp8_blockwise(src, s, self.block_size, out.dtype, out=out)
            else:
                out.copy_(src.t() if transpose else src)
            del src
            handles.consumed(
                info.file, info.nbytes if index is None else info.nbytes // max(info.shape[0], 1)
            )
        except SafetensorError as exc:
            raise CorruptCheckpointError(
                f"cannot read tensor ({exc})", path=info.file, key=key
            ) from exc

    def _fused_transposed(self, key: str, model_shape: tuple[int, ...]) -> bool:
        """Whether a fused tensor is stored transposed (``E x in x out``).

        Only for architectures whose checkpoints do so; like transformers, the in-memory layout
        wins when both readings fit the shape.
        """
        if not self.spec.checkpoint_fused_transposed:
            return False
        shape = self.tensor_info(key).shape
        swapped = (model_shape[0], model_shape[2], model_shape[1])
        return shape != model_shape and shape == swapped

    def layer_experts(
        self, layer_idx: int, dtype: torch.dtype | None = torch.bfloat16
    ) -> ExpertWeights:
        """Read layer ``layer_idx``'s routed experts as ``gate_up`` (``E x 2I x H``) and ``down``.

        Each expert matrix is cast (or FP8-dequantized) straight into the preallocated output;
        only the shards holding this layer are mapped, and only for the duration of the call.
        ``dtype=None`` keeps the stored float dtype (FP8 becomes bfloat16). Every key, shape
        and scale is checked before any data is read, so a failing call returns nothing and
        allocates nothing.
        """
        self._check_layer(layer_idx)
        num_experts, hidden, inter = self.num_experts, self.hidden_size, self.intermediate_size
        spec = self.spec
        if self.layout(layer_idx) == "per_expert":
            plan = []
            for e in range(num_experts):
                for proj, shape in (
                    ("gate", (inter, hidden)),
                    ("up", (inter, hidden)),
                    ("down", (hidden, inter)),
                ):
                    key = spec.checkpoint_expert_key(layer_idx, e, proj)
                    plan.append((e, proj, key, *self._plan(key, shape)))
            out_dtype = dtype or _out_dtype(plan[0][3])
            gate_up = torch.empty((num_experts, 2 * inter, hidden), dtype=out_dtype)
            down = torch.empty((num_experts, hidden, inter), dtype=out_dtype)
            with ShardMaps() as handles:
                for e, proj, key, info, scale in plan:
                    dst = (
                        gate_up[e, :inter]
                        if proj == "gate"
                        else gate_up[e, inter:]
                        if proj == "up"
                        else down[e]
                    )
                    self._copy_into(dst, handles, info, key, scale)
            return ExpertWeights(gate_up=gate_up, down=down)

        gu_key = spec.checkpoint_fused_key(layer_idx, "gate_up")
        d_key = spec.checkpoint_fused_key(layer_idx, "down")
        gu_shape = (num_experts, 2 * inter, hidden)
        d_shape = (num_experts, hidden, inter)
        transposed = self._fused_transposed(gu_key, gu_shape) or self._fused_transposed(
            d_key, d_shape
        )
        if transposed:
            gu_shape, d_shape = ((num_experts, hidden, 2 * inter), (num_experts, inter, hidden))
        gu_info, gu_scale = self._plan(gu_key, gu_shape)
        d_info, d_scale = self._plan(d_key, d_shape)
        out_dtype = dtype or _out_dtype(gu_info)
        gate_up = torch.empty((num_experts, 2 * inter, hidden), dtype=out_dtype)
        down = torch.empty((num_experts, hidden, inter), dtype=out_dtype)
        with ShardMaps() as handles:
            for e in range(num_experts):
                self._copy_into(gate_up[e], handles, gu_info, gu_key, gu_scale, e, transposed)
                self._copy_into(down[e], handles, d_info, d_key, d_scale, e, transposed)
        return ExpertWeights(gate_up=gate_up, down=down)

    def iter_layer_experts(
        self, dtype: torch.dtype | None = torch.bfloat16
    ) -> Iterator[tuple[int, ExpertWeights]]:
        """``(layer_idx, weights)`` for every MoE layer, one layer in memory at a time."""
        for layer_idx in self._moe_layers:
            yield layer_idx, self.layer_experts(layer_idx, dtype)

    def get_tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, cast to ``dtype`` when given.

        An FP8 weight that has ``weight_scale_inv`` block scales is dequantized (to ``dtype``, or
        bfloat16); without scales it is returned as stored.
        """
        info = self.tensor_info(key)
        scale = None
        if (
            info.dtype in FP8_DTYPES
            and key + SCALE_SUFFIX in self._tensors
            and len(info.shape) in (2, 3)
        ):
            info, scale = self._plan(key, info.shape)
        stored = STORED_DTYPES.get(info.dtype)
        if stored is None:
            raise UnsupportedTensorDtypeError(
                f"unknown safetensors dtype {info.dtype}", path=info.file, key=key
            )
        out_dtype = dtype or (torch.bfloat16 if scale is not None else stored)
        out = torch.empty(info.shape, dtype=out_dtype)
        with ShardMaps() as handles:
            if scale is not None and len(info.shape) == 3:
                for e in range(info.shape[0]):
                    self._copy_into(out[e], handles, info, key, scale, e)
            else:
                self._copy_into(out, handles, info, key, scale)
        return out

    def get_slice(self, key: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor[index]`` of a 3-D tensor (one expert of a fused experts tensor), cast to
        ``dtype`` when given; only that slice is read.

        An FP8 slice that has ``weight_scale_inv`` block scales is dequantized (to ``dtype``, or
        bfloat16) with the slice's own scales, as :meth:`get_tensor` does for the whole tensor.
        """
        info = self.tensor_info(key)
        if len(info.shape) != 3:
            raise ValueError(f"get_slice reads 3-D tensors; {key!r} has shape {info.shape}")
        if not 0 <= index < info.shape[0]:
            raise IndexError(f"index {index} out of range for {key!r} of shape {info.shape}")
        scale = None
        if info.dtype in FP8_DTYPES and key + SCALE_SUFFIX in self._tensors:
            info, scale = self._plan(key, info.shape)
        stored = STORED_DTYPES.get(info.dtype)
        if stored is None:
            raise UnsupportedTensorDtypeError(
                f"unknown safetensors dtype {info.dtype}", path=info.file, key=key
            )
        out = torch.empty(
            info.shape[1:], dtype=dtype or (torch.bfloat16 if scale is not None else stored)
        )
        with ShardMaps() as handles:
            self._copy_into(out, handles, info, key, scale, index)
        return out

    def close(self) -> None:
        """Nothing stays mapped between calls; kept for symmetry with file objects."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.path)!r}, model_type={self.spec.model_type!r}, "
            f"files={len(self.files)}, moe_layers={len(self._moe_layers)})"
        )


def _shard_path(root: Path, name: str, index_path: Path, key: str) -> Path:
    """``root / name`` for a shard name from an index, which must stay inside ``root``: a
    relative path without ``..`` (checked on the name itself, so the symlinked blobs of a Hugging
    Face cache snapshot still resolve)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if (
        not name
        or pure.is_absolute()
        or PureWindowsPath(name).drive
        or any(part == ".." for part in pure.parts)
    ):
        raise CorruptCheckpointError(
            f"{index_path.name} names the shard {name!r}, which is outside the model directory "
            f"{root}; shard names must be relative paths inside it (no '..', not absolute)",
            path=index_path,
            key=key,
        )
    return root.joinpath(*pure.parts)


def _out_dtype(info: TensorInfo) -> torch.dtype:
    return torch.bfloat16 if info.dtype in FP8_DTYPES else STORED_DTYPES[info.dtype]
