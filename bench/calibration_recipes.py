"""Which head recipe lets a bundle admit more on held-out generations while its regions stay valid.

Takes one bundle's model, a pool of documents it never trained on (split into the head's support, calibration
and a certification split) and held-out record files, greedy-decodes every prompt once (or reads the decodings
from ``--generations``, JSONL lines ``{"id", "generation"}``), labels each generation with the correctness
function, and runs the model once over every verification text to read several representations at once:

    layer L in --layers (index into hidden_states; -1 is the final layer after the final norm)
    x pooling: mean_last ([mean over the whole sequence; last], the recipe) or answer_last ([mean over the
      assistant's tokens; last])

plus the LM's own probability of its Yes tag token at ``<verified>``. For every representation it reports a
cross-validation-free linear probe AUROC (logistic regression fitted on the calibration half, scored on each
held-out set), and for the best ones (``--sdm-top``) it fits the SDM head with each support choice (``mixture``:
the paper's drawn reference/hard-negative instances; ``generations``: the documents' own generations labelled by
r; ``both``), calibrates it on the calibration half's own generations, certifies it on the certification split,
and reports per held-out set the AUROC of SDM(z')_Yes and, at every alpha of the certified ladder, the admitted
count and how many of those are correct. Prints one JSON line (and progress on stderr).

    python bench/calibration_recipes.py --bundle deploy/bundles/smollm2-word-order \\
        --pool data/wo/calibration.jsonl,data/wo/holdout.jsonl \\
        --heldout wiki=data/wo/test.jsonl,harvard=data/wo/harvard.jsonl --generations gens.jsonl
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
from sdm_core.certification import certify_ladder  # noqa: E402
from sdm_core.lm.bundle import load_bundle  # noqa: E402
from sdm_core.lm.embedding import HiddenStateRecipe, chat_messages, embed_texts, verification_text  # noqa: E402
from sdm_core.report import auroc  # noqa: E402
from training.correctness import get_correctness, is_verbatim, normalize_hard_negative  # noqa: E402
from training.generation import greedy_generate  # noqa: E402
from training.records import load_records  # noqa: E402
from training.splits import split_documents  # noqa: E402
from training.verification_layer import (  # noqa: E402
    PAPER_INSTANCE_SEED,
    PAPER_SPLIT_SEED,
    Instance,
    draw_layer_instances,
    fit_verification_layer,
    prompt_of,
)


def read_records(spec: str, limit: int):
    path, _, rng = spec.partition(":")
    records = load_records(path)
    if rng:
        start, _, stop = rng.partition("-")
        records = records[int(start) : int(stop)]
    return records[:limit] if limit else records


@torch.no_grad()
def views_of(model, tokenizer, instances, chat, recipe: HiddenStateRecipe, layers, yes_id: int, batch_size: int):
    """Per instance and layer: mean_last and answer_last, and P(Yes) at the last position (the recipe must end at
    <verified> for that to be the tag token's probability)."""
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
    out = {(layer, pool): [None] * len(rows) for layer in layers for pool in ("mean_last", "answer_last")}
    p_yes = torch.zeros(len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for b in range(0, len(order), batch_size):
        index = order[b : b + batch_size]
        width = max(len(rows[i][0]) for i in index)
        ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for r, i in enumerate(index):
            ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[r, : len(rows[i][0])] = 1
        result = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for r, i in enumerate(index):
            n, start = len(rows[i][0]), rows[i][1]
            p_yes[i] = torch.softmax(result.logits[r, n - 1].float(), dim=-1)[yes_id]
            for layer in layers:
                s = result.hidden_states[layer][r, :n].float()
                out[(layer, "mean_last")][i] = torch.cat([s.mean(dim=0), s[-1]])
                out[(layer, "answer_last")][i] = torch.cat([s[start:].mean(dim=0), s[-1]])
        if b % (batch_size * 20) == 0:
            print(f"  features {b + len(index)}/{len(rows)}", file=sys.stderr, flush=True)
    return {k: torch.stack(v) for k, v in out.items()}, p_yes


def probe_auroc(x_train, y_train, tests: dict, steps: int = 300) -> dict:
    """A standardised logistic-regression probe (L2, LBFGS) fitted on one split, AUROC on each test split."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = (x_train - mean) / std
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    y = y_train.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, y) + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {name: auroc(((x - mean) / std) @ w + b, labels) for name, (x, labels) in tests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument(
        "--pool", required=True, help="comma-separated record files (PATH or PATH:START-END) the model never trained on"
    )
    parser.add_argument("--heldout", required=True, help="comma-separated NAME=PATH[:START-END] held-out record files")
    parser.add_argument(
        "--generations", default="", help="JSONL {id, generation} decodings to reuse (others are decoded)"
    )
    parser.add_argument("--certification-docs", type=int, default=256)
    parser.add_argument("--split-seed", type=int, default=PAPER_SPLIT_SEED)
    parser.add_argument("--instance-seed", type=int, default=PAPER_INSTANCE_SEED)
    parser.add_argument("--layers", default="-1,9,12,15,18,21,24,27")
    parser.add_argument(
        "--sdm-top", type=int, default=3, help="fit SDM heads for the N best probe representations (and the recipe)"
    )
    parser.add_argument("--supports", default="mixture,generations,both")
    parser.add_argument("--sdm-epochs", type=int, default=300)
    parser.add_argument("--sdm-learning-rate", type=float, default=3e-4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--correctness", default="word_order")
    parser.add_argument(
        "--save-features", default="", help="write the extracted features to this .pt-free folder (safetensors)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    model, tokenizer, info = bundle.model, bundle.tokenizer, bundle.info
    recipe = HiddenStateRecipe(**{**info.recipe.to_dict(), "layer": -1})
    correct = get_correctness(args.correctness)
    pool = [r for spec in args.pool.split(",") for r in read_records(spec, 0)]
    heldout = {}
    for spec in args.heldout.split(","):
        name, _, path = spec.partition("=")
        heldout[name] = read_records(path, 0)
    cached = {}
    if args.generations:
        for line in Path(args.generations).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cached[row["id"]] = row["generation"]
    everything = pool + [r for rs in heldout.values() for r in rs]
    missing = [r for r in everything if r.id not in cached]
    if missing:
        print(f"decoding {len(missing)} prompts", file=sys.stderr, flush=True)
        texts = greedy_generate(
            model, tokenizer, [prompt_of(r) for r in missing], info.chat, args.max_new_tokens, args.batch_size
        )
        cached.update({r.id: t for r, t in zip(missing, texts)})

    splits = split_documents([r.id for r in pool], args.certification_docs, args.split_seed)
    support_docs = [r for r in pool if splits[r.id] == "support"]
    label = {r.id: int(bool(correct(cached[r.id], r.reference or r.positive))) for r in everything}
    own = [Instance(r.id, prompt_of(r), cached[r.id], label[r.id]) for r in everything]
    hard = {
        r.id: [normalize_hard_negative(cached[r.id])]
        for r in support_docs
        if not label[r.id] and not is_verbatim(cached[r.id], r.positive)
    }
    mixture = draw_layer_instances(
        support_docs, hard, random.Random(args.instance_seed), 0.5, prefer_hard_negatives=True
    )
    layers = [int(x) for x in args.layers.split(",")]
    yes_ids = tokenizer(info.tags.yes, add_special_tokens=False)["input_ids"]
    if len(yes_ids) != 1:
        raise SystemExit(f"error: the Yes tag is not one token ({yes_ids})")
    t = time.perf_counter()
    feats, p_yes = views_of(model, tokenizer, own + mixture, info.chat, recipe, layers, yes_ids[0], args.batch_size)
    feature_seconds = time.perf_counter() - t
    check = embed_texts(
        model,
        tokenizer,
        [verification_text(tokenizer, i.prompt, i.response, info.chat, recipe) for i in own[:4]],
        recipe,
        4,
    )
    if not torch.allclose(check, feats[(-1, "mean_last")][:4], rtol=1e-4, atol=1e-4):
        raise SystemExit(
            "error: the layer -1 mean_last view differs from embed_texts; the bench would not measure the recipe"
        )
    n_own = len(own)
    index = {r.id: k for k, r in enumerate(everything)}
    pool_rows = {
        s: [index[r.id] for r in pool if splits[r.id] == s] for s in ("support", "calibration", "certification")
    }
    held_rows = {name: [index[r.id] for r in rs] for name, rs in heldout.items()}
    y_all = torch.tensor([label[r.id] for r in everything])
    result = {
        "bundle": args.bundle,
        "pool": len(pool),
        "split_sizes": {s: len(v) for s, v in pool_rows.items()},
        "accuracy": {
            "pool": float(y_all[[index[r.id] for r in pool]].float().mean()),
            **{n: float(y_all[v].float().mean()) for n, v in held_rows.items()},
        },
        "feature_seconds": round(feature_seconds, 1),
        "lm_p_yes_auroc": {
            n: auroc(p_yes[v], y_all[v]) for n, v in {**held_rows, "certification": pool_rows["certification"]}.items()
        },
        "probe_auroc": {},
        "sdm": {},
    }
    # Probe: fitted on the calibration half's generations.
    fit_rows = pool_rows["calibration"]
    tests = {n: v for n, v in {**held_rows, "certification": pool_rows["certification"]}.items()}
    for key, x in feats.items():
        aucs = probe_auroc(x[fit_rows], y_all[fit_rows], {n: (x[v], y_all[v]) for n, v in tests.items()})
        result["probe_auroc"][f"{key[0]}/{key[1]}"] = {n: round(a, 4) for n, a in aucs.items()}
        print(f"probe {key}: {aucs}", file=sys.stderr, flush=True)
    ranked = sorted(feats, key=lambda k: -sum(result["probe_auroc"][f"{k[0]}/{k[1]}"][n] for n in held_rows))
    chosen = [(-1, "mean_last")] + [k for k in ranked if k != (-1, "mean_last")][: args.sdm_top]
    for key in chosen:
        x = feats[key]
        for support in args.supports.split(","):
            if support == "mixture":
                sup = [(n_own + k, inst) for k, inst in enumerate(mixture)]
            elif support == "generations":
                sup = [(k, own[k]) for k in pool_rows["support"]]
            else:
                sup = [(n_own + k, inst) for k, inst in enumerate(mixture)] + [
                    (k, Instance(own[k].doc_id + "#gen", own[k].prompt, own[k].response, own[k].label))
                    for k in pool_rows["support"]
                ]
            cal = [(k, own[k]) for k in pool_rows["calibration"]]
            rows = [r for r, _ in sup] + [r for r, _ in cal]
            instances = [i for _, i in sup] + [i for _, i in cal]
            flags = {i.doc_id: True for _, i in sup} | {i.doc_id: False for _, i in cal}
            sdm = SDMConfig(
                exemplar_dim=1000,
                epochs=args.sdm_epochs,
                learning_rate=args.sdm_learning_rate,
                progress=False,
                class_names=("No", "Yes"),
                alpha=0.95,
            )
            t = time.perf_counter()
            head = fit_verification_layer(x[rows], instances, flags, sdm)
            fit_seconds = time.perf_counter() - t
            cert_rows = pool_rows["certification"]
            s = head.predict_scores(x[cert_rows])
            certification, ladder = certify_ladder(
                head.ladder, s.probabilities, s.predictions, s.q_prime, y_all[cert_rows].bool()
            )
            head.ladder = ladder
            entry = {
                "fit_seconds": round(fit_seconds, 1),
                "calibration_regions": {
                    f"{a:g}": r.calibration_admitted for a, r in head.ladder.regions.items() if r.exists
                },
                "certification": {
                    f"{r.alpha:g}": [r.admitted, r.correct, round(r.p_value, 4), r.status]
                    for r in certification.rows
                    if r.admitted
                },
                "withdrawn": list(certification.withdrawn),
                "heldout": {},
            }
            for name, v in {**held_rows, "certification": cert_rows}.items():
                sc = head.predict_scores(x[v])
                yes_prob = sc.probabilities[:, 1]
                own_matrix = head.ladder.admissions(sc.probabilities, sc.predictions, sc.q_prime)
                per_alpha = {}
                for a in head.ladder.alphas:
                    adm = head.ladder.admitted_at(own_matrix, a) & (sc.predictions == 1)
                    if int(adm.sum()):
                        per_alpha[f"{a:g}"] = [int(adm.sum()), int((adm & y_all[v].bool()).sum())]
                entry["heldout"][name] = {"auroc_sdm_yes": round(auroc(yes_prob, y_all[v]), 4), "admitted": per_alpha}
            result["sdm"][f"{key[0]}/{key[1]}/{support}"] = entry
            print(f"sdm {key} {support}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
