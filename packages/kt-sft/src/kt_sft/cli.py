"""The `kt-sft` command line: train, chat / generate, export, estimate, info."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

TRAIN_USAGE = """\
usage: kt-sft train [CONFIG.yaml] [--key value ...] [--print-config]

Fine-tune a MoE model with LoRA, routed experts on the CPU engine.

With no CONFIG it runs the embedded demo: a tiny Qwen3-MoE model (built and cached locally on
first use) fine-tuned on the bundled chat dataset. Every YAML key can also be given (or
overridden) on the command line as --key value, e.g.

  kt-sft train --max_steps 20 --output_dir /tmp/demo
  kt-sft train my.yaml --learning_rate 2e-4 --lora_rank 16

options:
  --print-config   print the resolved configuration as YAML and exit
  -h, --help       show this help and exit

Keys (defaults in brackets; with no CONFIG the demo's values apply, shown by --print-config;
kt_* engine options and the full descriptions: docs/configuration.md):
{keys}

Several processes (one per GPU, or CPU shares; docs/distributed.md): start it with torchrun or
accelerate launch. The global batch is per_device_train_batch_size x gradient_accumulation_steps
x processes, split over the ranks; each node's local rank 0 holds the CPU engine and serves the
other ranks' tokens; rank 0 writes every file and logs the global loss. Resume with the same
number of processes. KT_ENGINE_PLACEMENT (per_node | per_rank) and KT_DIST_TIMEOUT (seconds a
rank waits for a crashed or stuck peer) apply.

  torchrun --nproc-per-node 2 -m kt_sft.cli train --per_device_train_batch_size 4
  accelerate launch --multi_gpu --num_processes 2 -m kt_sft.cli train my.yaml
"""


def _train_usage() -> str:
    """TRAIN_USAGE with every config key, its default and the first sentence of its help."""
    import dataclasses
    import re
    import textwrap

    from kt_sft.train.schema import GROUPS, describe_keys

    lines: list[str] = []
    group_seen = None
    for group, f in describe_keys():
        if group != group_seen:
            lines.append(f"  {GROUPS[group]}:")
            group_seen = group
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if default is None:
            shown = "required" if "Required" in f.metadata["help"] else "unset"
        else:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
        first = re.split(r"(?<=\.)\s+(?=[A-Z`])", f.metadata["help"])[0].rstrip(".")
        lines += textwrap.wrap(
            f"--{f.name} [{shown}]  {first}",
            width=98,
            initial_indent="    ",
            subsequent_indent="        ",
        )
    return TRAIN_USAGE.format(keys="\n".join(lines))


def _cmd_info(args: argparse.Namespace) -> int:
    from kt_sft.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if any(a in ("-h", "--help") for a in rest):
        print(_train_usage())
        return 0
    print_config = "--print-config" in rest or "--print_config" in rest
    rest = [a for a in rest if a not in ("--print-config", "--print_config")]
    config_path = None
    if rest and not rest[0].startswith("-"):
        config_path = rest.pop(0)
    from kt_sft.train import load_train_config

    cfg = load_train_config(config_path, rest)
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from kt_sft.train.loop import train

    result = train(cfg)
    return 130 if result.interrupted else 0


def _kt_tokens(tokens: Sequence[str]) -> list[str]:
    """``--kt`` values as option tokens: ``kt_num_threads=2`` (the documented form) and
    ``kt_num_threads 2`` become ``--kt_num_threads=2`` / ``--kt_num_threads 2``; ``--...`` tokens
    (``--kt=--kt_num_threads=2``) stay as they are."""
    out = []
    for t in tokens:
        if not t.startswith("--") and ("=" in t or t.startswith("kt_")):
            t = "--" + t
        out.append(t)
    return out


def _cmd_chat(args: argparse.Namespace) -> int:
    from kt_sft.chat import load_chat_session
    from kt_sft.train.schema import parse_overrides

    kt_options = parse_overrides(_kt_tokens(args.kt)) if args.kt else {}
    bad = [k for k in kt_options if not k.startswith("kt_")]
    if bad:
        raise SystemExit(f"kt-sft {args.command}: --kt takes kt_* options, got {bad}")
    threads = args.torch_threads or (1 if args.model == "embedded" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    session = load_chat_session(
        args.model,
        args.adapter,
        use_kt=not args.stock,
        kt_options=kt_options,
        template=args.template,
        device=args.device,
        bf16=args.bf16,
    )
    try:
        gen = {
            "system": args.system,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
        }
        prompts = list(args.prompt or [])
        if args.command == "generate" and not prompts:
            prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if prompts:
            for p in prompts:
                _answer(session, p, gen, args.compare)
            return 0
        print("chat with the model (empty line or Ctrl-D to quit)", file=sys.stderr)
        while True:
            try:
                p = input("you> ")
            except EOFError:
                break
            if not p.strip():
                break
            _answer(session, p, gen, args.compare)
        return 0
    finally:
        session.close()


def _answer(session: object, prompt: str, gen: dict, compare: bool) -> None:
    if compare and session.has_adapter:
        print(f"prompt:     {prompt}")
        print(f"base:       {session.generate(prompt, base=True, **gen)}")
        print(f"fine-tuned: {session.generate(prompt, **gen)}", flush=True)
    elif compare:
        print(f"prompt: {prompt}\nmodel:  {session.generate(prompt, **gen)}", flush=True)
    else:
        print(session.generate(prompt, **gen), flush=True)


def _cmd_export(args: argparse.Namespace) -> int:
    from kt_sft.export import export_merged

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = export_merged(
        args.adapter,
        args.output,
        base_model=args.model,
        dtype=args.dtype,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        progress=None if args.quiet else progress,
    )
    print(
        f"merged {result.lora_targets} LoRA targets into {result.merged_tensors} of "
        f"{result.total_tensors} tensors ({result.total_bytes / 2**20:.1f} MiB in "
        f"{len(result.shards)} shards, dtype {result.dtype}) in {result.seconds:.1f} s: "
        f"{result.output_dir}"
    )
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from kt_sft.estimate import ModelShape, estimate_memory, format_estimate, shape_from_config

    if args.config:
        shape = shape_from_config(args.config)
        overrides = {
            k: v
            for k, v in (
                ("num_experts", args.experts),
                ("num_moe_layers", args.layers),
                ("hidden_size", args.hidden),
                ("intermediate_size", args.intermediate),
                ("top_k", args.top_k),
            )
            if v is not None
        }
        shape = shape.replace(**overrides)
    else:
        missing = [
            f"--{n}"
            for n, v in (
                ("experts", args.experts),
                ("layers", args.layers),
                ("hidden", args.hidden),
                ("intermediate", args.intermediate),
            )
            if v is None
        ]
        if missing:
            raise SystemExit(
                f"kt-sft estimate: give --config PATH (a config.json or checkpoint "
                f"directory) or all of --experts --layers --hidden --intermediate "
                f"(missing {' '.join(missing)})"
            )
        shape = ModelShape(
            num_experts=args.experts,
            num_moe_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            top_k=args.top_k or 8,
            other_params=args.other_params or 0,
        )
    if args.other_params is not None:
        shape = shape.replace(other_params=args.other_params)
    if args.vocab is not None:
        shape = shape.replace(vocab_size=args.vocab)
    dtypes = args.dtype or ["bf16", "int8", "int4"]
    results = [
        estimate_memory(
            shape,
            weight_dtype=d,
            lora_rank=args.lora_rank,
            max_tokens=args.max_tokens,
            cache_depth=args.cache_depth,
            group_size=args.group_size,
            training=not args.inference,
            non_expert_on_gpu=args.gpu,
            policy=args.policy,
            checkpointing=args.checkpointing,
            budget=(args.budget * 1024**3 if args.budget else None),
            loss=args.loss,
        )
        for d in dtypes
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        known = bool(args.config) or args.other_params is not None
        print(format_estimate(shape, results, other_params_known=known))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `kt-sft`."""
    from kt_sft import __version__

    parser = argparse.ArgumentParser(
        prog="kt-sft", description="LoRA fine-tuning of MoE models with CPU experts."
    )
    parser.add_argument("--version", action="version", version=f"kt-sft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults_shown = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser(
        "train",
        help="fine-tune (no config: the embedded demo)",
        add_help=False,
        usage="kt-sft train [CONFIG.yaml] [--key value ...]",
    )
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=_cmd_train)

    for name, help_text in (
        ("chat", "chat with a base model + adapter"),
        ("generate", "generate replies to --prompt (or stdin lines)"),
    ):
        p = sub.add_parser(name, help=help_text, formatter_class=defaults_shown)
        p.add_argument(
            "--model",
            default="embedded",
            help="base checkpoint directory (default: the embedded demo model)",
        )
        p.add_argument("--adapter", help="PEFT adapter directory (or a kt-sft output_dir)")
        p.add_argument(
            "--prompt",
            action="append",
            help="prompt to answer (repeatable); without it chat is interactive",
        )
        p.add_argument("--system", help="system message")
        p.add_argument(
            "--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=48
        )
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--template", choices=("auto", "chatml"), default="auto")
        p.add_argument(
            "--compare",
            action="store_true",
            help="also print the base model's reply (adapter disabled)",
        )
        p.add_argument(
            "--stock",
            action="store_true",
            help="load the stock transformers model (experts in PyTorch, no kt)",
        )
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--bf16", action="store_true", help="PyTorch side in bfloat16")
        p.add_argument(
            "--torch-threads",
            "--torch_threads",
            dest="torch_threads",
            type=int,
            help="PyTorch intra-op threads (default: PyTorch's; 1 for the embedded demo model)",
        )
        p.add_argument(
            "--kt",
            nargs="+",
            metavar="KT_OPTION",
            help="engine options as --kt kt_num_threads=2 ...",
        )
        p.set_defaults(func=_cmd_chat)

    exp = sub.add_parser(
        "export",
        help="merge an adapter into its base: a stock Hugging Face checkpoint",
        formatter_class=defaults_shown,
        description="Write base + LoRA adapter as one merged Hugging Face checkpoint that stock "
        "transformers loads (AutoModelForCausalLM.from_pretrained). The base checkpoint is "
        "streamed tensor by tensor, so memory stays about one tensor plus the adapter, never the "
        "whole model; tensor names, expert layout and shard files are the base's. FP8 "
        "block-scaled bases are dequantized (bfloat16 by default).",
    )
    exp.add_argument(
        "--adapter",
        required=True,
        help="PEFT LoRA adapter directory, or a kt-sft output_dir / checkpoint",
    )
    exp.add_argument("--output", "-o", required=True, help="directory for the merged checkpoint")
    exp.add_argument(
        "--model",
        default=None,
        help="base checkpoint directory, or 'embedded' (default: the adapter's "
        "base_model_name_or_path)",
    )
    exp.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"),
        help="dtype of the written weights (default: auto, the base's; FP8 -> bfloat16)",
    )
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output (only once the new checkpoint is complete)",
    )
    exp.add_argument(
        "--trust-remote-code",
        "--trust_remote_code",
        dest="trust_remote_code",
        action="store_true",
        help="allow a base whose config needs remote code",
    )
    exp.add_argument("--quiet", "-q", action="store_true", help="no per-shard progress lines")
    exp.set_defaults(func=_cmd_export)

    est = sub.add_parser(
        "estimate",
        help="RAM needed for a MoE model with CPU experts",
        formatter_class=defaults_shown,
    )
    est.add_argument(
        "--config", help="a config.json or checkpoint directory to read the shape from"
    )
    est.add_argument("--experts", type=int, help="E: routed experts per MoE layer")
    est.add_argument("--layers", type=int, help="MoE layers")
    est.add_argument("--hidden", type=int, help="H: hidden size")
    est.add_argument("--intermediate", type=int, help="I: intermediate size of one expert")
    est.add_argument(
        "--top-k", "--top_k", dest="top_k", type=int, help="K: experts per token (default 8)"
    )
    est.add_argument(
        "--other-params",
        "--other_params",
        dest="other_params",
        type=float,
        help="parameters outside the routed experts (read from --config)",
    )
    est.add_argument(
        "--vocab",
        "--vocab-size",
        "--vocab_size",
        dest="vocab",
        type=int,
        help="vocabulary size, for the LM head and loss (read from --config)",
    )
    est.add_argument(
        "--dtype",
        action="append",
        choices=("bf16", "int8", "int4"),
        help="expert weight dtype (repeatable; default: all three)",
    )
    est.add_argument("--lora-rank", "--lora_rank", dest="lora_rank", type=int, default=8)
    est.add_argument(
        "--max-tokens",
        "--max_tokens",
        "--tokens",
        dest="max_tokens",
        type=int,
        default=4096,
        help="tokens per step / MoE call (batch x sequence)",
    )
    est.add_argument(
        "--cache-depth",
        "--cache_depth",
        dest="cache_depth",
        type=int,
        default=1,
        help="pending forwards per layer (gradient accumulation without checkpointing)",
    )
    est.add_argument(
        "--policy",
        choices=("retain", "recompute", "auto"),
        default="retain",
        help="engine activation policy (KTConfig.activation_policy)",
    )
    est.add_argument(
        "--checkpointing",
        choices=("none", "reentrant", "non_reentrant"),
        default="none",
        help="gradient checkpointing of the decoder layers",
    )
    est.add_argument(
        "--loss",
        choices=("chunked", "full"),
        default="chunked",
        help="chunked: the LM head and loss a chunk of tokens at a time (kt-sft train); full: "
        "the model's own loss over all T tokens' logits (model(labels=...))",
    )
    est.add_argument(
        "--budget",
        type=float,
        help="GiB the auto policy may retain (default: half the available memory)",
    )
    est.add_argument(
        "--group-size",
        "--group_size",
        dest="group_size",
        type=int,
        default=128,
        help="int4 quantization group size",
    )
    est.add_argument(
        "--gpu", action="store_true", help="the non-expert part lives on a GPU (not counted in RAM)"
    )
    est.add_argument(
        "--inference",
        action="store_true",
        help="inference only: no LoRA optimizer state, no activation cache",
    )
    est.add_argument("--json", action="store_true", help="print JSON")
    est.set_defaults(func=_cmd_estimate)

    info = sub.add_parser("info", help="versions, CPU features, engine ISA and threads")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from kt_sft.data.loading import DataError
    from kt_sft.train.artifacts import OutputDirError
    from kt_sft.train.loop import NonFiniteLossError
    from kt_sft.train.modeling import ModelLoadError
    from kt_sft.train.schema import ConfigError

    errors: list[type[BaseException]] = [
        ConfigError,
        DataError,
        OutputDirError,
        ModelLoadError,
        FileNotFoundError,
        NonFiniteLossError,
    ]
    try:
        from kt_sft.config import KTConfigError

        errors.append(KTConfigError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from kt_sft.export import ExportError

        errors.append(ExportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from kt_sft.adapter import KTAdapterError

        errors.append(KTAdapterError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from kt_models import KtModelsError

        errors.append(KtModelsError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _quiet_libraries() -> None:
    """Hide transformers' per-load progress bars and a deprecation warning PEFT triggers: the
    commands print their own progress."""
    import warnings

    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kt-sft` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # free-form --key value overrides: parsed by the config schema
        args = argparse.Namespace(command="train", rest=argv[1:], func=_cmd_train)
    else:
        args = build_parser().parse_args(argv)
    if args.command in ("train", "chat", "generate", "export"):
        _quiet_libraries()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}kt-sft: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"{_rank_prefix()}kt-sft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except _distributed_errors() as exc:
        print(f"{_rank_prefix()}kt-sft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(
            f"{_rank_prefix()}kt-sft {args.command}: error: {exc.strerror}; free some space "
            "(or choose another output_dir) and resume from the last checkpoint",
            file=sys.stderr,
        )
        return 1


def _distributed_errors() -> tuple[type[BaseException], ...]:
    """A peer rank crashed, hung or ran out of step (only under a multi-process launcher)."""
    module = sys.modules.get("kt_sft.distributed")
    return (module.KTDistributedError,) if module is not None else ()


def _rank_prefix() -> str:
    """``[rank N] `` under a launcher that started several processes (messages interleave)."""
    import os

    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


if __name__ == "__main__":
    sys.exit(main())
