"""`KTransformersPlugin`: kt's settings for an accelerate / Trainer run, validated in one place.

Written like accelerate's plugins: every field defaults to ``None`` ("not set");
``__post_init__`` fills it, checks the values and raises ``ValueError``s naming the field. The
plugin holds settings only; :mod:`kt_accelerate.integration` acts on them.

Precedence for each setting:

1. the argument given to the plugin;
2. ``ACCELERATE_KT_<NAME>`` (what ``kt-accelerate launch`` exports from a config file);
3. the kt config file (``config_file`` / ``ACCELERATE_KT_CONFIG_FILE``: YAML or JSON);
4. ``KT_<NAME>`` (kt-sft's own environment variables; ``KTConfig`` reads those itself);
5. the built-in default.

``<NAME>`` is the upper-cased field name: the plugin's own fields (``ENGINE_PLACEMENT``,
``DIST_TIMEOUT``, ``ALLOW_WORLD_SIZE_CHANGE``) and every :class:`kt_sft.KTConfig` field
(``LORA_RANK``, ``NUM_THREADS``, ``BACKEND`` ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kt_sft import KTConfig
from kt_sft.config import ENV_VARS as KT_CONFIG_ENV_VARS

__all__ = [
    "ENV_PREFIX",
    "SUPPORTED_DISTRIBUTED_TYPES",
    "KTransformersPlugin",
    "load_config_file",
]

ENV_PREFIX = "ACCELERATE_KT_"
PLACEMENTS = ("per_node", "per_rank")
DEFAULT_DIST_TIMEOUT = 1800.0

#: accelerate distributed types kt runs under (DDP for the parameters kt does not own); FSDP
#: too, in its version 2 (see :meth:`KTransformersPlugin.check_fsdp_plugin`).
SUPPORTED_DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP")

_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}

_DDP_HINT = (
    "use DDP instead: `distributed_type: MULTI_GPU` in the accelerate config "
    "(`MULTI_CPU` on CPU) or `accelerate launch --multi_gpu`, without DeepSpeed or FSDP. "
    "With kt, DDP already keeps the routed experts once per node (in the CPU engine of "
    "each node's local rank 0), so ZeRO-3's memory saving is not needed for them"
)
_FSDP2_HINT = (
    "use FSDP2 (`distributed_type: FSDP` with `fsdp_config: {fsdp_version: 2}` in "
    "the accelerate config, or FullyShardedDataParallelPlugin(fsdp_version=2)), which "
    "shards the non-expert parameters while kt keeps the expert ones, or DDP "
    "(`distributed_type: MULTI_GPU`, `accelerate launch --multi_gpu`)"
)


def _str_to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"KTransformersPlugin.{name} must be a boolean (true/false), got {value!r}")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a kt config file (YAML or JSON mapping). A top-level ``kt`` or ``kt_config`` key
    holding a mapping is unwrapped, so the kt section of a larger file works too."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"KTransformersPlugin.config_file: {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"KTransformersPlugin.config_file: {str(p)!r} must hold a mapping of "
            f"settings, got {type(data).__name__}"
        )
    for key in ("kt", "kt_config"):
        inner = data.get(key)
        if isinstance(inner, Mapping) and len(data) == 1:
            data = inner
    return dict(data)


@dataclass
class KTransformersPlugin:
    """kt for accelerate and the HF Trainer: the engine's settings plus how several processes
    share it.

    Args:
        kt_config: the engine settings: a :class:`kt_sft.KTConfig`, a mapping (``kt_``-prefixed
            LLaMA-Factory names accepted), or ``None`` to build one from ``ACCELERATE_KT_*``,
            the config file and ``KT_*``.
        config_file: YAML/JSON file with kt settings (KTConfig keys and this plugin's keys).
            Env: ``ACCELERATE_KT_CONFIG_FILE``.
        engine_placement: ``"per_node"`` (default): each node's local rank 0 holds the engine
            and the expert weights, the node's other ranks send it their tokens;
            ``"per_rank"``: every rank holds its own engine (RAM × ranks, no token traffic).
        dist_timeout: seconds a rank waits for a peer in kt's exchanges before failing (a
            crashed peer is noticed at once; this bounds a hung one). Default 1800 (torch's and
            the Trainer's default); when set it must not exceed ``TrainingArguments.ddp_timeout``.
        allow_world_size_change: resuming a checkpoint saved by a different number of
            processes changes the global batch; by default that is an error, ``True`` makes it
            a warning.
    """

    kt_config: KTConfig | Mapping[str, Any] | None = field(
        default=None, metadata={"help": "KTConfig (or mapping) of the engine settings"}
    )
    config_file: str | None = field(
        default=None, metadata={"help": "YAML/JSON file with kt settings"}
    )
    engine_placement: str | None = field(
        default=None, metadata={"help": "per_node (one engine per node) or per_rank"}
    )
    dist_timeout: float | None = field(
        default=None, metadata={"help": "seconds to wait for a peer rank before failing"}
    )
    allow_world_size_change: bool | None = field(
        default=None, metadata={"help": "allow resuming with a different number of processes"}
    )

    def __post_init__(self) -> None:
        self._explicit = frozenset(
            f.name for f in fields(self) if getattr(self, f.name) is not None
        )
        if self.config_file is None:
            self.config_file = _env("CONFIG_FILE")
        file_data = load_config_file(self.config_file) if self.config_file else {}
        own = {f.name for f in fields(self)} - {"kt_config", "config_file"}
        file_own = {k: v for k, v in file_data.items() if k.lower() in own}
        file_kt = {k: v for k, v in file_data.items() if k.lower() not in own}

        def setting(name: str) -> Any:
            value = getattr(self, name)
            if value is None:
                value = _env(name.upper())
            if value is None:
                value = file_own.get(name)
            if value is None:
                value = os.environ.get(f"KT_{name.upper()}") or None
            return value

        placement = setting("engine_placement")
        self.engine_placement = (
            str(placement).strip().lower() if placement is not None else "per_node"
        )
        if self.engine_placement not in PLACEMENTS:
            raise ValueError(
                f"KTransformersPlugin.engine_placement must be one of "
                f"{', '.join(PLACEMENTS)}; got {placement!r}"
            )
        timeout = setting("dist_timeout")
        if timeout is not None:
            try:
                self.dist_timeout = float(timeout)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"KTransformersPlugin.dist_timeout must be a number of seconds, got {timeout!r}"
                ) from exc
            if not self.dist_timeout > 0:
                raise ValueError(f"KTransformersPlugin.dist_timeout must be > 0, got {timeout!r}")
        allow = setting("allow_world_size_change")
        self.allow_world_size_change = (
            _str_to_bool("allow_world_size_change", allow) if allow is not None else False
        )
        self.kt_config = self._build_kt_config(file_kt)
        self._check_launch_environment()

    # -- KTConfig -------------------------------------------------------------------------
    def _build_kt_config(self, file_kt: Mapping[str, Any]) -> KTConfig:
        value = self.kt_config
        if isinstance(value, KTConfig):
            return value
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(
                "KTransformersPlugin.kt_config must be a KTConfig, a mapping or None, "
                f"got {type(value).__name__}"
            )
        data: dict[str, Any] = {}
        if value is None:
            data.update(file_kt)
            for name in KT_CONFIG_ENV_VARS:
                raw = _env(name.upper())
                if raw is not None:
                    # An ACCELERATE_KT_ variable replaces the file's value, whatever its spelling.
                    for key in [k for k in data if k.lower() in (name, f"kt_{name}")]:
                        del data[key]
                    data[name] = raw
        else:
            data.update(value)
        try:
            return KTConfig.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"KTransformersPlugin.kt_config: {exc}") from exc

    @property
    def explicit_kt_settings(self) -> dict[str, Any]:
        """KTConfig fields set on purpose (argument, ACCELERATE_KT_*, file or KT_*), not
        defaults: the ones that must agree with a model wrapped elsewhere."""
        cfg = self.kt_config
        assert isinstance(cfg, KTConfig)
        out = {}
        for name in KT_CONFIG_ENV_VARS:
            if cfg.is_explicit(name) or os.environ.get(KT_CONFIG_ENV_VARS[name], "").strip():
                out[name] = getattr(cfg, name)
        return out

    def is_explicit(self, name: str) -> bool:
        """Whether the plugin field ``name`` was passed as an argument."""
        return name in self._explicit

    # -- distributed type -----------------------------------------------------------------
    def _check_launch_environment(self) -> None:
        """Refuse launch settings kt cannot run under (as exported by ``accelerate launch``)."""
        if _flag("ACCELERATE_USE_DEEPSPEED"):
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
            self.check_distributed_type("DEEPSPEED", zero_stage=int(stage) if stage else None)
        # `accelerate launch` exports FSDP_VERSION with ACCELERATE_USE_FSDP; without it the flag
        # is the one an Accelerator sets in its own process when given a plugin, which the
        # accelerator (KTAccelerator, KTTrainer) checks itself.
        version = os.environ.get("FSDP_VERSION", "").strip()
        if _flag("ACCELERATE_USE_FSDP") and version:
            self.check_distributed_type("FSDP", fsdp_version=int(version))
            if _flag("FSDP_OFFLOAD_PARAMS"):
                raise ValueError(_OFFLOAD_ERROR)
            if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
                raise ValueError(_RAM_EFFICIENT_ERROR)
            if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
                raise ValueError(_CHECKPOINT_WRAPPER_ERROR)

    def check_distributed_type(
        self,
        distributed_type: Any,
        *,
        zero_stage: int | None = None,
        fsdp_version: int | None = None,
    ) -> None:
        """Raise ``ValueError`` unless kt supports ``distributed_type`` (an accelerate
        ``DistributedType`` or its name); for ``FSDP``, ``fsdp_version`` must be 2."""
        name = str(getattr(distributed_type, "name", None) or distributed_type).upper()
        name = name.split(".")[-1]
        if name == "FSDP":
            if fsdp_version == 2:
                return
            raise ValueError(
                f"KTransformersPlugin: FSDP version {fsdp_version or 1} "
                "(FullyShardedDataParallel) is not supported: it flattens the parameters of "
                "each wrapped module into one buffer, but kt's engines read and write the expert "
                f"LoRA tensors in place; {_FSDP2_HINT}"
            )
        if name in SUPPORTED_DISTRIBUTED_TYPES:
            return
        if name == "DEEPSPEED":
            if zero_stage == 3:
                raise ValueError(
                    "KTransformersPlugin: DeepSpeed ZeRO-3 is not supported: it partitions every "
                    "parameter across ranks and gathers it on use, but kt's routed experts are "
                    "not torch parameters (they live packed in the CPU engine) and the engine "
                    f"binds the expert LoRA tensors in place; {_DDP_HINT}"
                )
            stage = f" ZeRO-{zero_stage}" if zero_stage is not None else ""
            raise ValueError(
                f"KTransformersPlugin: DeepSpeed{stage} is not supported: DeepSpeed reduces "
                "gradients through its own hooks, which never see the expert LoRA gradients "
                f"kt's engine writes; {_DDP_HINT}"
            )
        raise ValueError(
            f"KTransformersPlugin: distributed type {name} is not supported (kt runs under "
            f"{', '.join(SUPPORTED_DISTRIBUTED_TYPES)}); {_DDP_HINT}"
        )

    # -- TrainingArguments ----------------------------------------------------------------
    def check_training_args(self, args: Any) -> None:
        """Raise ``ValueError`` for ``TrainingArguments`` settings that contradict the plugin
        or that kt cannot honour."""
        deepspeed = getattr(args, "deepspeed", None)
        if deepspeed:
            self.check_distributed_type("DEEPSPEED", zero_stage=_zero_stage(deepspeed))
        fsdp_args = getattr(args, "fsdp_plugin_args", None)
        if getattr(args, "fsdp", None) and fsdp_args is not None:
            # What Trainer builds its FullyShardedDataParallelPlugin from (fsdp + fsdp_config).
            self.check_fsdp_plugin(SimpleNamespace(**fsdp_args))
        if getattr(args, "torch_compile", False):
            raise ValueError(
                "TrainingArguments.torch_compile=True conflicts with KTransformersPlugin: kt's "
                "routed experts run outside torch (CPU engine, cross-rank exchanges) and cannot "
                "be compiled; set torch_compile=False"
            )
        cfg = self.kt_config
        assert isinstance(cfg, KTConfig)
        if getattr(args, "use_cpu", False) and cfg.num_gpu_experts:
            raise ValueError(
                f"TrainingArguments.use_cpu=True conflicts with KTransformersPlugin.kt_config."
                f"num_gpu_experts={cfg.num_gpu_experts} (experts kept on the GPU); set "
                "num_gpu_experts=0 or train on a GPU"
            )
        ddp_timeout = getattr(args, "ddp_timeout", None)
        if self.dist_timeout is not None and ddp_timeout and self.dist_timeout > float(ddp_timeout):
            raise ValueError(
                f"KTransformersPlugin.dist_timeout={self.dist_timeout:g}s is longer than "
                f"TrainingArguments.ddp_timeout={ddp_timeout}s: DDP would give up first and "
                "hide which kt exchange stalled; make dist_timeout <= ddp_timeout"
            )

    def check_fsdp_plugin(self, fsdp_plugin: Any) -> None:
        """Raise ``ValueError`` for accelerate FSDP settings kt cannot run under: FSDP1, CPU
        offload of the parameters, ``cpu_ram_efficient_loading``, the plugin's
        ``activation_checkpointing``."""
        version = getattr(fsdp_plugin, "fsdp_version", None)
        self.check_distributed_type("FSDP", fsdp_version=version)
        offload = getattr(fsdp_plugin, "cpu_offload", None)
        if offload is True or type(offload).__name__ == "CPUOffloadPolicy":
            raise ValueError(_OFFLOAD_ERROR)
        if getattr(fsdp_plugin, "cpu_ram_efficient_loading", False):
            raise ValueError(_RAM_EFFICIENT_ERROR)
        if getattr(fsdp_plugin, "activation_checkpointing", False):
            raise ValueError(_CHECKPOINT_WRAPPER_ERROR)

    @property
    def timeout(self) -> float:
        """``dist_timeout`` with its default applied."""
        return self.dist_timeout if self.dist_timeout is not None else DEFAULT_DIST_TIMEOUT

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings (KTConfig as a dict)."""
        cfg = self.kt_config
        assert isinstance(cfg, KTConfig)
        return {
            "kt_config": cfg.to_dict(),
            "config_file": self.config_file,
            "engine_placement": self.engine_placement,
            "dist_timeout": self.timeout,
            "allow_world_size_change": self.allow_world_size_change,
        }


_OFFLOAD_ERROR = (
    "KTransformersPlugin: FSDP2 CPU offload (FullyShardedDataParallelPlugin(cpu_offload=True), "
    "`fsdp_offload_params: true`) is not supported with kt: FSDP would keep the sharded "
    "parameters and their gradients in host memory while the expert LoRA parameters, which kt "
    "keeps out of FSDP, stay on the accelerator, so gradient clipping and the optimizer step "
    "would mix devices (and without a GPU torch cannot offload at all). The routed experts, the "
    "bulk of the model, are in host memory already; set cpu_offload=False"
)
_RAM_EFFICIENT_ERROR = (
    "KTransformersPlugin: FSDP2 `cpu_ram_efficient_loading` is not supported with kt: it moves "
    "the model to the meta device and refills it from rank 0's state dict, which would drop the "
    "expert LoRA tensors the engines are bound to (the routed experts are not in the state dict "
    "at all); set cpu_ram_efficient_loading=False (kt_accelerate.load_model already keeps the "
    "expert weights once per node)"
)

_CHECKPOINT_WRAPPER_ERROR = (
    "KTransformersPlugin: FSDP2 `activation_checkpointing` (FullyShardedDataParallelPlugin) is "
    "not supported with kt: it wraps every decoder layer in torch's CheckpointWrapper, which "
    "renames the modules PEFT uses to find the adapter in the state dict, so save_pretrained "
    "would write an empty adapter. Keep activation_checkpointing=False and turn on the model's "
    "own gradient checkpointing instead (model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False}), or TrainingArguments("
    "gradient_checkpointing=True)), which kt supports"
)


def _env(suffix: str) -> str | None:
    raw = os.environ.get(ENV_PREFIX + suffix)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a TrainingArguments.deepspeed value (dict or JSON path)."""
    config: Any = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        try:
            config = json.loads(Path(deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if isinstance(config, Mapping):
        stage = (config.get("zero_optimization") or {}).get("stage")
        try:
            return int(stage) if stage is not None else None
        except (TypeError, ValueError):
            return None
    return None
