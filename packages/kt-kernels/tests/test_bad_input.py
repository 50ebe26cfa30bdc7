"""Bad input: every case raises a Python exception naming the argument and the expected value;
none crashes the process."""

from __future__ import annotations

import numpy as np
import pytest
from kk_helpers import lora_arrays, make_engine
from kk_reference import BF16, make_case

import kt_kernels as kk

E, K, H, I, R, T = 4, 2, 48, 32, 2, 5  # noqa: E741 (I is the spec's name)


@pytest.fixture
def case():
    return make_case(E, K, H, I, R, T, seed=3)


@pytest.fixture
def eng(case):
    e, _, _ = make_engine(case)
    yield e
    e.close()


def outs():
    return np.empty((T, H), np.float32)


class FakeDevice:
    """An array-like on another device: the engine must refuse it before asking for data."""

    def __dlpack_device__(self):
        return (2, 0)  # CUDA

    def __dlpack__(self, **kw):
        raise AssertionError("must not be called")


# ---- forward arguments ------------------------------------------------------------------------


def test_wrong_dtype(eng, case) -> None:
    with pytest.raises(TypeError, match=r"x: expected dtype float32 or bfloat16, got int64"):
        eng.forward(case.x.astype(np.int64), case.ids, case.w, outs())
    with pytest.raises(TypeError, match=r"expert_ids: expected dtype int64 or int32"):
        eng.forward(case.x, case.ids.astype(np.float32), case.w, outs())
    with pytest.raises(TypeError, match=r"x: expected dtype float32 or bfloat16, got float64"):
        eng.forward(case.x.astype(np.float64), case.ids, case.w, outs())
    with pytest.raises(TypeError, match=r"out: expected dtype"):
        eng.forward(case.x, case.ids, case.w, np.empty((T, H), np.int32))


def test_wrong_shape(eng, case) -> None:
    with pytest.raises(ValueError, match=r"x: expected shape \(T, hidden_size\) = \(5, 48\)"):
        eng.forward(case.x[:, :40], case.ids, case.w, outs())
    with pytest.raises(ValueError, match=r"expert_ids: expected shape \(T, top_k\) = \(5, 2\)"):
        eng.forward(case.x, case.ids[:4], case.w, outs())
    with pytest.raises(ValueError, match=r"routing_weights: expected shape"):
        eng.forward(case.x, case.ids, case.w[:, :1], outs())
    with pytest.raises(ValueError, match=r"out: expected shape"):
        eng.forward(case.x, case.ids, case.w, np.empty((T + 1, H), np.float32))


def test_wrong_rank(eng, case) -> None:
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions \(T, hidden_size\), got 3"):
        eng.forward(case.x[None], case.ids, case.w, outs())
    with pytest.raises(ValueError, match=r"expert_ids: expected 2 dimensions"):
        eng.forward(case.x, case.ids.reshape(-1), case.w, outs())


def test_wrong_strides(eng, case) -> None:
    x2 = np.zeros((T, 2 * H), np.float32)
    x2[:, ::2] = case.x
    with pytest.raises(ValueError, match=r"x: expected the last dimension to be contiguous"):
        eng.forward(x2[:, ::2], case.ids, case.w, outs())
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(H, np.float32), (T, H), (0, 4))
    with pytest.raises(ValueError, match=r"out: .*(overlap|positive strides)"):
        eng.forward(case.x, case.ids, case.w, overlapping)
    with pytest.raises(ValueError, match=r"x: expected positive strides"):
        eng.forward(case.x[::-1], case.ids, case.w, outs())


def test_row_strided_activations_are_fine(eng, case) -> None:
    x2 = np.zeros((T, 2 * H), np.float32)
    x2[:, :H] = case.x
    out2 = np.zeros((T, 2 * H), np.float32)
    eng.forward(x2[:, :H], case.ids, case.w, out2[:, :H], save_for_backward=False)
    ref = outs()
    eng.forward(case.x, case.ids, case.w, ref, save_for_backward=False)
    assert np.array_equal(out2[:, :H], ref) and not out2[:, H:].any()


def test_wrong_device(eng, case) -> None:
    with pytest.raises(ValueError, match=r"x: expected a CPU array, got one on CUDA"):
        eng.forward(FakeDevice(), case.ids, case.w, outs())


def test_not_an_array(eng, case) -> None:
    with pytest.raises(TypeError, match=r"x: expected an array"):
        eng.forward([[1.0] * H] * T, case.ids, case.w, outs())
    with pytest.raises(TypeError, match=r"out: expected an array, got None"):
        eng.forward(case.x, case.ids, case.w, None)


def test_read_only_output(eng, case) -> None:
    out = outs()
    out.flags.writeable = False
    with pytest.raises((ValueError, BufferError), match=r"out"):
        eng.forward(case.x, case.ids, case.w, out)


@pytest.mark.parametrize("bad", [E, -2, 1000])
def test_ids_out_of_range(eng, case, bad: int) -> None:
    ids = case.ids.copy()
    ids[3, 1] = bad
    with pytest.raises(
        ValueError, match=rf"expert_ids: expected values in \[-1, {E}\).*got {bad} at \[3, 1\]"
    ):
        eng.forward(case.x, ids, case.w, outs())
    assert eng.cache_depth == 0  # rejected before any work


def test_backward_without_forward(eng, case) -> None:
    with pytest.raises(RuntimeError, match=r"backward: no forward is pending"):
        eng.backward(case.dout, outs(), np.empty((T, K), np.float32))


def test_backward_wrong_arguments(eng, case) -> None:
    eng.forward(case.x, case.ids, case.w, outs())
    with pytest.raises(ValueError, match=r"grad_routing_weights: expected shape"):
        eng.backward(case.dout, outs(), np.empty((T, K + 1), np.float32))
    with pytest.raises(TypeError, match=r"grad_input: expected dtype"):
        eng.backward(case.dout, np.empty((T, H), np.float64), np.empty((T, K), np.float32))
    assert eng.cache_depth == 1  # a rejected backward consumes nothing


def test_lora_not_set(case) -> None:
    eng = kk.MoEEngine(E, K, H, I, lora_rank=R, num_threads=1)
    eng.load_weights(gate_up=case.gate_up, down=case.down)
    with pytest.raises(RuntimeError, match=r"LoRA weights are not set \(lora_rank=2\)"):
        eng.forward(case.x, case.ids, case.w, outs())
    with pytest.raises(RuntimeError, match=r"lora_updated: no LoRA weights are bound"):
        eng.lora_updated()


def test_weights_not_loaded(case) -> None:
    eng = kk.MoEEngine(E, K, H, I)
    with pytest.raises(RuntimeError, match=r"no weights loaded"):
        eng.forward(case.x, case.ids, case.w, outs())


def test_bad_weights(case) -> None:
    eng = kk.MoEEngine(E, K, H, I)
    with pytest.raises(
        ValueError,
        match=r"gate_up: expected shape \(num_experts, 2 \* intermediate_size, hidden_size\)",
    ):
        eng.load_weights(gate_up=case.gate_up[:, :I], down=case.down)
    with pytest.raises(ValueError, match=r"either gate_up"):
        eng.load_weights(gate_up=case.gate_up, gate=case.gate, up=case.up, down=case.down)
    with pytest.raises(ValueError, match=r"gate=... and up="):
        eng.load_weights(gate=case.gate, down=case.down)
    with pytest.raises(TypeError, match=r"down"):
        eng.load_weights(gate_up=case.gate_up)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"down: expected an array, got None"):
        eng._eng.load_weights(gate_up=case.gate_up)
    with pytest.raises(TypeError, match=r"down: expected dtype"):
        eng.load_weights(gate_up=case.gate_up, down=case.down.astype(np.int32))


def test_bad_lora(case) -> None:
    eng, lora, _ = make_engine(case, with_grads=False)
    bad = dict(lora)
    bad["b_down"] = np.zeros((E, H, R + 1), np.float32)
    with pytest.raises(
        ValueError, match=r"b_down: expected shape \(num_experts, hidden_size, lora_rank\)"
    ):
        eng.set_lora(**bad)
    with pytest.raises(ValueError, match=r"a_gate.*lora_layout='split'"):
        eng.set_lora(**lora, a_gate=lora["a_gate_up"])
    with pytest.raises(ValueError, match=r"all of grad_a_gate_up.*or none"):
        eng.set_lora(**lora, grad_a_down=np.zeros((E, R, I), np.float32))
    grads = {f"grad_{k}": np.zeros(v.shape, np.float32) for k, v in lora.items()}
    grads["grad_b_down"] = np.zeros((E, H, R), BF16)
    with pytest.raises(TypeError, match=r"grad_b_down: expected dtype float32, got bfloat16"):
        eng.set_lora(**lora, **grads)
    with pytest.raises(TypeError, match=r"unexpected keyword|unexpected argument"):
        eng.set_lora(**lora, c_down=lora["a_down"])
    with pytest.raises(TypeError, match=r"a_gate_up: expected an array, got None"):
        eng.set_lora(b_gate_up=lora["b_gate_up"], a_down=lora["a_down"], b_down=lora["b_down"])
    skip = kk.MoEEngine(E, K, H, I, lora_rank=0)
    with pytest.raises(RuntimeError, match=r"lora_rank=0"):
        skip.set_lora(**lora_arrays(case))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0), "num_experts: expected a positive integer, got 0"),
        (dict(top_k=-1), "top_k: expected a positive integer"),
        (dict(lora_rank=-1), r"lora_rank: expected an integer in \[0, 4096\]"),
        (dict(lora_layout="both"), "lora_layout: expected 'fused' or 'split'"),
        (dict(weight_dtype="fp8"), "weight_dtype: expected 'bf16', 'int8' or 'int4', got 'fp8'"),
        (dict(weight_dtype="int4", group_size=48), "group_size: expected 32, 64 or 128"),
        (
            dict(weight_dtype="int4", hidden_size=96, group_size=64),
            "group_size: 64 must divide hidden_size and intermediate_size",
        ),
        (dict(tp=3), "tp: 3 slices of intermediate_size=32 are too many"),  # I = 32: 1 slice
        (dict(tp=0), r"tp: expected None or an integer in \[1, 4096\]"),
        (
            dict(weight_dtype="int4", group_size=32, tp=2, intermediate_size=32, hidden_size=64),
            "at most 1 slices",
        ),
        (dict(num_threads=0), r"num_threads: expected None or an integer in \[1, 4096\]"),
        (dict(max_cache_depth=-1), r"max_cache_depth: expected an integer in \[0, 1024\]"),
        (dict(lora_rank=2, lora_alpha=float("inf")), "lora_alpha: expected None or a finite"),
        (dict(isa="sse9"), "isa='sse9' is not an ISA name"),
    ],
)
def test_bad_config(kwargs, match) -> None:
    args = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kk.MoEEngine(**args)


def test_bad_num_threads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="KT_NUM_THREADS='many'"):
        kk.MoEEngine(E, K, H, I)
    monkeypatch.setenv("KT_NUM_THREADS", "3")
    assert kk.MoEEngine(E, K, H, I).num_threads == 3
    assert kk.default_thread_count() == 3


def test_forward_beyond_cache_depth(eng, case) -> None:
    eng.forward(case.x, case.ids, case.w, outs())
    with pytest.raises(RuntimeError, match=r"activation cache is full \(max_cache_depth=1"):
        eng.forward(case.x, case.ids, case.w, outs())
    eng.clear_cache()
    assert eng.cache_depth == 0
    eng.forward(case.x, case.ids, case.w, outs())


def test_dlpack_capsule_consumed_once(eng, case) -> None:
    class Once:
        def __init__(self, a):
            self.cap = a.__dlpack__()

        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kw):
            return self.cap

    x = Once(case.x)
    eng.forward(x, case.ids, case.w, outs(), save_for_backward=False)
    with pytest.raises(TypeError, match=r"consumed already"):
        eng.forward(x, case.ids, case.w, outs(), save_for_backward=False)


# ---- quantized weights ----------------------------------------------------------------------


def _qengine(wd: str, group: int = 32) -> kk.MoEEngine:
    return kk.MoEEngine(4, 2, 64, 32, weight_dtype=wd, group_size=group, num_threads=1)


def _qweights(wd: str, group: int = 32) -> dict:
    rng = np.random.default_rng(0)
    gu = rng.standard_normal((4, 64, 64)).astype(np.float32)
    d = rng.standard_normal((4, 64, 32)).astype(np.float32)
    a, sa = kk.quantize_weights(gu, wd, group)
    b, sb = kk.quantize_weights(d, wd, group)
    return dict(gate_up=a, gate_up_scale=sa, down=b, down_scale=sb)


def test_quantized_scales_of_wrong_shape() -> None:
    w = _qweights("int4")
    w["gate_up_scale"] = w["gate_up_scale"][:, :, :1].copy()  # (E, 2I, 1), not (E, 2I, H / 32)
    with _qengine("int4") as eng, pytest.raises(ValueError, match=r"gate_up_scale: expected shape"):
        eng.load_quantized_weights(**w)
    w = _qweights("int8")
    w["gate_up_scale"] = w["gate_up_scale"][..., None].copy()
    with _qengine("int8") as eng, pytest.raises(ValueError, match="gate_up_scale"):
        eng.load_quantized_weights(**w)


@pytest.mark.parametrize("declared,given", [("int8", "int4"), ("int4", "int8")])
def test_quantized_codes_of_the_other_dtype(declared: str, given: str) -> None:
    w = _qweights(given)
    with _qengine(declared) as eng:
        with pytest.raises(TypeError, match=f"weight_dtype='{declared}'"):
            eng.load_quantized_weights(**w)
        assert not eng._eng.weights_loaded


def test_quantized_codes_as_float_and_bf16_engine() -> None:
    w = _qweights("int8")
    w["gate_up"] = w["gate_up"].astype(np.float32)
    with _qengine("int8") as eng, pytest.raises(TypeError, match="expects int8 codes, got float32"):
        eng.load_quantized_weights(**w)
    with (
        kk.MoEEngine(4, 2, 64, 32, num_threads=1) as eng,
        pytest.raises(RuntimeError, match="weight_dtype='bf16'"),
    ):
        eng.load_quantized_weights(**_qweights("int8"))


def test_quantized_bad_scale_values_and_nan_weights() -> None:
    w = _qweights("int8")
    w["down_scale"][1, 2] = -1.0
    with _qengine("int8") as eng, pytest.raises(ValueError, match="finite and >= 0"):
        eng.load_quantized_weights(**w)
    gu = np.ones((4, 64, 64), np.float32)
    gu[0, 0, 0] = np.nan
    with _qengine("int4") as eng, pytest.raises(ValueError, match="needs finite weights"):
        eng.load_weights(gate_up=gu, down=np.ones((4, 64, 32), np.float32))
