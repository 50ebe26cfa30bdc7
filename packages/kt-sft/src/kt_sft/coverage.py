"""Which model types of the installed transformers train with kt, checked one LoRA step each.

For every model type whose modeling file uses transformers' experts interface
(:func:`kt_models.discover.experts_interface_model_types`), :func:`check_model_type` builds a
tiny random model from the type's own config (:func:`kt_models.tiny.build_any`: 2 layers,
8 experts, top-2, hidden size 64, fixed seed) and compares one LoRA training step of the
kt-wrapped model against stock transformers + PEFT in fp32 (LoRA on the routed experts through
``target_parameters`` and on every other linear layer), then reloads kt's saved adapter with
stock PEFT. The outcome is one :class:`TypeReport`:

* ``supported``: the loss, every LoRA gradient and the reloaded adapter's logits are within
  :data:`TOLERANCE` (and :func:`coverage` also streams the type from its ``save_pretrained``
  checkpoint, unless transformers' own save of the tiny model fails: the reason says so);
* ``refused``: kt refuses the type (the reason names the model type and the feature);
* ``skipped``: the type cannot be built from its config alone, or the stock step fails;
* ``failed``: kt ran but differs from stock, or crashed (a bug: the generated test fails).

Tolerances (relative L2 error), as the per-architecture parity tests derive them: the engine
stores expert weights in bf16, so the stock model's expert weights are rounded to bf16 first;
what remains is the engine's bf16 rounding of activations (2^-9 relative per rounding, a handful
per path, fp32 accumulation): loss 1e-4, LoRA gradients 2e-2; the reloaded adapter's logits
per token: median 1e-2 and at most 1 token in 16 above 2e-2 (top-k routing is discontinuous:
where two experts nearly tie, bf16 rounding upstream may pick the other one for that token).

``python -m kt_sft.coverage --write docs/models.md`` regenerates the table in the docs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "TABLE_BEGIN",
    "TABLE_END",
    "TOLERANCE",
    "StockSaveError",
    "TypeReport",
    "check_model_type",
    "check_streaming",
    "coverage",
    "markdown_table",
    "write_table",
]

#: Relative L2 tolerances of the engine (bf16) against stock fp32 (see the module docstring).
TOLERANCE: dict[str, float] = {"loss": 1e-4, "grad": 2e-2, "logits": 2e-2}

#: Markers around the generated table in ``docs/models.md``.
TABLE_BEGIN = "<!-- BEGIN GENERATED: python -m kt_sft.coverage --write docs/models.md -->"
TABLE_END = "<!-- END GENERATED -->"

Status = Literal["supported", "refused", "skipped", "failed"]


class StockSaveError(RuntimeError):
    """transformers' own ``save_pretrained`` fails for the tiny model, so there is no checkpoint
    to stream from (a limitation of the type's conversion rules, not of kt)."""


@dataclass(frozen=True)
class TypeReport:
    """The outcome of :func:`check_model_type` for one model type."""

    model_type: str
    status: Status
    #: Why a type is refused, skipped or failed ("" when supported).
    reason: str = ""
    #: The experts' layout as the engine sees it (``"default"``, or the flags that differ) and
    #: the activation, e.g. ``"default, silu"``; "" when the model was not built.
    variant: str = ""
    #: Largest relative errors seen (``loss``, ``grad``, ``logits``), for supported types.
    errors: tuple[tuple[str, float], ...] = ()
    #: Which :data:`kt_models.tiny.SECOND_LAYER_CHOICES` entry built the tiny model.
    second_layer: str = ""


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line (a message's first two non-empty lines: validation errors
    put the cause on the second)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
    text = f"{type(exc).__name__}: {' '.join(lines)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _variant(model: torch.nn.Module) -> str:
    from kt_models.discover import experts_layout, find_experts_modules

    found = find_experts_modules(model)
    if not found:
        return ""
    layout = experts_layout(found[0][1])
    act = "custom gate" if layout.custom_gate else (layout.activation or layout.activation_class)
    return f"{layout.variant}, {act}" if not layout.custom_gate else layout.variant


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    from kt_sft.testing import rel_err

    return rel_err(a, b)


def _registered() -> set[str]:
    from kt_models import supported_model_types

    return set(supported_model_types())


def _prepare(model_type: str, seed: int, second_layer: str) -> Any:
    """The tiny model, its variant, the LoRA kwargs and the batch, after one stock step; or the
    :class:`TypeReport` saying why not (skipped / refused)."""
    from peft import LoraConfig, get_peft_model

    from kt_models import UnsupportedArchitectureError, get_arch_spec
    from kt_models.discover import find_experts_modules
    from kt_models.tiny import build_any
    from kt_sft.testing import lora_config_kwargs, make_batch

    try:
        model = build_any(model_type, seed=seed, second_layer=second_layer)
    except Exception as exc:
        return TypeReport(
            model_type, "skipped", f"cannot be built from its config alone ({_first_line(exc)})"
        )
    variant = _variant(model)
    if not find_experts_modules(model) and model_type not in _registered():
        return TypeReport(
            model_type,
            "skipped",
            "its tiny config (derived from the default config) has no MoE layer",
        )
    try:
        get_arch_spec(model)
    except UnsupportedArchitectureError as exc:
        return TypeReport(model_type, "refused", exc.reason or str(exc), variant)
    vocab = int(model.config.get_text_config().vocab_size)
    batch = make_batch(vocab, batch=2, seq=8, seed=seed + 2)

    def stock_step(kwargs: dict) -> None:
        torch.manual_seed(seed)
        stock = get_peft_model(copy.deepcopy(model), LoraConfig(**copy.deepcopy(kwargs)))
        stock.train()
        torch.manual_seed(seed + 1)
        stock(**batch).loss.backward()

    try:
        kwargs = lora_config_kwargs(model)
        try:
            stock_step(kwargs)
        except Exception:
            # Some routers cannot carry LoRA in stock PEFT (a parameter LoRA, or an nn.Linear
            # subclass returning a tuple): train them frozen.
            router = get_arch_spec(model).router_attr
            kwargs = lora_config_kwargs(model, router=False)
            kwargs["target_modules"] = [n for n in kwargs["target_modules"] if n != router]
            stock_step(kwargs)
    except Exception as exc:
        return TypeReport(
            model_type, "skipped", f"the stock step fails ({_first_line(exc)})", variant
        )
    return model, variant, kwargs, batch, vocab


def check_model_type(
    model_type: str, *, seed: int = 0, work_dir: str | Path | None = None
) -> TypeReport:
    """One LoRA step of ``model_type``'s tiny model with kt against stock, as a report.

    The tiny model is :func:`kt_models.tiny.build_any`'s, with the first of
    :data:`kt_models.tiny.SECOND_LAYER_CHOICES` that builds and trains in stock (the report
    records which). ``work_dir`` receives the saved adapters (a temporary directory when
    ``None``). Uses the compiled engine (bf16 expert weights).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    import kt_sft
    from kt_models import UnsupportedArchitectureError
    from kt_models.tiny import SECOND_LAYER_CHOICES
    from kt_sft.hf_experts import KTUnsupportedExpertsError
    from kt_sft.testing import copy_lora, make_batch, make_pair, named_trainable

    first: TypeReport | None = None
    for second_layer in SECOND_LAYER_CHOICES:
        prepared = _prepare(model_type, seed, second_layer)
        if not isinstance(prepared, TypeReport):
            break
        if prepared.status == "refused":
            return prepared
        first = first or prepared
    else:
        assert first is not None
        return first
    model, variant, kwargs, batch, vocab = prepared
    report = functools.partial(TypeReport, second_layer=second_layer)

    clean = copy.deepcopy(model)
    cfg = kt_sft.KTConfig(backend="engine", weight_dtype="bf16", lora_rank=8, lora_alpha=16.0)
    try:
        pair = make_pair(model, cfg)
    except (UnsupportedArchitectureError, KTUnsupportedExpertsError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return report(model_type, "refused", reason, variant)
    except Exception as exc:
        return report(model_type, "failed", f"wrap_model crashed ({_first_line(exc)})", variant)
    kt = None
    try:
        torch.manual_seed(seed)
        stock = get_peft_model(pair.stock, LoraConfig(**copy.deepcopy(kwargs)))
        kt = kt_sft.get_peft_model(pair.kt, LoraConfig(**copy.deepcopy(kwargs)))
        copy_lora(stock, kt, seed=seed)
        for pm in (stock, kt):
            pm.train()
        # The same random state for both steps (routers with jitter / sampling in training).
        torch.manual_seed(seed + 1)
        loss_stock = stock(**batch).loss
        loss_stock.backward()
        torch.manual_seed(seed + 1)
        loss_kt = kt(**batch).loss
        loss_kt.backward()
        errors: dict[str, float] = {
            "loss": abs(float(loss_kt) - float(loss_stock)) / abs(float(loss_stock))
        }
        stock_params, kt_params = dict(named_trainable(stock)), dict(named_trainable(kt))
        grad_err, expert_grads = 0.0, 0
        for name, p in stock_params.items():
            q = kt_params[name]
            if p.grad is None:
                if q.grad is not None and float(q.grad.abs().max()) != 0.0:
                    return report(
                        model_type, "failed", f"{name}: kt has a gradient, stock none", variant
                    )
                continue
            if q.grad is None:
                return report(model_type, "failed", f"{name}: no gradient on the kt side", variant)
            err = _rel(q.grad, p.grad)
            grad_err = max(grad_err, err)
            expert_grads += ".experts." in name
            if err > TOLERANCE["grad"]:
                return report(
                    model_type, "failed", f"{name}: gradient relative error {err:.2e}", variant
                )
        errors["grad"] = grad_err
        if errors["loss"] > TOLERANCE["loss"]:
            return report(
                model_type, "failed", f"loss relative error {errors['loss']:.2e}", variant
            )
        if expert_grads < 4:
            return report(
                model_type,
                "failed",
                f"only {expert_grads} routed-expert LoRA gradients compared",
                variant,
            )
        from safetensors.torch import load_file

        from kt_sft.testing import round_experts_to_bf16

        round_experts_to_bf16(clean)
        stock_clean = copy.deepcopy(clean)
        probe = make_batch(vocab, batch=2, seq=8, seed=seed + 7)["input_ids"]
        kt.eval()
        stock.eval()
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            kt_dir, stock_dir = Path(tmp, "kt"), Path(tmp, "stock")
            kt.save_pretrained(kt_dir)
            stock.save_pretrained(stock_dir)
            # kt writes the adapter stock PEFT writes, tensor for tensor.
            mine = load_file(str(kt_dir / "adapter_model.safetensors"))
            theirs = load_file(str(stock_dir / "adapter_model.safetensors"))
            if mine.keys() != theirs.keys():
                diff = sorted(mine.keys() ^ theirs.keys())[:3]
                return report(
                    model_type,
                    "failed",
                    f"saved adapter keys differ from stock PEFT's ({diff})",
                    variant,
                )
            for key, tensor in theirs.items():
                if not torch.equal(mine[key], tensor):
                    return report(
                        model_type,
                        "failed",
                        f"saved adapter tensor {key} differs from stock PEFT's",
                        variant,
                    )
            with torch.no_grad():
                want = kt(input_ids=probe).logits
                in_memory = stock(input_ids=probe).logits
                loaded = PeftModel.from_pretrained(clean, str(kt_dir))
                loaded.eval()
                got = loaded(input_ids=probe).logits
                stock_loaded = PeftModel.from_pretrained(stock_clean, str(stock_dir))
                stock_loaded.eval()
                stock_round_trip = _rel(stock_loaded(input_ids=probe).logits, in_memory)
        note = ""
        if stock_round_trip > 1e-5:
            # Stock PEFT does not reload its own adapter to the same model (a transformers / PEFT
            # limitation of this type): compare kt's reloaded adapter with stock's reloaded one.
            note = (
                f"stock PEFT's own adapter round trip changes the logits by "
                f"{stock_round_trip:.1e}; kt's adapter is identical to stock's"
            )
            with torch.no_grad():
                want = stock_loaded(input_ids=probe).logits
        per_token = ((got - want).norm(dim=-1) / want.norm(dim=-1)).flatten().double()
        median = float(per_token.median())
        above = float((per_token > TOLERANCE["logits"]).double().mean())
        errors["logits"] = median
        if median > TOLERANCE["logits"] / 2 or above > 1 / 16:
            return report(
                model_type,
                "failed",
                f"reloaded adapter: per-token logits relative error median "
                f"{median:.2e}, {above:.0%} of tokens above "
                f"{TOLERANCE['logits']:.0e}",
                variant,
            )
        return report(model_type, "supported", note, variant, tuple(errors.items()))
    except Exception as exc:
        return report(model_type, "failed", f"kt step crashed ({_first_line(exc)})", variant)
    finally:
        if kt is not None:
            kt_sft.close(kt)


def check_streaming(
    model_type: str,
    work_dir: str | Path,
    *,
    seed: int = 0,
    shard_size: str = "200KB",
    second_layer: str = "last",
) -> float:
    """Save ``model_type``'s tiny model with ``save_pretrained`` (sharded; transformers writes
    the experts through its reverse conversion rules) and load it back with
    :func:`kt_sft.load_model` (experts streamed from the shards into the engines, never created
    in torch). Returns the relative error of the loaded model's logits against the original's,
    with kt's exact fp32 operator (``backend="torch"``), so only the tensor names and layouts
    are under test.
    """
    import kt_sft
    from kt_models.tiny import build_any, save
    from kt_sft.testing import make_batch, rel_err

    model = build_any(model_type, seed=seed, second_layer=second_layer)
    try:
        path = save(model, Path(work_dir) / model_type, shard_size=shard_size)
    except Exception as exc:
        raise StockSaveError(
            f"stock save_pretrained of the tiny model fails ({_first_line(exc)})"
        ) from exc
    cfg = kt_sft.KTConfig(backend="torch", weight_dtype="fp32", lora_rank=4, lora_alpha=8.0)
    loaded = kt_sft.load_model(path, cfg)
    try:
        for name, module in loaded.named_modules():
            if hasattr(module, "_kt_engine") or "_kt_engine" in module.__dict__:
                if module.gate_up_proj.numel() != 0:
                    raise AssertionError(f"{model_type}: {name} holds its experts in torch")
        vocab = int(model.config.get_text_config().vocab_size)
        ids = make_batch(vocab, batch=2, seq=8, seed=seed + 3)["input_ids"]
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
            want = model(input_ids=ids).logits
        return rel_err(got, want)
    finally:
        kt_sft.close(loaded)


def coverage(model_types: list[str] | None = None, *, streaming: bool = True) -> list[TypeReport]:
    """:func:`check_model_type` for ``model_types`` (default: every experts-interface causal-LM
    type of the installed transformers); with ``streaming``, every supported type must also
    pass :func:`check_streaming` (relative 1e-5) or is reported as failed."""
    from kt_models.discover import experts_interface_model_types

    types = model_types if model_types is not None else experts_interface_model_types()
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in types:
            report = check_model_type(model_type, work_dir=tmp)
            if streaming and report.status == "supported":
                try:
                    err = check_streaming(model_type, tmp, second_layer=report.second_layer)
                    problem = (
                        f"streamed loading: logits relative error {err:.2e}" if err > 1e-5 else ""
                    )
                except StockSaveError as exc:
                    # kt is not at fault; the training step matched: say what was not checked.
                    note = f"streamed loading not checked: {exc}"
                    reason = f"{report.reason}; {note}" if report.reason else note
                    report = dataclasses.replace(report, reason=reason)
                    problem = ""
                except Exception as exc:
                    problem = f"streamed loading crashed ({_first_line(exc)})"
                if problem:
                    report = dataclasses.replace(report, status="failed", reason=problem)
            reports.append(report)
    return reports


def markdown_table(reports: list[TypeReport]) -> str:
    """The coverage table (Markdown) with counts per status."""
    import transformers

    counts: dict[str, int] = {}
    for r in reports:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(
        f"{counts.get(s, 0)} {s}" for s in ("supported", "refused", "skipped", "failed")
    )
    lines = [
        f"Model types of transformers {transformers.__version__} whose experts use the experts "
        f"interface ({len(reports)}): {summary}.",
        "",
        "| `model_type` | kt | experts layout (engine variant) | reason |",
        "| --- | --- | --- | --- |",
    ]
    for r in sorted(reports, key=lambda r: r.model_type):
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.model_type}` | {r.status} | {r.variant or '—'} | {reason or '—'} |")
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, reports: list[TypeReport]) -> None:
    """Replace the text between :data:`TABLE_BEGIN` and :data:`TABLE_END` in ``path``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {TABLE_BEGIN!r} ... {TABLE_END!r} block to replace")
    new = text[: start + len(TABLE_BEGIN)] + "\n\n" + markdown_table(reports) + "\n" + text[end:]
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line: print the coverage table, or ``--write FILE`` it into a docs page."""
    parser = argparse.ArgumentParser(prog="python -m kt_sft.coverage", description=__doc__)
    parser.add_argument("--write", metavar="FILE", help="replace the generated block in FILE")
    parser.add_argument("model_types", nargs="*", help="model types (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reports = coverage(args.model_types or None)
    if args.write:
        write_table(args.write, reports)
    print(markdown_table(reports))
    return 1 if any(r.status == "failed" for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
