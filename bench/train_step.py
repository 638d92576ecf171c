"""Training-step cost of the SDM loss against cross-entropy on the same batch (no generation), and hidden-state
extraction throughput batched against one document at a time. Prints one JSON line.

The SDM step includes everything the SDM loss adds, as the trainer does it: with the reference's sequence end
(`template`) a no-grad embedding pass over the instances' verification texts; with the paper's (`verified`) h from
the training forward's own hidden states; then the SDM layer's scoring for b and the change-of-base loss. The CE
step is the same update with CE.

The forward asks for the logits that the loss reads only (``logits_to_keep``), as the trainer does;
``--mixed-precision bf16`` runs both steps' LM passes under bfloat16 autocast, as ``--mixed-precision bf16`` of
``training.finetune`` does, and ``--lora R`` trains LoRA adapters of rank R on every block (the smollm2-cpu preset).

    python bench/train_step.py --model smollm2 [--batch 8] [--repeats 3] [--trainable-last-layers 4]
        [--recipe-sequence-end verified] [--lora 8] [--mixed-precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core import SDMConfig, SDMEstimator  # noqa: E402
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, embed_texts, verification_text  # noqa: E402
from sdm_core.lm.models import load_model, load_tokenizer  # noqa: E402
from training.config import FinetuneConfig  # noqa: E402
from training.data import WordOrderConfig, build_word_order  # noqa: E402
from training.encoding import collate, encode_instance  # noqa: E402
from training.loss import ce_token_loss, logits_to_keep, sdm_token_loss  # noqa: E402
from training.records import load_records  # noqa: E402
from training.verification_layer import Instance, prefix_embeddings, shared_prefix_lengths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainable-last-layers", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--embed-docs", type=int, default=32)
    parser.add_argument("--data", default="runs/bench-data")
    parser.add_argument("--recipe-sequence-end", default="template", choices=("template", "verified"))
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on every block (0: no LoRA)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    args = parser.parse_args()
    source = {"kind": args.model} if args.model in ("smollm2", "tiny") else {"kind": "hf", "path": args.model}
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    if args.trainable_last_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for block in model.get_decoder().layers[-args.trainable_last_layers :]:
            for p in block.parameters():
                p.requires_grad_(True)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = list(FinetuneConfig().lora_targets)
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules=targets))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.mixed_precision == "bf16" else nullcontext()

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        build_word_order(data, WordOrderConfig(train=200, calibration=200, test=200, quiet=True))
    records = load_records(data / "train.jsonl")
    chat, recipe = ChatFormat(), HiddenStateRecipe(sequence_end=args.recipe_sequence_end)
    batch = records[: args.batch]
    instances = [(r.prompt, r.positive if i % 2 == 0 else r.negative, 1 - i % 2) for i, r in enumerate(batch)]
    texts = [verification_text(tokenizer, p, s, chat, recipe) for p, s, _ in instances]

    # An SDM layer over embeddings of other documents, as the trainer has at each step.
    layer_docs = records[args.batch : args.batch + 64]
    layer_texts = [
        verification_text(tokenizer, r.prompt, r.positive if i % 2 else r.negative, chat, recipe)
        for i, r in enumerate(layer_docs)
    ]
    h = embed_texts(model, tokenizer, layer_texts, recipe, batch_size=16)
    y = torch.tensor([i % 2 for i in range(len(layer_docs))])
    layer = SDMEstimator(SDMConfig(epochs=5, progress=False)).fit(h[::2], y[::2], h[1::2], y[1::2], num_classes=2)

    encoded = [encode_instance(tokenizer, p, s, label, chat) for p, s, label in instances]
    ids, mask, labels = collate(encoded, tokenizer.pad_token_id)
    keep = logits_to_keep(labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    prefixes = shared_prefix_lengths(
        tokenizer,
        [Instance(str(i), p, s, label) for i, (p, s, label) in enumerate(instances)],
        [e.input_ids for e in encoded],
        chat,
        recipe,
    )
    y_batch = torch.tensor([label for *_, label in instances])

    def step(kind: str) -> float:
        started = time.perf_counter()
        if kind == "sdm" and prefixes is None:
            with autocast():
                hb = embed_texts(model, tokenizer, texts, recipe, batch_size=args.batch)
            base = 2.0 + layer.predict_scores(hb).probabilities.gather(1, y_batch.unsqueeze(1)).squeeze(1)
        model.train()
        if kind == "sdm" and prefixes is not None:
            with autocast():
                out = model(
                    input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True, logits_to_keep=keep
                )
            hb = prefix_embeddings(out.hidden_states[-1], prefixes, recipe)
            base = 2.0 + layer.predict_scores(hb).probabilities.gather(1, y_batch.unsqueeze(1)).squeeze(1)
            logits = out.logits
        else:
            with autocast():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        loss_sum, n = sdm_token_loss(logits, labels, base) if kind == "sdm" else ce_token_loss(logits, labels)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step("ce")  # warm-up (the first step allocates optimiser state)
    step("sdm")
    ce, sdm = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        ce.append(step("ce"))
        sdm.append(step("sdm"))

    docs = [verification_text(tokenizer, r.prompt, r.positive, chat, recipe) for r in records[: args.embed_docs]]
    embed_texts(model, tokenizer, docs[:2], recipe)
    t = time.perf_counter()
    embed_texts(model, tokenizer, docs, recipe, batch_size=16)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for d in docs:
        embed_texts(model, tokenizer, [d], recipe, batch_size=1)
    single = time.perf_counter() - t
    print(
        json.dumps(
            {
                "model": args.model,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "mean_tokens": round(float(mask.sum(1).float().mean()), 1),
                "trainable_last_layers": args.trainable_last_layers,
                "recipe_sequence_end": args.recipe_sequence_end,
                "lora": args.lora,
                "mixed_precision": args.mixed_precision,
                "b_from_training_forward": prefixes is not None,
                "ce_step_s": round(statistics.median(ce), 3),
                "sdm_step_s": round(statistics.median(sdm), 3),
                "sdm_over_ce": round(statistics.median(sdm) / statistics.median(ce), 3),
                "embed_docs": len(docs),
                "embed_batched_docs_per_s": round(len(docs) / batched, 2),
                "embed_single_docs_per_s": round(len(docs) / single, 2),
                "embed_batched_speedup": round(single / batched, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
