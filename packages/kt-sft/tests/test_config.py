"""KTConfig: defaults, KT_* environment, kt_-prefixed aliases, validation."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kt_sft.config import ENV_VARS, KTConfig, KTConfigError


@contextmanager
def patch_env(**values: str | None) -> Iterator[None]:
    """Set / unset environment variables for the block, restoring them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _clean_env() -> Iterator[None]:
    with patch_env(**dict.fromkeys(ENV_VARS.values())):
        yield


def test_defaults() -> None:
    cfg = KTConfig()
    assert cfg.backend == "engine" and cfg.weight_dtype == "bf16"
    assert cfg.lora_rank == 8 and cfg.lora_alpha == 8.0 and cfg.lora_scaling == 1.0
    assert cfg.max_cache_depth == 2 and cfg.max_tokens == 4096 and cfg.isa is None
    assert cfg.lora_experts == 0 and cfg.num_gpu_experts == 0 and cfg.lora_layout == "auto"


def test_environment_then_explicit_precedence() -> None:
    with patch_env(
        KT_LORA_RANK="16", KT_BACKEND="torch", KT_KERNELS_ISA="avx2", KT_MAX_CACHE_DEPTH="4"
    ):
        cfg = KTConfig()
        assert (cfg.lora_rank, cfg.backend, cfg.isa, cfg.max_cache_depth) == (
            16,
            "torch",
            "avx2",
            4,
        )
        assert not cfg.is_explicit("lora_rank")
        cfg = KTConfig(lora_rank=4)
        assert cfg.lora_rank == 4 and cfg.is_explicit("lora_rank")


def test_bad_environment_value_names_the_variable() -> None:
    with patch_env(KT_MAX_TOKENS="lots"), pytest.raises(KTConfigError, match="KT_MAX_TOKENS"):
        KTConfig()


def test_kt_prefixed_aliases() -> None:
    cfg = KTConfig.from_dict(
        {
            "kt_backend": "AMXBF16",
            "kt_num_threads": 1,
            "kt_lora_rank": 16,
            "kt_lora_alpha": 32,
            "kt_max_cache_depth": 3,
            "kt_weight_path": "/ckpt",
            "backend": "torch",
        }
    )
    assert cfg.isa == "amx" and cfg.weight_dtype == "bf16" and cfg.num_threads == 1
    assert cfg.lora_rank == 16 and cfg.lora_alpha == 32.0 and cfg.max_cache_depth == 3
    assert cfg.checkpoint == "/ckpt"
    assert (
        KTConfig.from_dict(kt_backend="AMXInt8", backend="torch", weight_dtype="bf16").weight_dtype
        == "bf16"
    )
    assert KTConfig.from_dict({"kt_use_lora_experts": True}).lora_experts == 1


def test_constructor_takes_aliases_too() -> None:
    cfg = KTConfig(kt_num_threads=1, kt_backend="AVX2", kt_lora_rank=4, backend="torch")
    assert (cfg.num_threads, cfg.isa, cfg.lora_rank) == (1, "avx2", 4)
    with pytest.raises(KTConfigError, match="lora_rank"):
        KTConfig(lora_rank=4, kt_lora_rank=8)


@pytest.mark.parametrize("key", ["kt_bogus", "lora_rnak", "weight_dtpye"])
def test_unknown_key_is_an_error_naming_it(key: str) -> None:
    with pytest.raises(KTConfigError, match=key):
        KTConfig.from_dict({key: 1})
    with pytest.raises(KTConfigError, match=key):
        KTConfig(**{key: 1})


def test_unknown_kt_backend_value() -> None:
    with pytest.raises(KTConfigError, match="AMXFP99"):
        KTConfig.from_dict(kt_backend="AMXFP99")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", "gpu"),
        ("isa", "neon"),
        ("max_tokens", 0),
        ("lora_rank", -1),
        ("lora_layout", "diagonal"),
        ("num_gpu_experts", -2),
        ("lora_alpha", 0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(KTConfigError, match=field):
        KTConfig(**{field: value})


def test_fp32_weights_need_the_torch_backend() -> None:
    with pytest.raises(KTConfigError, match="weight_dtype"):
        KTConfig(weight_dtype="fp32")
    assert KTConfig(weight_dtype="fp32", backend="torch").weight_dtype == "fp32"


def test_more_threads_than_cores_warns() -> None:
    with pytest.warns(RuntimeWarning, match="num_threads=4096"):
        KTConfig(num_threads=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KTConfig(num_threads=1)


def test_replace_and_to_dict_round_trip() -> None:
    cfg = KTConfig(lora_rank=4, backend="torch")
    again = KTConfig(**cfg.to_dict())
    assert again == cfg
    assert cfg.replace(kt_lora_rank=2).lora_rank == 2


def test_kt_backend_takes_kt_sft_backends_and_kernel_names() -> None:
    from kt_sft import KTConfig

    assert KTConfig.from_dict({"kt_backend": "torch"}).backend == "torch"
    legacy = KTConfig.from_dict({"kt_backend": "AVX512BF16"})
    assert legacy.isa == "avx512_bf16" and legacy.backend == "engine"
