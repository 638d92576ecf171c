"""What limits the final test-time head of a fine-tuning run: its input representation or its training.

Rebuilds the exact instances that ``training.calibrate`` drew for a run (same seeds, the generations it wrote
beside the bundle), runs the fine-tuned LM once over their verification texts, and refits the head over several
representations and head-training settings. Prints one JSON line: for every variant, the head's accuracy on its
calibration half by instance kind (reference, hard negative, static negative), and the admitted share of that
half at every alpha of the ladder (null where Algorithm 1 finds no region). It also reports how often the LM's
own next token after ``<verified>`` (Yes vs No) is right, the verdict a linear head can read off the last state.

    python bench/head_probe.py --run runs/x/run --generations runs/x/bundle.calibration_generations.jsonl

Representations (all from the recipe's final layer after the final norm, the sequence ending at <verified>):
``mean_last`` (the recipe), ``answer_last`` (mean over the assistant's tokens only, then last), ``last`` alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core import SDMConfig  # noqa: E402
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, chat_messages, verification_text  # noqa: E402
from training.calibrate import _load, _resolve  # noqa: E402
from training.calibrate_config import CalibrateConfig  # noqa: E402
from training.correctness import normalize_hard_negative  # noqa: E402
from training.records import load_records  # noqa: E402
from training.verification_layer import draw_layer_instances, embed_instances, fit_verification_layer  # noqa: E402


@torch.no_grad()
def hidden_views(model, tokenizer, instances, chat: ChatFormat, recipe: HiddenStateRecipe, batch_size: int) -> dict:
    """Per instance: the three representations and the LM's logit(Yes) - logit(No) at the last position."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    if len(yes) != 1 or len(no) != 1:
        raise SystemExit(f"error: Yes/No are not single tokens for this tokenizer ({yes}, {no})")
    rows = []
    for inst in instances:
        text = verification_text(tokenizer, inst.prompt, inst.response, chat, recipe)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-recipe.max_length :]
        prompt_text = tokenizer.apply_chat_template(
            chat_messages(inst.prompt, chat), tokenize=False, add_generation_prompt=True
        )
        start = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        rows.append((ids, min(start, len(ids) - 1)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    views = {name: [None] * len(rows) for name in ("mean_last", "answer_last", "last")}
    verdict = [0.0] * len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    for b in range(0, len(order), batch_size):
        index = order[b : b + batch_size]
        width = max(len(rows[i][0]) for i in index)
        ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for r, i in enumerate(index):
            ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[r, : len(rows[i][0])] = 1
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        states = out.hidden_states[-1].float()
        for r, i in enumerate(index):
            n, start = len(rows[i][0]), rows[i][1]
            s = states[r, :n]
            last = s[-1]
            views["mean_last"][i] = torch.cat([s.mean(dim=0), last])
            views["answer_last"][i] = torch.cat([s[start:].mean(dim=0), last])
            views["last"][i] = last
            logits = out.logits[r, n - 1].float()
            verdict[i] = float(logits[yes[0]] - logits[no[0]])
    return {k: torch.stack(v) for k, v in views.items()}, torch.tensor(verdict)


def kinds_of(instances, hard_negatives) -> list[str]:
    out = []
    for inst in instances:
        if inst.label == 1:
            out.append("reference")
        elif inst.response in hard_negatives.get(inst.doc_id, ()):
            out.append("hard_negative")
        else:
            out.append("static_negative")
    return out


def summarise(head, instances, flags, kinds) -> dict:
    """Accuracy by instance kind on the head's calibration half, and the admitted share at every ladder alpha."""
    cal = [k for k, inst in enumerate(instances) if not flags[inst.doc_id]]
    labels = torch.tensor([instances[k].label for k in cal])
    predictions = head.calibration.predictions  # the calibration split in its given order
    accuracy: dict[str, float] = {}
    for kind in ("reference", "hard_negative", "static_negative"):
        rows = [j for j, k in enumerate(cal) if kinds[k] == kind]
        if rows:
            accuracy[kind] = round(float((predictions[rows] == labels[rows]).float().mean()), 3)
    regions = {
        str(a): (round(r.calibration_admitted / max(r.calibration_size, 1), 4) if r.exists else None)
        for a, r in sorted(head.ladder.regions.items(), reverse=True)
    }
    return {"accuracy": accuracy, "regions": regions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training.finetune output folder")
    parser.add_argument("--generations", required=True, help="the .calibration_generations.jsonl that calibrate wrote")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--heads", default="300:3e-4,1000:3e-4,1000:1e-3", help="comma-separated EPOCHS:LR head settings"
    )
    args = parser.parse_args()
    config = CalibrateConfig(run=args.run, checkpoint=args.checkpoint, out="unused")
    source, cal_path, training = _resolve(config)
    generations = {
        json.loads(line)["id"]: json.loads(line)
        for line in Path(args.generations).read_text().splitlines()
        if line.strip()
    }
    records = [r for r in load_records(cal_path) if r.id in generations]
    hard_negatives = {
        r.id: [normalize_hard_negative(generations[r.id]["generation"])]
        for r in records
        if generations[r.id]["hard_negative"]
    }
    split_rng = random.Random(config.split_seed)
    flags = {r.id: split_rng.random() < 0.5 for r in records}
    instances = draw_layer_instances(
        records, hard_negatives, random.Random(config.instance_seed), 0.5, prefer_hard_negatives=True
    )
    kinds = kinds_of(instances, hard_negatives)
    chat = ChatFormat(system_prompt=training.get("system_prompt", config.system_prompt))
    recipe = HiddenStateRecipe(
        sequence_end=training.get("recipe_sequence_end", config.recipe_sequence_end),
        max_length=int(training.get("max_length", 2048)),
    )
    model, tokenizer = _load(source)
    started = time.perf_counter()
    views, verdict = hidden_views(model, tokenizer, instances, chat, recipe, args.batch_size)
    embed_seconds = time.perf_counter() - started
    # The recipe's view must be what calibrate embedded (the same texts through embed_texts).
    check = embed_instances(model, tokenizer, instances[:4], chat, recipe, 4)
    if not torch.allclose(check, views["mean_last"][:4], rtol=1e-4, atol=1e-4):
        raise SystemExit(
            "error: the probe's [mean; last] differs from embed_texts; the probe would not measure the recipe"
        )
    labels = torch.tensor([i.label for i in instances])
    lm = {}
    for kind in ("reference", "hard_negative", "static_negative"):
        rows = [k for k, x in enumerate(kinds) if x == kind]
        if rows:
            lm[kind] = round(float(((verdict[rows] > 0).long() == labels[rows]).float().mean()), 3)
    result = {
        "instances": len(instances),
        "kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "embed_seconds": round(embed_seconds, 1),
        "lm_verdict_accuracy": lm,
        "variants": {},
    }
    for name, h in views.items():
        for setting in args.heads.split(","):
            epochs, lr = setting.split(":")
            sdm = SDMConfig(
                exemplar_dim=1000,
                epochs=int(epochs),
                learning_rate=float(lr),
                progress=False,
                class_names=("No", "Yes"),
            )
            t = time.perf_counter()
            head = fit_verification_layer(h, instances, flags, sdm)
            summary = summarise(head, instances, flags, kinds)
            summary["fit_seconds"] = round(time.perf_counter() - t, 1)
            result["variants"][f"{name}/{epochs}:{lr}"] = summary
            print(json.dumps({f"{name}/{epochs}:{lr}": summary}), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
