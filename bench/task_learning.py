"""How fast a fine-tuning configuration learns the word-ordering task: N cross-entropy steps on the
CONTRASTIVE-MASKING encoding (positives with probability gamma_positive, else the static negative), then greedy
accuracy (the task's r) on test prompts. Prints one JSON line. Used to choose what the `smollm2-cpu` preset trains
(which blocks, LoRA or full weights, learning rate) before paying for a whole preset run.

    python bench/task_learning.py --trainable lora-all --lora-r 8 --learning-rate 1e-3 [--steps 45]
    python bench/task_learning.py --trainable lora-last --last-layers 8 --learning-rate 5e-4
    python bench/task_learning.py --trainable full --learning-rate 1e-4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core.lm.embedding import ChatFormat  # noqa: E402
from sdm_core.settings import build  # noqa: E402
from training.config import FinetuneConfig  # noqa: E402
from training.correctness import word_order  # noqa: E402
from training.data import WordOrderConfig, build_word_order  # noqa: E402
from training.encoding import collate, encode_instance  # noqa: E402
from training.finetune import prepare_model  # noqa: E402
from training.generation import greedy_generate  # noqa: E402
from training.loss import ce_token_loss  # noqa: E402
from training.records import load_records  # noqa: E402

TRAINABLE = {
    "full": dict(lora=False, trainable_last_layers=0),
    "last": dict(lora=False),  # full weights of the last N blocks
    "lora-all": dict(lora=True, trainable_last_layers=0),
    "lora-last": dict(lora=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face folder")
    parser.add_argument("--trainable", default="lora-all", choices=sorted(TRAINABLE))
    parser.add_argument("--last-layers", type=int, default=8, help="N for --trainable last / lora-last")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--gamma-positive", type=float, default=0.5)
    parser.add_argument("--train-docs", type=int, default=360)
    parser.add_argument("--test-docs", type=int, default=48)
    parser.add_argument("--max-words", type=int, default=14)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        default=None,
        help="a word-order data folder (train.jsonl, test.jsonl), e.g. a preset run's "
        "run/data; default: build one (--train-docs, --test-docs, --max-words) in a temporary folder",
    )
    args = parser.parse_args()

    model_source = {"kind": args.model} if args.model in ("smollm2", "tiny") else {"kind": "hf", "path": args.model}
    settings = dict(TRAINABLE[args.trainable])
    settings.setdefault("trainable_last_layers", args.last_layers)
    config = build(
        FinetuneConfig,
        {"model": model_source, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r, "max_length": 256, **settings},
    )
    torch.manual_seed(args.seed)
    model, tokenizer = prepare_model(config)
    chat = ChatFormat(system_prompt=config.system_prompt)
    if args.data:
        train = load_records(Path(args.data) / "train.jsonl")[: args.train_docs]
        test = load_records(Path(args.data) / "test.jsonl")[: args.test_docs]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_word_order(
                tmp,
                WordOrderConfig(
                    seed=args.seed,
                    train=args.train_docs,
                    calibration=16,
                    test=args.test_docs,
                    max_words=args.max_words,
                    quiet=True,
                ),
            )
            train = load_records(Path(tmp) / "train.jsonl")
            test = load_records(Path(tmp) / "test.jsonl")[: args.test_docs]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)) * max(0.0, 1 - s / args.steps)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(args.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = [train[order[(step * args.batch + j) % len(order)]] for j in range(args.batch)]
        encoded = [
            encode_instance(tokenizer, r.prompt, r.positive, 1, chat, config.max_length)
            if rng.random() < args.gamma_positive
            else encode_instance(tokenizer, r.prompt, r.negative, 0, chat, config.max_length)
            for r in batch
        ]
        ids, mask, labels = collate(encoded, pad)
        loss_sum, tokens = ce_token_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss = loss_sum / max(tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - started
    model.eval()
    started = time.perf_counter()
    generations = greedy_generate(model, tokenizer, [r.prompt for r in test], chat, args.max_new_tokens, 16)
    generate_s = time.perf_counter() - started
    accuracy = sum(word_order(g, r.reference) for g, r in zip(generations, test)) / len(test)
    print(
        json.dumps(
            {
                "benchmark": "task_learning",
                "model": model_source,
                "trainable": args.trainable,
                "last_layers": args.last_layers if args.trainable in ("last", "lora-last") else None,
                "lora_r": args.lora_r if args.trainable.startswith("lora") else None,
                "trainable_parameters": sum(p.numel() for p in params),
                "learning_rate": args.learning_rate,
                "steps": args.steps,
                "batch": args.batch,
                "seconds_per_step": round(train_s / args.steps, 2),
                "final_loss_mean_last5": round(sum(losses[-5:]) / len(losses[-5:]), 4),
                "test_docs": len(test),
                "greedy_accuracy": round(accuracy, 4),
                "generate_seconds_per_prompt": round(generate_s / len(test), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
