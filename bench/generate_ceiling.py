"""The ceiling of a server built on transformers' ``generate``: the bundle's model decoding the benchmark prompts in
static greedy batches, with no server around it. Prints one JSON line (progress on stderr)::

    python bench/generate_ceiling.py                           # the embedded bundle, batches of 1, 8 and 16
    python bench/generate_ceiling.py --batch-sizes 16 --requests 64

Each batch is what the transformers backend runs when that many clients wait: the prompts rendered as the server
renders them (left padding), ``max_new_tokens`` as the clients ask, stopping each row at the bundle's tag (so the
batch lasts as long as its longest answer). requests/s here is the most the transformers backend could answer at
that many clients on this machine if HTTP, verification and the SDM head cost nothing: compare it with
``bench/vs_vllm.py``'s transformers figures (same prompts, same ``max_tokens``) to see how much of the gap to vLLM
is the serving code and how much is transformers' generation itself.

``--continuous`` measures transformers' continuous batching (``generate_batch``) beside it, at most that many
requests per forward step: the lever a transformers backend would pull to keep its batch full. Continuous batching
stops at end-of-sequence only (no stop strings), so its rows also decode the few tokens after the tag; the tokens per
request say by how much.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server_load import choose_prompts, device_info, log, parse_levels  # noqa: E402
from bench.vs_vllm import DEFAULT_BUNDLE, rendered_ids  # noqa: E402


def figures(mode: str, batch: int, requests: int, wall: float, generated: int) -> dict:
    """One measured level: ``requests`` decoded in ``wall`` seconds, ``generated`` tokens in all."""
    return {
        "batch": batch,
        "mode": mode,
        "requests": requests,
        "wall_s": round(wall, 3),
        "requests_per_s": round(requests / wall, 4),
        "generated_tokens_per_request": round(generated / requests, 2),
    }


def decode_batches(bundle, ids: list[list[int]], batch: int, requests: int, max_tokens: int, tag: str) -> dict:
    """Greedy ``generate`` over ``requests`` prompts (cycling ``ids``) in batches of ``batch``; wall time and tokens."""
    import torch

    model, tokenizer = bundle.model, bundle.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [ids[k % len(ids)] for k in range(requests)]
    generated = 0
    started = time.perf_counter()
    for start in range(0, requests, batch):
        group = rows[start : start + batch]
        width = max(len(r) for r in group)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in group])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in group])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                stop_strings=[tag],
                tokenizer=tokenizer,
                pad_token_id=pad,
            )
        new = out[:, width:]
        generated += int((new != pad).sum())
    return figures("static", batch, requests, time.perf_counter() - started, generated)


def decode_continuous(bundle, ids: list[list[int]], batch: int, requests: int, max_tokens: int) -> dict:
    """transformers' continuous batching over the same prompts, at most ``batch`` requests per step."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    model, tokenizer = bundle.model, bundle.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [ids[k % len(ids)] for k in range(requests)]
    generation = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate_batch(
            inputs=rows,
            generation_config=generation,
            continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch),
            progress_bar=False,
            warmup=False,
        )
    wall = time.perf_counter() - started
    if len(out) != requests or any(o.error for o in out.values()):
        raise RuntimeError(f"continuous batching answered {len(out)} of {requests} requests")
    generated = sum(len(o.generated_tokens) for o in out.values())
    return figures("continuous", batch, requests, wall, generated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--batch-sizes", type=parse_levels, default=[1, 8, 16])
    parser.add_argument("--requests", type=int, default=64, help="prompts decoded per batch size")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", default=None, help="JSONL with a 'prompt' field (default: a word-ordering split)")
    parser.add_argument("--continuous", action="store_true", help="also measure transformers' continuous batching")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")

    from sdm_core.lm.bundle import load_bundle

    bundle_path = Path(args.bundle)
    with tempfile.TemporaryDirectory(prefix="sdm-ceiling-") as tmp:
        _, prompts = choose_prompts(
            argparse.Namespace(prompts=args.prompts, bundle=str(bundle_path), requests_per_level=args.requests),
            Path(tmp),
        )
    ids = rendered_ids(bundle_path, prompts)
    bundle = load_bundle(bundle_path)
    tag = bundle.info.tags.open
    decode_batches(bundle, ids, 1, 1, 4, tag)  # warm-up
    levels = []
    for batch in args.batch_sizes:
        level = decode_batches(bundle, ids, batch, args.requests, args.max_tokens, tag)
        log(f"batch {batch}: {level['requests_per_s']} requests/s")
        levels.append(level)
    if args.continuous:
        decode_continuous(bundle, ids, 1, 1, 4)  # warm-up
        for batch in args.batch_sizes:
            level = decode_continuous(bundle, ids, batch, args.requests, args.max_tokens)
            log(f"continuous, at most {batch} a step: {level['requests_per_s']} requests/s")
            levels.append(level)
    print(
        json.dumps(
            {
                "benchmark": "generate_ceiling",
                "bundle": str(bundle_path),
                "max_tokens": args.max_tokens,
                "levels": levels,
                "device_info": device_info("cpu"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
