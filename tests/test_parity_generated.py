"""Parity generated from the installed transformers: every experts-interface model type.

The model types are enumerated at run time (:func:`kt_models.discover.experts_interface_model_types`:
every type with a causal-LM class whose modeling file uses ``@use_experts_implementation``), so
a new transformers release is covered without new code. For each, :func:`kt_sft.coverage.
check_model_type` builds a tiny random model from the type's default config (2 layers, 8 experts,
top-2, hidden 64, fixed seed) and compares one LoRA step (routed experts through PEFT
``target_parameters``, every other linear layer through ``target_modules``) of the kt-wrapped
model with stock transformers + PEFT in fp32: the loss (relative 1e-4), every LoRA gradient
(relative L2 2e-2), the saved adapter (tensor for tensor equal to stock PEFT's) and the logits
of the adapter reloaded by stock PEFT (per token: median 1e-2, at most 1 token in 16 above 2e-2).
The tolerances are those of ``tests/test_parity_archs.py`` (bf16 expert weights and activations
in the engine, fp32 accumulation; see :mod:`kt_sft.coverage`).

A type kt refuses must be refused with an ``UnsupportedArchitectureError`` that names the model
type and the feature; it is reported as a skip ("refused: ...") so ``pytest -rs`` lists every
refusal with its reason. Types that cannot be built from their config alone or whose stock step
fails are skipped with the reason. Any type that runs but differs from stock fails.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kt_sft.backend import engine_available

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(not engine_available(), reason="kt-kernels engine not built"),
]

kt_models = pytest.importorskip("kt_models")
from kt_models.discover import experts_interface_model_types  # noqa: E402
from kt_sft.coverage import StockSaveError, check_model_type, check_streaming  # noqa: E402

TYPES = experts_interface_model_types()

#: At least this many of the enumerated types must train at parity (a floor against silent
#: regressions of discovery; the table in docs/models.md has the current count).
MIN_SUPPORTED = 50

#: Engine variants that must stay supported: gpt-oss (interleaved gate/up, biases, clamped GLU
#: with alpha and (up + 1)), MiniMax-M3 (the same GLU, concatenated), HY-V4 (clamped SwiGLU) and
#: Inkling-2 (soft-capped SwiGLU).
VARIANT_TYPES = ("gpt_oss", "minimax_m3_vl_text", "hy_v4", "inkling2_text", "inkling2_loop_text")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reports() -> dict[str, Any]:
    return {}


def test_enumeration_finds_the_interface_types() -> None:
    assert len(TYPES) >= 40
    for known in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_5_moe"):
        assert known in TYPES


@pytest.mark.parametrize("model_type", TYPES)
def test_one_lora_step_matches_stock(
    model_type: str, reports: dict[str, Any], tmp_path: Any
) -> None:
    report = check_model_type(model_type, work_dir=tmp_path)
    reports[model_type] = report
    if report.status == "failed":
        pytest.fail(f"{model_type}: {report.reason}")
    if report.status == "refused":
        import kt_models as km
        from kt_models.tiny import build_any

        with pytest.raises(km.UnsupportedArchitectureError) as info:
            km.get_arch_spec(build_any(model_type))
        assert repr(model_type) in str(info.value) and info.value.reason
        pytest.skip(f"{model_type} refused: {report.reason}")
    if report.status == "skipped":
        pytest.skip(f"{model_type} skipped: {report.reason}")
    assert report.status == "supported"


def test_enough_types_train(reports: dict[str, Any]) -> None:
    if len(reports) < len(TYPES):
        pytest.skip("runs after the per-type tests of this module")
    supported = sorted(t for t, r in reports.items() if r.status == "supported")
    assert len(supported) >= MIN_SUPPORTED, supported
    for model_type in VARIANT_TYPES:
        if model_type in TYPES:
            assert model_type in supported, (model_type, reports[model_type])


@pytest.mark.parametrize("model_type", TYPES)
def test_streamed_loading_from_a_saved_checkpoint(
    model_type: str, reports: dict[str, Any], tmp_path: Any
) -> None:
    """Every supported type loads from its ``save_pretrained`` checkpoint (sharded) with the
    experts streamed into the engines: logits equal the original model's (fp32 operator:
    relative 1e-5, summation order only)."""
    report = reports.get(model_type) or check_model_type(model_type, work_dir=tmp_path)
    if report.status != "supported":
        pytest.skip(f"{model_type} {report.status}")
    try:
        err = check_streaming(model_type, tmp_path, second_layer=report.second_layer)
    except StockSaveError as exc:
        pytest.skip(f"{model_type}: {exc}")
    assert err <= 1e-5, f"{model_type}: streamed model logits relative error {err:.2e}"
