"""The experts-backend protocol, the options record and how options reach the engine.

Every implementation of :class:`ExpertsBackend` offers the protocol's members; every
``kt_kernels.MoEEngine`` constructor option has a ``KTConfig`` field and a field of
:class:`ExpertsOptions` and reaches the engine unchanged; engine features are gated by
``kt_kernels.ABI_VERSION``.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from kt_sft.backend import create_experts_backend, engine_available
from kt_sft.compiled import OPTION_ABI, CompiledExperts, EngineUnavailableError, engine_kwargs
from kt_sft.config import KTConfig, KTConfigError
from kt_sft.distributed import LeaderBackend, MemberBackend
from kt_sft.experts_backend import ExpertsBackend
from kt_sft.options import ExpertsOptions
from kt_sft.reference import TorchMoEEngine

needs_engine = pytest.mark.skipif(not engine_available(), reason="kt-kernels engine not built")

SRC = Path(__file__).resolve().parents[1] / "src" / "kt_sft"

# The protocol's members, read from the class (methods, properties and annotated attributes).
MEMBERS = sorted(
    {n for n in vars(ExpertsBackend) if not n.startswith("_")} | set(ExpertsBackend.__annotations__)
)


@pytest.mark.parametrize(
    "cls", [CompiledExperts, TorchMoEEngine, LeaderBackend, MemberBackend], ids=lambda c: c.__name__
)
def test_every_backend_class_has_the_protocol_members(cls: type) -> None:
    missing = [name for name in MEMBERS if not hasattr(cls, name)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert {"collective", "supports_recompute", "last_timings", "clear_cache"} <= set(MEMBERS)


def test_the_factory_builds_backends_that_satisfy_the_protocol(backend: str) -> None:
    options = ExpertsOptions.from_config(KTConfig(backend=backend, lora_rank=4, num_threads=1))
    made = create_experts_backend(
        options, num_experts=4, top_k=2, hidden_size=32, intermediate_size=32
    )
    try:
        assert isinstance(made, ExpertsBackend)
        assert made.collective is False
        assert made.supports_recompute is (backend == "engine")
        assert made.activation_policy == "retain"
        assert isinstance(made.last_timings(), dict)
    finally:
        made.close()


def test_options_record_is_built_from_ktconfig_field_by_field() -> None:
    cfg = KTConfig(
        backend="engine",
        weight_dtype="int8",
        activation_dtype="int8",
        backward_dtype="int8",
        group_size=64,
        lora_rank=4,
        lora_alpha=12.0,
        tp=2,
        max_tokens=256,
        max_cache_depth=3,
        activation_policy="recompute",
    )
    options = ExpertsOptions.from_config(cfg, activation="silu", lora_layout="split")
    assert dataclasses.asdict(options) == {
        "backend": "engine",
        "activation": "silu",
        "lora_rank": 4,
        "lora_alpha": 12.0,
        "lora_layout": "split",
        "weight_dtype": "int8",
        "group_size": 64,
        "activation_dtype": "int8",
        "backward_dtype": "int8",
        "activation_policy": "recompute",
        "max_tokens": 256,
        "max_cache_depth": 3,
        "num_threads": None,
        "isa": cfg.isa,
        "tp": 2,
        "activation_alpha": 1.0,
        "activation_limit": None,
        "activation_up_offset": 0.0,
        "activation_gate_softcap": None,
        "activation_up_softcap": None,
    }
    # a layer's gating (kt_models.gating) rides along
    clamped = ExpertsOptions.from_config(
        cfg, activation_options={"activation_alpha": 1.702, "activation_limit": 7.0}
    )
    assert (clamped.activation_alpha, clamped.activation_limit) == (1.702, 7.0)
    assert clamped.engine_kwargs()["activation_limit"] == 7.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tp = 1  # type: ignore[misc]
    # tp=0 in KTConfig: one slice per NUMA node (the engine's tp=None).
    assert ExpertsOptions.from_config(KTConfig(tp=0)).tp is None


def test_lora_alpha_has_one_form() -> None:
    """KTConfig resolves "unset" to the rank; the record and the engine get that number."""
    assert ExpertsOptions.from_config(KTConfig(lora_rank=8)).lora_alpha == 8.0
    assert ExpertsOptions.from_config(KTConfig(lora_rank=8, lora_alpha=32)).lora_alpha == 32.0
    frozen = ExpertsOptions.from_config(KTConfig(lora_rank=0))
    assert isinstance(frozen.lora_alpha, float) and frozen.engine_kwargs()["lora_alpha"] == 1.0


def test_every_engine_constructor_option_is_reachable_from_ktconfig() -> None:
    """Each keyword of ``MoEEngine.__init__`` is a field of the record, and each field of the
    record (but the layer's own activation / gating decisions) is a KTConfig field."""
    kk = pytest.importorskip("kt_kernels")
    params = inspect.signature(kk.MoEEngine.__init__).parameters
    engine_options = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    record = {f.name for f in dataclasses.fields(ExpertsOptions)}
    assert engine_options <= set(ExpertsOptions().engine_kwargs()), engine_options - set(
        ExpertsOptions().engine_kwargs()
    )
    assert engine_options <= record
    layer_own = {"activation"} | {
        n
        for n in record
        if n.startswith("activation_") and n not in ("activation_dtype", "activation_policy")
    }
    assert layer_own == {
        "activation",
        "activation_alpha",
        "activation_limit",
        "activation_up_offset",
        "activation_gate_softcap",
        "activation_up_softcap",
    }
    assert record - layer_own <= {f.name for f in dataclasses.fields(KTConfig)}


def test_options_are_gated_by_the_engine_abi() -> None:
    wide = ExpertsOptions(tp=2, activation_dtype="int8", weight_dtype="int8")
    with pytest.raises(EngineUnavailableError, match=r"ABI_VERSION 3\) does not support tp=2"):
        engine_kwargs(wide, abi=3)
    # Options at their defaults are not passed to an engine that predates them.
    old = engine_kwargs(ExpertsOptions(), abi=3)
    assert "tp" not in old and "activation_policy" not in old and "activation" not in old
    assert old["group_size"] == 128
    new = engine_kwargs(wide, abi=5)
    assert (new["tp"], new["activation_dtype"]) == (2, "int8")
    with pytest.raises(EngineUnavailableError, match="activation='gelu'"):
        engine_kwargs(ExpertsOptions(activation="gelu"), abi=5)
    with pytest.raises(EngineUnavailableError, match=r"activation_limit=7\.0"):
        engine_kwargs(ExpertsOptions(activation_limit=7.0), abi=5)
    assert engine_kwargs(ExpertsOptions(activation="gelu"), abi=6)["activation"] == "gelu"
    int8_bwd = ExpertsOptions(weight_dtype="int8", activation_dtype="int8", backward_dtype="int8")
    with pytest.raises(EngineUnavailableError, match="backward_dtype='int8'"):
        engine_kwargs(int8_bwd, abi=6)
    assert "backward_dtype" not in engine_kwargs(ExpertsOptions(), abi=6)
    assert engine_kwargs(int8_bwd, abi=7)["backward_dtype"] == "int8"
    assert set(OPTION_ABI) <= set(ExpertsOptions().engine_kwargs())


def test_no_signature_probing_of_the_engine() -> None:
    offenders = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "inspect.signature" in p.read_text()
    ]
    assert offenders == []


@needs_engine
@pytest.mark.parametrize(
    ("settings", "attr", "want"),
    [
        ({"weight_dtype": "int4", "group_size": 32}, "group_size", 32),
        ({"weight_dtype": "int8", "activation_dtype": "int8"}, "activation_dtype", "int8"),
        (
            {"weight_dtype": "int8", "activation_dtype": "int8", "backward_dtype": "int8"},
            "backward_dtype",
            "int8",
        ),
        ({"lora_rank": 4, "lora_alpha": 12.0}, "scaling", 3.0),
    ],
)
def test_ktconfig_options_reach_the_engine(settings: dict, attr: str, want: object) -> None:
    cfg = KTConfig(backend="engine", num_threads=1, **settings)
    made = CompiledExperts(4, 2, 64, 64, ExpertsOptions.from_config(cfg))
    try:
        assert getattr(made.engine, attr) == want
    finally:
        made.close()


@needs_engine
def test_int4_group_size_changes_the_engine_result() -> None:
    """group_size is not only stored: a coarser group quantizes differently."""
    torch.manual_seed(0)
    E, K, H, inter, T = 4, 2, 128, 128, 8
    gate_up = torch.randn(E, 2 * inter, H) * 0.05
    down = torch.randn(E, H, inter) * 0.05
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, K))
    w = torch.rand(T, K)
    outs = []
    for group in (32, 128):
        cfg = KTConfig(backend="engine", weight_dtype="int4", group_size=group, lora_rank=0)
        made = CompiledExperts(E, K, H, inter, ExpertsOptions.from_config(cfg))
        made.load_weights(gate_up=gate_up, down=down)
        out = torch.empty(T, H)
        made.forward(x, ids, w, out, save_for_backward=False)
        outs.append(out)
        made.close()
    assert not torch.equal(outs[0], outs[1])


def test_w8a8_needs_int8_weights_on_the_engine() -> None:
    with pytest.raises(KTConfigError, match="activation_dtype='int8'"):
        KTConfig(activation_dtype="int8")
    with pytest.raises(KTConfigError, match="backward_dtype='int8'"):
        KTConfig(weight_dtype="int8", backward_dtype="int8")
    with pytest.raises(KTConfigError, match="backward_dtype must be one of"):
        KTConfig(weight_dtype="int8", activation_dtype="int8", backward_dtype="fp8")
    with pytest.raises(KTConfigError, match="group_size must be one of"):
        KTConfig(group_size=48)


def test_train_yaml_reaches_the_new_options(tmp_path: Path) -> None:
    from kt_sft.train import load_train_config

    cfg = load_train_config(
        None,
        {"kt_group_size": "64", "kt_weight_dtype": "int4", "kt_tp": "0"},
        defaults={"model_name_or_path": "embedded", "dataset": "embedded"},
    )
    kt = KTConfig.from_dict(cfg.kt)
    assert (kt.group_size, kt.weight_dtype, kt.tp) == (64, "int4", 0)
    w8a8 = load_train_config(
        None,
        {"kt_weight_dtype": "int8", "kt_activation_dtype": "int8", "kt_backward_dtype": "INT8"},
        defaults={"model_name_or_path": "embedded", "dataset": "embedded"},
    )
    assert KTConfig.from_dict(w8a8.kt).backward_dtype == "int8"
