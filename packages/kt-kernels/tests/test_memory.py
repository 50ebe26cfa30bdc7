"""Engine memory: the retain / recompute activation policies give the same bits, cache entries
are sized by the rows routed and go back to the process-wide pool when backward consumes them,
and the process-wide counters of kt_kernels.memory_stats() follow allocations by kind."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kk_helpers import isa_params, make_engine
from kk_reference import make_case

import kt_kernels as kk

ISAS = isa_params()


def run(eng: kk.MoEEngine, c) -> dict[str, np.ndarray]:
    """forward + backward (x given again, as a recompute entry needs); out, dx, dw."""
    out = np.full((c.T, c.H), np.nan, dtype=np.float32)
    eng.forward(c.x, c.ids, c.w, out)
    dx = np.full((c.T, c.H), np.nan, dtype=np.float32)
    dw = np.full((c.T, c.K), np.nan, dtype=np.float32)
    eng.backward(c.dout, dx, dw, x=c.x)
    return {"out": out, "dx": dx, "dw": dw}


def _run_with_grads(eng: kk.MoEEngine, c, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for g in grads.values():
        g[...] = 0
    got = run(eng, c)
    got.update({k: np.array(v, dtype=np.float64) for k, v in grads.items()})
    return got


def _bits_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k, strict=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("weight_dtype", "activation_dtype", "fused", "tp"),
    [
        ("bf16", "bf16", True, 1),
        ("bf16", "bf16", False, 2),
        ("int8", "bf16", True, 1),
        ("int4", "bf16", False, 1),
        ("int8", "int8", True, 1),
    ],
)
def test_recompute_gives_the_bits_of_retain(
    isa: str, weight_dtype: str, activation_dtype: str, fused: bool, tp: int
) -> None:
    """Outputs, dx, dw and every LoRA gradient are bit for bit those of retain, on each ISA and
    for 1 and 3 threads (the recompute runs the forward's own gate_up tiles)."""
    c = make_case(6, 3, 64, 64, 4, 37, seed=41, fused=fused)
    kw = {"weight_dtype": weight_dtype, "activation_dtype": activation_dtype, "tp": tp}
    if weight_dtype == "int4":
        kw["group_size"] = 32
    results = {}
    for threads in (1, 3):
        for policy in ("retain", "recompute"):
            eng, _, grads = make_engine(c, isa=isa, threads=threads, activation_policy=policy, **kw)
            assert eng.activation_policy == policy
            results[(threads, policy)] = _run_with_grads(eng, c, grads)
            eng.close()
    base = results[(1, "retain")]
    for got in results.values():
        _bits_equal(base, got)


def test_policy_switch_and_bad_policy() -> None:
    c = make_case(4, 2, 48, 32, 2, 9, seed=43)
    eng, _, grads = make_engine(c)
    retained = _run_with_grads(eng, c, grads)
    eng.activation_policy = "recompute"
    assert eng.activation_policy == "recompute"
    _bits_equal(retained, _run_with_grads(eng, c, grads))
    with pytest.raises(ValueError, match="activation_policy: expected 'retain' or 'recompute'"):
        eng.activation_policy = "sometimes"
    with pytest.raises(ValueError, match="activation_policy"):
        kk.MoEEngine(4, 2, 48, 32, activation_policy="keep")


def _forward(eng: kk.MoEEngine, c, save: bool = True) -> None:
    out = np.empty((c.T, c.H), dtype=np.float32)
    eng.forward(c.x, c.ids, c.w, out, save_for_backward=save)


def _backward(eng: kk.MoEEngine, c) -> None:
    eng.backward(c.dout, np.empty((c.T, c.H), np.float32), np.empty((c.T, c.K), np.float32), x=c.x)


def test_cache_entry_is_sized_by_the_rows_routed() -> None:
    """A pending retain entry holds x (T x H bf16), x A^T, h Ad^T (S x r fp32 each) and [g | u]
    (S x 2I fp32), S = T * K minus padding; a recompute entry only the routing; max_tokens
    sizes neither."""
    E, K, H, I, r, T = 8, 2, 256, 128, 4, 50  # noqa: E741
    c = make_case(E, K, H, I, r, T, seed=45, pad_frac=0.0)
    S = int((c.ids >= 0).sum())
    page = 4096
    # The routing index: S * 8 + T * K * 4 + (E + 1) * 8 bytes (vector capacities may round up).
    index = S * 8 + T * K * 4 + (E + 1) * 8
    for policy, need in (("retain", T * H * 2 + 2 * S * r * 4 + S * 2 * I * 4), ("recompute", 0)):
        eng, _, _ = make_engine(c, max_tokens=65536, activation_policy=policy)
        kk.trim_memory()  # no free pool block (reused blocks may be up to twice the size)
        _forward(eng, c)
        stats = eng.memory_stats()
        # Each of the 4 pooled buffers rounds up to whole pages.
        assert need + index <= stats["cache_bytes"] <= need + 4 * page + 2 * index
        _backward(eng, c)
        assert eng.memory_stats()["cache_bytes"] == 0
        eng.close()


def test_entries_come_from_one_pool_across_engines() -> None:
    """Layers one after another: the second engine's entry reuses the first one's blocks, so
    forward, backward, forward, backward over many engines holds one entry's memory."""
    c = make_case(8, 2, 128, 96, 4, 64, seed=47)
    engines = [make_engine(c)[0] for _ in range(4)]
    gc.collect()
    kk.trim_memory()
    kk.reset_memory_peaks()
    _forward(engines[0], c)
    one_entry = kk.memory_stats()["cache_bytes"]
    assert one_entry > 0
    _backward(engines[0], c)
    for eng in engines[1:]:
        _forward(eng, c)
        _backward(eng, c)
    stats = kk.memory_stats()
    assert stats["cache_bytes"] == 0
    assert stats["cache_peak_bytes"] == one_entry
    assert stats["pool_bytes"] == one_entry
    # All four pending at once (no checkpointing): four entries, the pool serves the first.
    for eng in engines:
        _forward(eng, c)
    assert kk.memory_stats()["cache_bytes"] == 4 * one_entry
    for eng in reversed(engines):
        _backward(eng, c)
    assert kk.memory_stats()["cache_bytes"] == 0
    for eng in engines:
        eng.close()


def test_inference_forward_keeps_no_entry() -> None:
    c = make_case(8, 2, 128, 96, 4, 64, seed=49)
    eng, _, _ = make_engine(c)
    _forward(eng, c, save=False)
    assert eng.memory_stats()["cache_bytes"] == 0
    assert kk.memory_stats()["cache_bytes"] == 0
    eng.close()


def test_clear_cache_returns_entries() -> None:
    c = make_case(8, 2, 128, 96, 4, 64, seed=51)
    eng, _, _ = make_engine(c, max_cache_depth=3)
    for _ in range(3):
        _forward(eng, c)
    assert eng.memory_stats()["cache_bytes"] > 0
    eng.clear_cache()
    assert eng.memory_stats()["cache_bytes"] == 0
    eng.close()


def test_counters_by_kind_and_trim() -> None:
    E, K, H, I = 8, 2, 128, 96  # noqa: E741
    gc.collect()
    before = kk.memory_stats()
    c = make_case(E, K, H, I, 4, 64, seed=53)
    eng, _, _ = make_engine(c)
    stats = kk.memory_stats()
    own = eng.memory_stats()
    assert stats["weights_bytes"] - before["weights_bytes"] == own["weight_bytes"]
    _forward(eng, c)
    _backward(eng, c)
    stats = kk.memory_stats()
    assert stats["scratch_bytes"] == eng.memory_stats()["scratch_bytes"] > 0
    # The LoRA stage is process-wide: at least this layer's fp32 A and B (r (2H + 3I) per expert).
    assert stats["lora_bytes"] == eng.memory_stats()["lora_bytes"] >= E * 4 * (2 * H + 3 * I) * 4
    assert stats["pool_bytes"] > 0
    kinds = ("weights", "lora", "cache", "pool", "scratch")
    assert stats["total_bytes"] == sum(stats[f"{k}_bytes"] for k in kinds)
    kk.trim_memory()
    stats = kk.memory_stats()
    assert stats["scratch_bytes"] == 0 and stats["pool_bytes"] == 0 and stats["lora_bytes"] == 0
    # Trimmed memory comes back on demand, with the same results.
    first = run(eng, c)
    _bits_equal(first, run(eng, c))
    eng.close()
    gc.collect()
    after = kk.memory_stats()
    assert after["weights_bytes"] == before["weights_bytes"]


@pytest.mark.parametrize(
    ("hidden", "inter", "weight_dtype", "tp", "gu_depth", "d_depth"),
    [
        (1024, 48, "bf16", 1, 1056, 64),  # a 32 KiB block stride: one zero step more
        (2048, 48, "bf16", 1, 2080, 64),
        (3584, 48, "bf16", 1, 3616, 64),
        (512, 48, "bf16", 1, 512, 64),  # below 1024: kept
        (1056, 48, "bf16", 1, 1056, 64),  # a 33 KiB stride: kept
        (1040, 48, "bf16", 1, 1056, 64),  # rounded up to 32 only
        (64, 1024, "bf16", 1, 64, 1056),  # down too, with one tensor-parallel slice
        (64, 2048, "bf16", 2, 64, 2048),  # two slices of 1024: down kept (2 x 1024 deep)
        (1024, 1024, "int8", 1, 1024, 1024),  # codes are stored at the plain depth
    ],
)
def test_weight_blocks_depth(
    hidden: int, inter: int, weight_dtype: str, tp: int, gu_depth: int, d_depth: int
) -> None:
    """bf16 blocks are 16 rows x depth: H (gate_up) or I (down) rounded up to 32, plus a zero step
    of 32 when that is >= 1024 and a multiple of 512 (quant::unaliased_depth; down only with one
    slice). int8 stores 16 x Kp codes per block and one fp32 scale per row."""
    E = 2
    eng = kk.MoEEngine(
        E, 1, hidden, inter, max_tokens=4, num_threads=1, weight_dtype=weight_dtype, tp=tp
    )
    rng = np.random.default_rng(7)
    eng.load_weights(
        gate_up=rng.standard_normal((E, 2 * inter, hidden), dtype=np.float32),
        down=rng.standard_normal((E, hidden, inter), dtype=np.float32),
    )
    hb = -(-hidden // 16) * 16
    if weight_dtype == "bf16":
        want = E * 2 * inter * gu_depth * 2 + E * hb * d_depth * 2
    else:
        want = E * 2 * inter * gu_depth + E * hb * d_depth + E * (2 * inter + hb) * 4
    assert eng.memory_stats()["weight_bytes"] == want
    eng.close()


def _interleaved_layers(isa: str, fused: bool) -> int:
    """Three engines run as a model runs them (forward 0, 1, 2, backward 2, 1, 0): each one's
    outputs and LoRA gradients are bit for bit those of the same engine running alone, and an
    in-place change announced by lora_updated() reaches the next forward though other engines ran
    in between. Returns the LoRA stage's bytes after the backwards."""
    cases = [
        make_case(6, 3, 64, 96, 4, 21, seed=61, fused=fused),
        make_case(8, 2, 128, 64, 4, 17, seed=62, fused=fused),
        make_case(6, 3, 64, 96, 4, 21, seed=63, fused=fused),
    ]
    alone = []
    for c in cases:
        eng, _, grads = make_engine(c, isa=isa, threads=2)
        alone.append(_run_with_grads(eng, c, grads))
        eng.close()
    kk.trim_memory()
    made = [make_engine(c, isa=isa, threads=2) for c in cases]
    outs = []
    for (eng, _, grads), c in zip(made, cases):
        for g in grads.values():
            g[...] = 0
        out = np.full((c.T, c.H), np.nan, dtype=np.float32)
        eng.forward(c.x, c.ids, c.w, out)
        outs.append(out)
    for i in (2, 1, 0):
        (eng, _, grads), c = made[i], cases[i]
        dx = np.full((c.T, c.H), np.nan, dtype=np.float32)
        dw = np.full((c.T, c.K), np.nan, dtype=np.float32)
        eng.backward(c.dout, dx, dw, x=c.x)
        got = {"out": outs[i], "dx": dx, "dw": dw}
        got.update({k: np.array(v, dtype=np.float64) for k, v in grads.items()})
        _bits_equal(alone[i], got)
    staged = kk.memory_stats()["lora_bytes"]
    (eng0, lora0, _), c0 = made[0], cases[0]
    before = np.full((c0.T, c0.H), np.nan, dtype=np.float32)
    eng0.forward(c0.x, c0.ids, c0.w, before, save_for_backward=False)
    c1 = cases[1]
    made[1][0].forward(
        c1.x, c1.ids, c1.w, np.empty((c1.T, c1.H), np.float32), save_for_backward=False
    )
    lora0["b_down"][...] = lora0["b_down"] * 2 + 0.01
    eng0.lora_updated()
    after = np.full((c0.T, c0.H), np.nan, dtype=np.float32)
    eng0.forward(c0.x, c0.ids, c0.w, after, save_for_backward=False)
    assert not np.array_equal(before, after)
    for eng, _, _ in made:
        eng.close()
    assert kk.memory_stats()["lora_bytes"] == 0  # closing an engine frees its copy
    return staged


def _stage_bytes(fused: bool) -> list[int]:
    """Bytes of the three layers' fp32 LoRA weights: r (2H + 3I) per expert fused,
    r (3H + 3I) split. The stage pads H and I to whole blocks and keeps split B_gate / B_up
    block-diagonal, under 2x the weights."""
    per_h = 2 if fused else 3
    sizes = [
        e * 4 * (per_h * h + 3 * i) * 4 for e, h, i in ((6, 64, 96), (8, 128, 64), (6, 64, 96))
    ]
    return sizes


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fused", [True, False])
def test_lora_stage_keeps_recent_layers_with_the_bits_of_one_engine(isa: str, fused: bool) -> None:
    """Under the default budget (128 MiB) the stage keeps all three small layers' copies."""
    staged = _interleaved_layers(isa, fused)
    total = sum(_stage_bytes(fused))
    assert total <= staged < 2 * total + 3 * 4096


@pytest.mark.parametrize("fused", [True, False])
def test_lora_stage_budget_zero_keeps_one_layer(fused: bool) -> None:
    """KT_LORA_STAGE_MIB=0 (read once per process, so in a fresh one): every layer switch evicts
    and converts again, with the same bits; the stage holds the last layer run, not the sum."""
    here = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); import test_memory as t; "
        f"print(t._interleaved_layers(None, {fused}))"
    )
    env = {**os.environ, "KT_LORA_STAGE_MIB": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    staged = int(proc.stdout.split()[-1])
    last = _stage_bytes(fused)[0]
    assert last <= staged < 2 * last + 4096


def test_lora_stage_budget_env_is_checked() -> None:
    here = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); import test_memory as t; "
        "t._interleaved_layers(None, True)"
    )
    env = {**os.environ, "KT_LORA_STAGE_MIB": "lots"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "KT_LORA_STAGE_MIB='lots'" in proc.stderr and "ValueError" in proc.stderr


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("weight_dtype", "activation_dtype"), [("bf16", "bf16"), ("int8", "int8")])
def test_inference_forward_gives_the_bits_of_a_saved_one(
    isa: str, weight_dtype: str, activation_dtype: str
) -> None:
    """Without save_for_backward the gate/up outputs live only per tile, never as a whole: the
    output is the same bits."""
    c = make_case(6, 3, 64, 96, 4, 45, seed=55)
    eng, _, _ = make_engine(
        c, isa=isa, threads=2, weight_dtype=weight_dtype, activation_dtype=activation_dtype
    )
    saved = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, saved, save_for_backward=True)
    eng.clear_cache()
    plain = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, plain, save_for_backward=False)
    np.testing.assert_array_equal(plain, saved, strict=True)
    eng.close()


def test_pool_does_not_keep_outgrown_blocks() -> None:
    """Calls that grow (longer sequences) free the smaller free blocks instead of hoarding every
    size seen: after a short and then a long step the pool holds the long entry's blocks."""
    small = make_case(8, 2, 128, 96, 4, 16, seed=57)
    large = make_case(8, 2, 128, 96, 4, 200, seed=57)
    eng, _, _ = make_engine(small)
    kk.trim_memory()
    _forward(eng, small)
    _backward(eng, small)
    kk.reset_memory_peaks()
    _forward(eng, large)
    long_entry = kk.memory_stats()["cache_bytes"]
    _backward(eng, large)
    assert kk.memory_stats()["pool_bytes"] == long_entry
    eng.close()


def test_recompute_backward_needs_x() -> None:
    c = make_case(4, 2, 48, 32, 2, 9, seed=59)
    eng, _, _ = make_engine(c, activation_policy="recompute")
    _forward(eng, c)
    dx, dw = np.empty((c.T, c.H), np.float32), np.empty((c.T, c.K), np.float32)
    with pytest.raises(ValueError, match=r"activation_policy='recompute'.*pass its input again"):
        eng.backward(c.dout, dx, dw)
    assert eng.cache_depth == 1  # a rejected call pops nothing
    with pytest.raises(ValueError, match="x"):
        eng.backward(c.dout, dx, dw, x=c.x[:-1])
    eng.backward(c.dout, dx, dw, x=c.x)
    assert eng.cache_depth == 0
    eng.close()


# The packed bf16 buffers of E=4, H=1040, I=1024: 2I rows of depth H padded to 1056 (a multiple
# of 32), and H rows of depth I with its zero step, 1056 (quant::unaliased_depth); both over the
# 8 MiB threshold, neither a whole number of 2 MiB.
_GATE_UP = 4 * 2 * 1024 * 1056 * 2  # 16.5 MiB
_DOWN = 4 * 1040 * 1056 * 2  # 8.38 MiB
_WHOLE_HUGE_PAGES = (16 << 20) + (8 << 20)  # the whole 2 MiB pages of each


def _huge_page_vma_growth(setting: str | None) -> tuple[int, int, int, str]:
    """In a fresh process (KT_HUGE_PAGES is read once): the bytes of mappings advised as huge
    pages (VmFlags 'hg' in /proc/self/smaps) and the resident bytes (Rss) that loading a bf16
    weight set of two big buffers adds, its weight_bytes, and stderr."""
    code = """
import numpy as np, ml_dtypes, kt_kernels as kk
def scan():
    advised = rss = size = 0
    for line in open("/proc/self/smaps"):
        if line.startswith("Size:"):
            size = int(line.split()[1]) * 1024
        elif line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:") and " hg" in line:
            advised += size
    return advised, rss
bf16 = ml_dtypes.bfloat16
E, H, I = 4, 1040, 1024
gu = np.ones((E, 2 * I, H), bf16); d = np.ones((E, H, I), bf16)
eng = kk.MoEEngine(E, 2, H, I, max_tokens=16, num_threads=1)
advised, rss = scan()
eng.load_weights(gate_up=gu, down=d)
advised_after, rss_after = scan()
print(advised_after - advised, rss_after - rss, eng.memory_stats()["weight_bytes"])
"""
    env = dict(os.environ)
    env.pop("KT_HUGE_PAGES", None)
    if setting is not None:
        env["KT_HUGE_PAGES"] = setting
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return -1, -1, -1, proc.stderr
    grown, resident, weight_bytes = (int(v) for v in proc.stdout.split())
    return grown, resident, weight_bytes, proc.stderr


# Loading allocates a few small objects besides the weights (measured: 88 KiB); a block resident
# past its own bytes (a huge page faulted in over its tail) would add up to 2 MiB per buffer.
_OTHER_RESIDENT = 1 << 20


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
    reason="this kernel has no transparent huge pages (madvise(MADV_HUGEPAGE) is refused)",
)
@pytest.mark.parametrize("setting", [None, "1", "on", "auto"])
def test_big_weight_buffers_are_advised_huge_pages(setting: str | None) -> None:
    """Weight buffers of 8 MiB and more have their whole 2 MiB pages madvise(MADV_HUGEPAGE)d, the
    tail not: memory_stats counts the exact bytes and no more than those become resident."""
    grown, resident, weight_bytes, err = _huge_page_vma_growth(setting)
    assert grown >= 0, err
    assert grown == _WHOLE_HUGE_PAGES
    assert weight_bytes == _GATE_UP + _DOWN
    assert weight_bytes <= resident <= weight_bytes + _OTHER_RESIDENT


@pytest.mark.parametrize("setting", ["0", "off", " Off "])
def test_huge_pages_off_advises_nothing(setting: str) -> None:
    grown, resident, weight_bytes, err = _huge_page_vma_growth(setting)
    assert grown == 0, err
    assert weight_bytes == _GATE_UP + _DOWN
    assert weight_bytes <= resident <= weight_bytes + _OTHER_RESIDENT


def test_huge_pages_setting_is_checked() -> None:
    grown, _, _, err = _huge_page_vma_growth("sometimes")
    assert grown == -1
    assert "ValueError: KT_HUGE_PAGES='sometimes'" in err
