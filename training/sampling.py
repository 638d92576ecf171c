"""Which instance each document contributes to a training step or an evaluation (SDM_SPEC §3.3).

A document's draw is the positive with probability gamma_positive; else, where generation is allowed and with
probability gamma_generate, a greedy generation of the current model that the verbatim rule rejects joins its
negatives; then a negative is taken uniformly from its static negative and its stored hard negatives. The SDM
layers' draws (:func:`training.verification_layer.draw_layer_instances`) pick among the same candidates
(:func:`training.verification_layer.negative_candidates`) with one RNG over all documents; a step's draw shuffles
the candidates with the document's own RNG. Both orders are part of what a seed reproduces, so each stays as it is.

Each document's draw has its own ``random.Random`` seeded by (seed, purpose, epoch, step, document), so the draws
do not depend on which rank holds the document or on a resume in between.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from training.config import FinetuneConfig
from training.correctness import is_verbatim, normalize_hard_negative
from training.records import Record
from training.verification_layer import Instance, negative_candidates, prompt_of

__all__ = ["InstanceSampler", "POSITIVE", "NEGATIVE", "GENERATE"]

POSITIVE, NEGATIVE, GENERATE = "positive", "negative", "generate"

Generate = Callable[..., list[str]]  # (prompts, progress=False, desc=...) -> one completion per prompt


class InstanceSampler:
    """Draws the instances of a step (``draw``), and knows ahead of time which documents of an epoch will need a
    generation (``pregenerate``). ``generate`` decodes prompts with the current model."""

    def __init__(
        self, config: FinetuneConfig, generate: Generate, docs_per_step: int, rank: int = 0, world: int = 1
    ) -> None:
        self.config = config
        self.generate = generate
        self.docs_per_step = docs_per_step
        self.rank = rank
        self.world = world

    def plan(self, record: Record, tag: str, generate_ok: bool) -> tuple[random.Random, str]:
        """The document's draw for ``tag``: its RNG (also used to pick among negatives) and the instance kind."""
        rng = random.Random(f"{self.config.seed}:{tag}:{record.id}")
        if rng.random() < self.config.gamma_positive:
            return rng, POSITIVE
        if generate_ok and rng.random() < self.config.gamma_generate:
            return rng, GENERATE
        return rng, NEGATIVE

    def step_documents(self, order: Sequence[Record], local: int) -> Sequence[Record]:
        """This rank's documents of the epoch's ``local``-th step."""
        docs = order[local * self.docs_per_step : (local + 1) * self.docs_per_step]
        return docs[self.rank :: self.world]

    def pregenerate(self, epoch: int, order: Sequence[Record], steps_per_epoch: int) -> dict[str, str]:
        """generation_timing "epoch": decode, in batches and with the epoch-start weights, every prompt this rank's
        draws of the epoch will generate for."""
        cfg = self.config
        if cfg.generation_timing != "epoch" or epoch < cfg.generate_from_epoch:
            return {}
        wanted = []
        for local in range(steps_per_epoch):
            step = epoch * steps_per_epoch + local
            wanted.extend(
                r
                for r in self.step_documents(order, local)
                if self.plan(r, f"train:{epoch}:{step}", True)[1] == GENERATE
            )
        texts = self.generate([prompt_of(r) for r in wanted], cfg.progress, f"epoch {epoch + 1} hard negatives")
        return dict(zip([r.id for r in wanted], texts))

    def draw(
        self,
        records: Sequence[Record],
        tag: str,
        generate_ok: bool,
        store: dict[str, list[str]],
        pregenerated: dict[str, str] | None = None,
    ) -> list[Instance]:
        """Each document's instance; generated hard negatives (checked by the verbatim rule) go into ``store``.
        Texts already decoded for a document (``pregenerated``, consumed here) stand in for its generation."""
        plans = [(record, *self.plan(record, tag, generate_ok)) for record in records]
        generations = self._generations(plans, {} if pregenerated is None else pregenerated)
        instances = []
        for record, rng, kind in plans:
            if kind == POSITIVE:
                instances.append(Instance(record.id, prompt_of(record), record.positive, 1))
                continue
            candidates = negative_candidates(record, store.get(record.id, ()))
            if kind == GENERATE:
                _add_hard_negative(record, generations[record.id], candidates, store)
            rng.shuffle(candidates)
            instances.append(Instance(record.id, prompt_of(record), candidates[0], 0))
        return instances

    def _generations(
        self, plans: Sequence[tuple[Record, random.Random, str]], pregenerated: dict[str, str]
    ) -> dict[str, str]:
        """The generation of every document planned to generate: pre-generated ones are consumed, the rest decoded
        now in one call."""
        generations = {
            r.id: pregenerated.pop(r.id) for r, _, kind in plans if kind == GENERATE and r.id in pregenerated
        }
        to_generate = [record for record, _, kind in plans if kind == GENERATE and record.id not in generations]
        generations.update(zip([r.id for r in to_generate], self.generate([prompt_of(r) for r in to_generate])))
        return generations


def _add_hard_negative(record: Record, generation: str, candidates: list[str], store: dict[str, list[str]]) -> None:
    """A generation that is not verbatim the positive becomes a candidate and a stored hard negative (once)."""
    generated = generation.strip()
    if is_verbatim(generated, record.positive):
        return
    negative = normalize_hard_negative(generated)
    if negative not in candidates:
        candidates.append(negative)
        store.setdefault(record.id, []).append(negative)
