"""A random Qwen3-30B-A3B-shaped checkpoint in the hub layout, for ``bench_memory.py --full-size``.

Per-expert bf16 tensors in ``model-0000k-of-0000n.safetensors`` shards plus
``model.safetensors.index.json``, written tensor by tensor so that at most one tensor is in
memory; an interrupted write resumes, and a complete checkpoint of the same depth is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

__all__ = ["QWEN3_30B_A3B", "full_size_tensors", "write_full_size_checkpoint"]

GIB = 1024**3

#: Qwen3-30B-A3B's config.json (the fields that shape the model).
QWEN3_30B_A3B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
_MARKER = "kt bench_memory --full-size"  # in .kt-bench-full-size: a directory --full-size wrote


def full_size_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of the Qwen3-30B-A3B hub checkpoint cut to ``layers``
    decoder layers, in the hub's order (routed experts as per-expert ``gate_proj`` / ``up_proj``
    / ``down_proj``, which transformers and kt-models' reader fuse on load)."""
    c = QWEN3_30B_A3B
    H, inter, E = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], H))]
    for n in range(layers):
        pre = f"model.layers.{n}"
        out += [
            (f"{pre}.input_layernorm.weight", (H,)),
            (f"{pre}.self_attn.q_proj.weight", (q, H)),
            (f"{pre}.self_attn.k_proj.weight", (kv, H)),
            (f"{pre}.self_attn.v_proj.weight", (kv, H)),
            (f"{pre}.self_attn.o_proj.weight", (H, q)),
            (f"{pre}.self_attn.q_norm.weight", (c["head_dim"],)),
            (f"{pre}.self_attn.k_norm.weight", (c["head_dim"],)),
            (f"{pre}.post_attention_layernorm.weight", (H,)),
            (f"{pre}.mlp.gate.weight", (E, H)),
        ]
        for e in range(E):
            out += [
                (f"{pre}.mlp.experts.{e}.gate_proj.weight", (inter, H)),
                (f"{pre}.mlp.experts.{e}.up_proj.weight", (inter, H)),
                (f"{pre}.mlp.experts.{e}.down_proj.weight", (H, inter)),
            ]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (c["vocab_size"], H))]
    return out


def _plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (bf16) each."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _shard_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (length prefix + JSON, space-padded to 8 bytes) of ``entries``
    stored in order as bf16."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _shard_size(entries: list[tuple[str, tuple[int, ...]]]) -> int:
    return len(_shard_header(entries)) + sum(2 * math.prod(s) for _, s in entries)


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], first: int) -> None:
    """Write one safetensors shard tensor by tensor (only one tensor is in memory at a time):
    norms are ones, everything else 0.02 * randn seeded by the tensor's global index ``first +
    i`` (so an interrupted write resumes with the same values). Written to a temporary name and
    renamed, so a shard under its final name is complete."""
    import torch

    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_shard_header(entries))
        for i, (name, shape) in enumerate(entries):
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                gen = torch.Generator().manual_seed(first + i)
                t = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
            f.write(t.view(torch.int16).numpy().data)
            del t
    os.replace(tmp, path)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_full_size_checkpoint(directory: Path, layers: int, shard_gib: float = 4.0) -> bool:
    """Write (or complete) the random checkpoint in ``directory``; ``False`` when a complete
    one of this shape was already there. Refuses a non-empty directory it did not write and a
    disk without room for the missing shards (plus 1 GiB)."""
    from transformers import Qwen3MoeConfig

    shards = _plan_shards(full_size_tensors(layers), int(shard_gib * GIB))
    names = [_shard_name(i, len(shards)) for i in range(len(shards))]
    sizes = [_shard_size(s) for s in shards]
    marker = f"{_MARKER}, {layers} layers"
    index_path = directory / "model.safetensors.index.json"
    own = directory / ".kt-bench-full-size"
    same = own.is_file() and own.read_text().strip() == marker
    done = [
        same and (directory / n).is_file() and (directory / n).stat().st_size == z
        for n, z in zip(names, sizes)
    ]
    if index_path.is_file() and all(done):
        print(f"complete checkpoint found in {directory} ({sum(sizes) / GIB:,.1f} GiB): reused")
        return False
    if directory.exists() and any(directory.iterdir()):
        if not own.is_file():
            raise SystemExit(
                f"{directory} is not empty and was not written by --full-size; "
                "give an empty or new --dir"
            )
        for f in directory.iterdir():  # shards of another depth or an interrupted write
            if f.name.endswith((".safetensors", ".partial")) and f.name not in names:
                f.unlink()
    need = sum(z for z, ok in zip(sizes, done) if not ok)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    print(
        f"checkpoint: {layers} layers, {len(shards)} shards, {sum(sizes) / GIB:,.1f} GiB in "
        f"{directory}; {need / GIB:,.1f} GiB to write, {free / GIB:,.1f} GiB free"
    )
    if need + GIB > free:
        raise SystemExit(
            f"not enough disk space in {directory}: {need / GIB:,.1f} GiB to write plus 1 GiB "
            f"of headroom, {free / GIB:,.1f} GiB free; free some or pick another --dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    own.write_text(marker + "\n")
    cfg = Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_hidden_layers": layers})
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.to_json_file(str(directory / "config.json"))
    index_path.unlink(missing_ok=True)  # written last: its presence marks a complete checkpoint
    t0, first, written = time.perf_counter(), 0, 0
    for i, (entries, name, size) in enumerate(zip(shards, names, sizes)):
        if not done[i]:
            _write_shard(directory / name, entries, first)
            written += size
            rate = written / GIB / (time.perf_counter() - t0)
            print(f"  {name}: {size / GIB:,.2f} GiB ({rate:,.2f} GiB/s)", flush=True)
        first += len(entries)
    weight_map = {t: n for entries, n in zip(shards, names) for t, _ in entries}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=1))
    print(f"written in {time.perf_counter() - t0:,.0f} s")
    return True
