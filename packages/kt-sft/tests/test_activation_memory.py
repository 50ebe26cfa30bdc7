"""Engine activation memory under the retain / recompute / auto policies and gradient
checkpointing: identical gradients (bit for bit: the engine's recompute runs the forward's own
tiles, and checkpointing recomputes the same inputs), and at most one checkpointed layer's engine
activations alive at any time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_sft.backend import engine_available
from kt_sft.binding import LoRAFactor, LoRASource
from kt_sft.config import KTConfig, KTConfigError
from kt_sft.estimate import cache_entry_bytes
from kt_sft.function import kt_moe
from kt_sft.peft_hooks import _factor_views
from kt_sft.routed_experts import RoutedExperts

pytestmark = pytest.mark.skipif(not engine_available(), reason="kt-kernels engine not built")

E, K, H, INTER, R, T, LAYERS = 8, 2, 32, 48, 4, 40, 3


class Stack(nn.Module):
    """LAYERS blocks of ``x + kt_moe(tanh(proj(x)))`` with expert LoRA, one engine each."""

    def __init__(self, policy: str, budget: float | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        cfg = KTConfig(
            backend="engine",
            weight_dtype="bf16",
            lora_rank=R,
            lora_alpha=8.0,
            max_cache_depth=2,
            activation_policy=policy,
            activation_memory_budget=budget,
        )
        self.projs = nn.ModuleList(nn.Linear(H, H) for _ in range(LAYERS))
        with torch.no_grad():
            for p in self.projs.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.layers: list[RoutedExperts] = []
        self.sources: list[LoRASource] = []
        self.lora = nn.ParameterList()
        dims = {"gate_up": (H, 2 * INTER), "down": (INTER, H)}
        for i in range(LAYERS):
            layer = RoutedExperts(
                cfg,
                num_experts=E,
                top_k=K,
                hidden_size=H,
                intermediate_size=INTER,
                name=f"layer {i}",
            )
            layer.load_weights(
                torch.randn(E, 2 * INTER, H, generator=gen) * 0.2,
                torch.randn(E, H, INTER, generator=gen) * 0.2,
            )
            kinds = {}
            for kind, (in_f, out_f) in dims.items():
                a = nn.Parameter(torch.randn(E * R, in_f, generator=gen) * 0.2)
                b = nn.Parameter(torch.randn(out_f, R * E, generator=gen) * 0.2)
                va, vb = _factor_views(E, R, in_f, out_f)
                kinds[kind] = (LoRAFactor(a, va), LoRAFactor(b, vb))
                self.lora.extend([a, b])
            self.layers.append(layer)
            self.sources.append(LoRASource("fused", R, 2.0, kinds, key=("stack", i)))
        self.ids = [torch.randint(0, E, (T, K), generator=gen) for _ in range(LAYERS)]
        self.w = [torch.rand(T, K, generator=gen) for _ in range(LAYERS)]

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.projs[i](x))
        return x + kt_moe(self.layers[i], h, self.ids[i], self.w[i], self.sources[i])

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        for i in range(LAYERS):
            if mode == "none":
                x = self.block(i, x)
            else:
                x = checkpoint(self.block, i, x, use_reentrant=(mode == "reentrant"))
        return x


def _step(
    policy: str, mode: str, budget: float | None = None
) -> tuple[list[torch.Tensor], dict[str, int], int]:
    """Gradients of one step, the engine's peak bytes over it, and the cache bytes alive
    between forward and backward."""
    import kt_kernels as kk

    model = Stack(policy, budget)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=gen).requires_grad_(True)
    kk.reset_memory_peaks()
    y = model(x, mode)
    between = kk.memory_stats()["cache_bytes"]
    y.backward(torch.randn(T, H, generator=gen))
    stats = kk.memory_stats()
    grads = [x.grad, *[p.grad for p in model.parameters()]]
    for layer in model.layers:
        assert layer.pending_forwards == 0
        layer.close()
    return [g.clone() for g in grads], stats, between


def _one_entry(policy: str) -> int:
    return cache_entry_bytes(
        T, hidden_size=H, intermediate_size=INTER, top_k=K, lora_rank=R, policy=policy
    )


@pytest.mark.parametrize("mode", ["none", "reentrant", "non_reentrant"])
def test_same_gradient_bits_under_every_policy_and_checkpointing(mode: str) -> None:
    want, _, _ = _step("retain", "none")
    for policy in ("retain", "recompute", "auto"):
        got, _, _ = _step(policy, mode, budget=1e-9 if policy == "auto" else None)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (policy, mode)


def test_without_checkpointing_every_layer_keeps_its_entry() -> None:
    _, stats, between = _step("retain", "none")
    assert between >= LAYERS * _one_entry("retain")
    assert stats["cache_bytes"] == 0


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_keeps_one_layer_of_engine_activations(mode: str) -> None:
    _, stats, between = _step("retain", mode)
    assert between == 0  # the first pass caches nothing: every layer will be recomputed
    one = _one_entry("retain")
    # Page rounding of the entry's four buffers: at most 4 pages.
    assert one <= stats["cache_peak_bytes"] <= one + 4 * 4096
    assert stats["cache_bytes"] == 0


def test_recompute_policy_keeps_only_the_routing() -> None:
    _, stats, between = _step("recompute", "none")
    # The routing index lives in the entry itself; the engine's pooled cache memory is empty.
    assert between == 0 and stats["cache_peak_bytes"] == 0


def test_auto_policy_follows_the_budget() -> None:
    # A budget of two retained entries: the first two layers retain, the third recomputes.
    budget = (2 * _one_entry("retain") + 3 * 4096 * 4) / 1024**3
    _, _, between = _step("auto", "none", budget=budget)
    retained = 2 * _one_entry("retain") - 2 * 12 * T * K  # pooled: without the routing index
    assert retained <= between <= retained + 2 * 4 * 4096
    _, _, between = _step("auto", "none", budget=1000.0)
    assert between >= LAYERS * _one_entry("retain")


def test_policy_config() -> None:
    assert KTConfig().activation_policy == "retain"
    assert KTConfig(kt_activation_policy="Recompute").activation_policy == "recompute"
    cfg = KTConfig.from_dict({"kt_activation_policy": "auto", "kt_activation_memory_budget": 3})
    assert cfg.activation_policy == "auto" and cfg.activation_budget_bytes() == 3 * 1024**3
    assert KTConfig(activation_policy="auto").activation_budget_bytes() > 0
    with pytest.raises(KTConfigError, match="activation_policy must be one of"):
        KTConfig(activation_policy="keep")
    with pytest.raises(KTConfigError, match="activation_memory_budget must be > 0"):
        KTConfig(activation_memory_budget=0)


def test_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_ACTIVATION_POLICY", "recompute")
    assert KTConfig().activation_policy == "recompute"
