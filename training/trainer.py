"""The SDM LM fine-tuning loop (SDM_SPEC §3.3–§3.6) and its cross-entropy baseline.

Per epoch: (SDM loss only) fit the training-set SDM layer on one instance per training document, embedded with
the frozen LM. Per optimiser step: draw each document's instance (positive with probability gamma_positive,
else a negative: the static one or, after the first epoch and with probability gamma_generate, a greedy
generation that the correctness check rejects), compute each instance's base b = 2 + SDM(z')_y with the
training layer (self-excluded for documents in its support), and take an AdamW step on Eq. 1 (or CE). Every
``eval_steps``: fit a validation SDM layer on the calibration documents and compute the evaluation loss; the
checkpoint with the lowest evaluation loss is kept.

Every random draw comes from a ``random.Random`` seeded by (seed, epoch, step, document), so a resumed run makes
exactly the draws an uninterrupted run makes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from sdm_core import SDMConfig, SDMEstimator
from sdm_core.folders import atomic_folder
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, is_sharded
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import FinetuneConfig
from training.correctness import is_verbatim, normalize_hard_negative
from training.encoding import EncodedInstance, collate, encode_instance
from training.generation import greedy_generate
from training.loss import ce_token_loss, logits_to_keep, sdm_token_loss
from training.records import Record
from training.verification_layer import (
    CLASS_NAMES,
    Instance,
    draw_layer_instances,
    embed_instances,
    fit_verification_layer,
    prefix_embeddings,
    prompt_of,
    shared_prefix_lengths,
    split_flags,
)

__all__ = ["SDMTrainer", "TrainResult", "git_revision"]

log = logging.getLogger("training")


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass
class TrainResult:
    output_dir: Path
    best_dir: Path
    best_eval_loss: float
    best_step: int
    steps: int
    history: list[dict] = field(default_factory=list)


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 products natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: unknown means no warning
        return True


def _retie(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict holds tied parameters (embeddings and LM head) as separate copies; pointing each alias
    at one tensor again lets ``save_pretrained`` drop the alias, as it does for an unsharded model."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        primary = first.setdefault(id(p), name)
        if primary != name and name in state_dict and primary in state_dict:
            state_dict[name] = state_dict[primary]
    return state_dict


class SDMTrainer:
    """Fine-tunes ``model`` on CONTRASTIVE-MASKING instances with the SDM next-token loss (or CE)."""

    def __init__(
        self,
        config: FinetuneConfig,
        model,
        tokenizer,
        train_records: Sequence[Record],
        calibration_records: Sequence[Record],
        accelerator=None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.config = config
        self.tokenizer = tokenizer
        self.train_records = list(train_records)
        self.calibration_records = list(calibration_records)
        if not self.train_records or not self.calibration_records:
            raise ValueError("fine-tuning needs non-empty train and calibration records")
        self.chat = ChatFormat(system_prompt=config.system_prompt)
        self.recipe = HiddenStateRecipe(sequence_end=config.recipe_sequence_end, max_length=config.max_length)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        if self.accelerator.distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2:
            # FSDP1 wraps the model so that its unwrapped module holds flattened shards: the no-grad passes and the
            # checkpoints here are written for FSDP2 (fully_shard), where the model stays the root module.
            raise ValueError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config (training/accelerate/fsdp.yaml)")
        if config.mixed_precision == "bf16" and self.accelerator.device.type == "cpu" and not _cpu_has_bf16():
            log.warning("mixed_precision bf16 on a CPU without native bfloat16 instructions (AVX512-BF16 or AMX): "
                        "the autocast products are emulated and likely slower than float32; use --mixed-precision no")
        self.out = Path(config.output_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sdm_config = SDMConfig(
            exemplar_dim=config.sdm_exemplar_dim,
            epochs=config.sdm_epochs,
            batch_size=config.sdm_batch_size,
            learning_rate=config.sdm_learning_rate,
            alpha=config.alpha,
            seed=config.seed,
            progress=False,
            class_names=CLASS_NAMES,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
        )
        total = self.total_steps
        warmup = min(config.warmup_steps, total)

        def schedule(step: int) -> float:  # linear warmup then linear decay to 0 (HF's default schedule)
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        # FSDP2: parameters are shards; forwards, generation and state gathering are collective over the ranks.
        self.sharded = is_sharded(self.model)
        if self.sharded:
            from torch.distributed.fsdp import register_fsdp_forward_method

            # peft's generate decodes with the inner model, past the root module's hooks; registered, it enters
            # through the root like a forward (nested root forwards are no-ops, so plain models are unaffected).
            register_fsdp_forward_method(self.model, "generate")
        eval_rng = random.Random(f"{config.seed}:eval-docs")
        eval_docs = list(self.calibration_records)
        eval_rng.shuffle(eval_docs)
        self.eval_records = eval_docs[: config.max_eval_docs] if config.max_eval_docs else eval_docs
        self.state = {
            "epoch": 0,
            "step": 0,
            "best_eval_loss": math.inf,
            "best_step": -1,
            "previous_hard_negatives": {},  # from the last completed epoch: feeds the next training layer
            "epoch_hard_negatives": {},  # generated in the current epoch
            "validation_hard_negatives": {},  # from the last evaluation: feeds the next validation layer
            "pregenerated": {},  # generation_timing "epoch": this epoch's decoded prompts not yet drawn, by document
            "history": [],
        }
        self.train_layer: SDMEstimator | None = None

    # -- bookkeeping ----------------------------------------------------------------------------------------
    @property
    def docs_per_step(self) -> int:
        return self.config.micro_batch_size * self.config.gradient_accumulation * self.accelerator.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_records) / self.docs_per_step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _sum_across_ranks(self, *values: float) -> list[float]:
        """Each value summed over ranks, in one reduction."""
        if self.accelerator.num_processes == 1:
            return list(values)
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device), "sum").tolist()

    def _generate(self, prompts: Sequence, progress: bool = False, desc: str = "generating") -> list[str]:
        """Greedy completions. Sharded: every rank takes part, with or without prompts of its own, because each
        forward gathers the weights from all ranks."""
        if not prompts and not self.sharded:
            return []
        with self._autocast():
            return greedy_generate(self.unwrapped, self.tokenizer, prompts, self.chat, self.config.max_new_tokens,
                                   self.config.generate_batch_size, progress, desc, synced=self.sharded)

    def _autocast(self):
        """bfloat16 autocast for the LM's passes under ``mixed_precision`` bf16. The SDM layers' fitting and scoring
        stay outside it: their nearest-neighbour distances need float32."""
        if self.config.mixed_precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)

    def _embed(self, instances: Sequence[Instance], progress: bool = False) -> torch.Tensor:
        """The instances' h from a no-grad pass of the current weights (under :meth:`_autocast`)."""
        with self._autocast():
            return embed_instances(self.unwrapped, self.tokenizer, instances, self.chat, self.recipe, self.config.embed_batch_size, progress)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, keep: int = 0, hidden_states: bool = False):
        """The training model's forward (under :meth:`_autocast`); ``keep``: logits of the last ``keep`` positions
        only (0: all), see :func:`training.loss.logits_to_keep`."""
        with self._autocast():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep,
                              output_hidden_states=hidden_states)

    def _missing_passes(self, passes: int) -> int:
        """How many passes this rank runs with no documents of its own so that every rank runs as many forward and
        backward passes as the busiest one: DDP reduces gradients in each backward and FSDP gathers weights in each
        forward, so a rank short of documents in an epoch's last step would leave the others waiting for ever."""
        if self.accelerator.num_processes == 1:
            return 0
        count = torch.tensor([passes], device=self.accelerator.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item()) - passes

    def _step_agreement(self, tokens: int, micro_batches: int, shared: bool) -> tuple[int, int, bool]:
        """What the ranks must agree on before a step's passes, in one collective: the step's unmasked tokens over
        all ranks, how many idle passes this rank runs (see :meth:`_missing_passes`), and whether every rank can
        take b from the training forward."""
        if self.accelerator.num_processes == 1:
            return tokens, 0, shared
        rows = self.accelerator.gather(torch.tensor([[tokens, micro_batches, int(shared)]], device=self.accelerator.device))
        return int(rows[:, 0].sum()), int(rows[:, 1].max()) - micro_batches, bool(rows[:, 2].min())

    def _idle_loss(self) -> torch.Tensor:
        """A zero loss over one padding token: the collective passes run, the gradients do not change."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.accelerator.device)
        return self._forward(ids).logits.sum() * 0.0

    def _union_across_ranks(self, store: dict[str, list[str]]) -> dict[str, list[str]]:
        """The union of every rank's {document id: hard negatives} (each document belongs to one rank a step)."""
        if self.accelerator.num_processes == 1:
            return store
        from accelerate.utils import gather_object

        merged: dict[str, list[str]] = {}
        for part in gather_object([store]):
            for doc_id, negatives in part.items():
                kept = merged.setdefault(doc_id, [])
                kept.extend(n for n in negatives if n not in kept)
        return merged

    def _log(self, record: dict) -> None:
        self.state["history"].append(record)
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(json.dumps(record))

    # -- instances ------------------------------------------------------------------------------------------
    def _plan(self, record: Record, tag: str, generate_ok: bool) -> tuple[random.Random, str]:
        """The document's draw for ``tag``: its RNG (also used to pick among negatives) and the instance kind."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{tag}:{record.id}")
        if rng.random() < cfg.gamma_positive:
            return rng, "positive"
        if generate_ok and rng.random() < cfg.gamma_generate:
            return rng, "generate"
        return rng, "negative"

    def _step_docs(self, order: Sequence[Record], local: int) -> Sequence[Record]:
        """This rank's documents of the epoch's ``local``-th step."""
        docs = order[local * self.docs_per_step : (local + 1) * self.docs_per_step]
        return docs[self.accelerator.process_index :: self.accelerator.num_processes]

    def _pregenerate(self, epoch: int, order: Sequence[Record]) -> dict[str, str]:
        """generation_timing "epoch": decode, in batches and with the epoch-start weights, every prompt this rank's
        draws of the epoch will generate for."""
        if self.config.generation_timing != "epoch" or epoch < self.config.generate_from_epoch:
            return {}
        wanted = []
        for local in range(self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + local
            for record in self._step_docs(order, local):
                if self._plan(record, f"train:{epoch}:{step}", True)[1] == "generate":
                    wanted.append(record)
        texts = self._generate([prompt_of(r) for r in wanted], self.config.progress, f"epoch {epoch + 1} hard negatives")
        return dict(zip([r.id for r in wanted], texts))

    def _draw(self, records: Sequence[Record], tag: str, generate_ok: bool, store: dict, pregenerated: dict | None = None) -> list[Instance]:
        """Each document's instance; generated hard negatives (checked by the verbatim rule) go into ``store``.
        Texts already decoded for a document (``pregenerated``, consumed here) stand in for its generation."""
        plans = [(record, *self._plan(record, tag, generate_ok)) for record in records]
        pregenerated = {} if pregenerated is None else pregenerated
        generations = {r.id: pregenerated.pop(r.id) for r, _, kind in plans if kind == "generate" and r.id in pregenerated}
        to_generate = [record for record, _, kind in plans if kind == "generate" and record.id not in generations]
        generations.update(zip([r.id for r in to_generate], self._generate([prompt_of(r) for r in to_generate])))
        instances = []
        for record, rng, kind in plans:
            if kind == "positive":
                instances.append(Instance(record.id, prompt_of(record), record.positive, 1))
                continue
            candidates = [record.negative] + list(store.get(record.id, []))
            if kind == "generate":
                generated = generations[record.id].strip()
                if not is_verbatim(generated, record.positive):
                    negative = normalize_hard_negative(generated)
                    if negative not in candidates:
                        candidates.append(negative)
                        store.setdefault(record.id, []).append(negative)
            rng.shuffle(candidates)
            instances.append(Instance(record.id, prompt_of(record), candidates[0], 0))
        return instances

    def _encode(self, instances: Sequence[Instance]) -> list[EncodedInstance]:
        return [encode_instance(self.tokenizer, i.prompt, i.response, i.label, self.chat, self.config.max_length) for i in instances]

    def _bases(self, instances: Sequence[Instance], layer: SDMEstimator | None, flags: dict[str, bool]) -> torch.Tensor:
        """b = 2 + SDM(z')_y per instance (e for the CE baseline, where b does not enter the loss)."""
        if layer is None:
            return torch.full((len(instances),), math.e)
        h = self._embed(instances)
        if self.sharded:  # each embedding batch is a collective forward; match the rank with the most instances
            with torch.no_grad():
                for _ in range(self._missing_passes(math.ceil(len(instances) / self.config.embed_batch_size))):
                    self._idle_loss()
        return self._bases_from_h(h, instances, layer, flags)

    @staticmethod
    def _bases_from_h(h: torch.Tensor, instances: Sequence[Instance], layer: SDMEstimator, flags: dict[str, bool]) -> torch.Tensor:
        scores = layer.score(h, support_ids=[i.doc_id if flags.get(i.doc_id) else None for i in instances])
        labels = torch.tensor([i.label for i in instances])
        return 2.0 + scores.probabilities.gather(1, labels.unsqueeze(1)).squeeze(1).to(torch.float32)

    def _shared_prefixes(self, instances: Sequence[Instance], encoded: Sequence[EncodedInstance]) -> list[int] | None:
        """See :func:`training.verification_layer.shared_prefix_lengths` (SDM loss only)."""
        if self.config.loss != "sdm":
            return None
        return shared_prefix_lengths(self.tokenizer, instances, [e.input_ids for e in encoded], self.chat, self.recipe)

    def _loss_sum(self, encoded: Sequence[EncodedInstance], bases: torch.Tensor) -> tuple[torch.Tensor, int]:
        ids, mask, labels = collate(encoded, self.pad_id)
        device = self.accelerator.device
        logits = self._forward(ids.to(device), mask.to(device), keep=logits_to_keep(labels)).logits
        if self.config.loss == "sdm":
            return sdm_token_loss(logits, labels.to(device), bases.to(device))
        return ce_token_loss(logits, labels.to(device))

    def _prefix_h(self, final_states: torch.Tensor, prefixes: Sequence[int]) -> torch.Tensor:
        return prefix_embeddings(final_states, prefixes, self.recipe)

    def _loss_sum_shared(
        self, encoded: Sequence[EncodedInstance], instances: Sequence[Instance], prefixes: Sequence[int], flags: dict[str, bool]
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The SDM loss with b from the same forward pass (see ``_shared_prefixes``): (loss sum, tokens, b)."""
        ids, mask, labels = collate(encoded, self.pad_id)
        device = self.accelerator.device
        out = self._forward(ids.to(device), mask.to(device), keep=logits_to_keep(labels), hidden_states=True)
        h = self._prefix_h(out.hidden_states[-1], prefixes)
        bases = self._bases_from_h(h, instances, self.train_layer, flags)
        loss_sum, tokens = sdm_token_loss(out.logits, labels.to(device), bases.to(device))
        return loss_sum, tokens, bases

    # -- SDM layers -----------------------------------------------------------------------------------------
    def _fit_layer(self, records: Sequence[Record], flags: dict[str, bool], hard_negatives: dict, tag: str) -> SDMEstimator:
        rng = random.Random(f"{self.config.seed}:{tag}")
        instances = draw_layer_instances(records, hard_negatives, rng, self.config.gamma_positive)
        h = self._embed(instances, self.config.progress)
        return fit_verification_layer(h, instances, flags, self.sdm_config)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """The evaluation loss over the calibration documents: Eq. 1 under a freshly fitted validation layer (or CE)."""
        step, epoch = self.state["step"], self.state["epoch"]
        flags = split_flags([r.id for r in self.calibration_records], self.config.seed, epoch)
        layer = None
        if self.config.loss == "sdm":
            limit = self.config.validation_layer_docs
            layer_docs = self.calibration_records[:limit] if limit else self.calibration_records
            layer = self._fit_layer(layer_docs, flags, self.state["validation_hard_negatives"], f"validation-layer:{step}")
        store: dict[str, list[str]] = {}
        instances = self._draw(self.eval_records, f"eval:{step}", generate_ok=epoch >= self.config.generate_from_epoch, store=store)
        self.state["validation_hard_negatives"] = store
        bases = self._bases(instances, layer, flags)
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.config.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(instances), size):
                encoded = self._encode(instances[start : start + size])
                loss_sum, n = self._loss_sum(encoded, bases[start : start + size])
                total += float(loss_sum)
                tokens += n
        self.model.train()
        return total / max(tokens, 1)

    # -- saving ---------------------------------------------------------------------------------------------
    def save_model(self, folder: Path) -> None:
        """Rank 0 writes the model; every rank calls this (a sharded model's full weights are gathered collectively)."""
        model = self.unwrapped
        state_dict = _retie(model, self.accelerator.get_state_dict(self.model)) if self.sharded else None

        def write(tmp: Path) -> None:
            if state_dict is None:
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "sdm_training.json").write_text(json.dumps({"model_source": self.config.model, "lora": self.config.lora, "step": self.state["step"]}, indent=1))

        if self.accelerator.is_main_process:
            atomic_folder(folder, write, if_exists="replace")

    def _checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoint", model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler,
                        trainer_state=self.state, train_layer=self.train_layer, write=self.accelerator.is_main_process)
        crash_after = os.environ.get("SDM_TEST_CRASH_AFTER_STEP")
        if crash_after and self.state["step"] >= int(crash_after):
            self.accelerator.wait_for_everyone()  # rank 0 may still be writing; a rank's exit ends the launch
            os._exit(137)  # a test hook that simulates kill -9 right after a checkpoint

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.state, self.train_layer = load_checkpoint(self.out / "checkpoint", model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler)
            log.info("resumed at epoch %d step %d", self.state["epoch"], self.state["step"])
            if self.accelerator.is_main_process:  # drop records logged after the checkpoint; they are redone
                (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.state["history"]))
        elif self.accelerator.is_main_process:
            (self.out / "metrics.jsonl").write_text("")
            (self.out / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "git_revision": git_revision(),
                                                                 "torch": torch.__version__, "steps": self.total_steps}, indent=1))
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=f"fine-tuning ({cfg.loss})", disable=not cfg.progress)
        started = time.perf_counter()
        warned_uniform: set[int] = set()  # epochs already warned about an all-uniform step
        for epoch in range(self.state["epoch"], cfg.epochs):
            first_step = epoch * self.steps_per_epoch
            order = list(self.train_records)
            random.Random(f"{cfg.seed}:order:{epoch}").shuffle(order)
            flags = split_flags([r.id for r in self.train_records], cfg.seed, epoch)
            if self.state["step"] == first_step or self.state["epoch"] != epoch:
                self.state["epoch"] = epoch
                if cfg.loss == "sdm":
                    self.train_layer = self._fit_layer(self.train_records, flags, self.state["previous_hard_negatives"], f"train-layer:{epoch}")
                self.state["epoch_hard_negatives"] = {}
                self.state["pregenerated"] = self._pregenerate(epoch, order)
            for local in range(self.state["step"] - first_step, self.steps_per_epoch):
                step = first_step + local
                found: dict[str, list[str]] = {}
                instances = self._draw(self._step_docs(order, local), f"train:{epoch}:{step}", generate_ok=epoch >= self.config.generate_from_epoch,
                                       store=found, pregenerated=self.state.setdefault("pregenerated", {}))
                # Every rank keeps every rank's hard negatives: the next epoch's training layer (fitted on each rank)
                # and the checkpoint (written by rank 0) need all of them. A document is drawn once an epoch, so
                # only the step's new ones travel.
                self.state["epoch_hard_negatives"].update(self._union_across_ranks(found))
                encoded = self._encode(instances)
                prefixes = self._shared_prefixes(instances, encoded) if self.train_layer is not None else None
                size = cfg.micro_batch_size
                total_tokens, idle_passes, shared = self._step_agreement(
                    sum(e.trained_tokens for e in encoded), math.ceil(len(encoded) / size), prefixes is not None)
                if not shared:
                    # One decision for the step, as one process makes it over all the step's documents; it also
                    # keeps a sharded model's collective forwards in step across ranks.
                    prefixes = None
                bases = self._bases(instances, self.train_layer, flags) if prefixes is None else None
                shared_bases = []
                step_loss = 0.0  # this rank's share of the step's token-mean loss; summed over ranks below
                for start in range(0, len(encoded), size):
                    if prefixes is None:
                        loss_sum, _ = self._loss_sum(encoded[start : start + size], bases[start : start + size])
                    else:
                        loss_sum, _, b = self._loss_sum_shared(encoded[start : start + size], instances[start : start + size],
                                                               prefixes[start : start + size], flags)
                        shared_bases.append(b)
                    # Dividing by the step's total unmasked tokens (all ranks) keeps Eq. 1's token mean exact under
                    # gradient accumulation; DDP averages gradients over ranks, hence the world-size factor.
                    loss = loss_sum * self.accelerator.num_processes / max(total_tokens, 1)
                    self.accelerator.backward(loss)
                    step_loss += float(loss.detach()) / self.accelerator.num_processes
                for _ in range(idle_passes):
                    self.accelerator.backward(self._idle_loss())
                if cfg.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if prefixes is not None:
                    bases = torch.cat(shared_bases) if shared_bases else torch.zeros(0)
                # b = 2.5 exactly means SDM(z') = (1/2, 1/2), i.e. d = 0: h has left the distance range of the layer
                # fitted at the epoch start, and Eq. 1 is then a fixed-base cross-entropy for that instance.
                uniform = float((bases == 2.5).sum()) if cfg.loss == "sdm" and self.train_layer is not None else 0.0
                step_loss, base_sum, base_count, uniform = self._sum_across_ranks(step_loss, float(bases.sum()), float(len(bases)), uniform)
                mean_base = base_sum / max(base_count, 1.0)
                if uniform and uniform == base_count and epoch not in warned_uniform:
                    warned_uniform.add(epoch)
                    log.warning("step %d: every instance has d = 0 under the epoch's training layer (its h lie beyond the "
                                "layer's calibration distances; typically h has moved since the epoch start), so the SDM loss "
                                "is a fixed-base cross-entropy there; 'uniform_bases' in metrics.jsonl counts such instances "
                                "per step (docs/training.md).", step + 1)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                record = {"step": step + 1, "epoch": epoch + (local + 1) / self.steps_per_epoch, "loss": step_loss,
                          "lr": self.scheduler.get_last_lr()[0], "mean_base": mean_base, "uniform_bases": int(uniform),
                          "seconds": round(time.perf_counter() - started, 1),
                          "hard_negatives": sum(len(v) for v in self.state["epoch_hard_negatives"].values())}
                last = step + 1 == self.total_steps
                if (step + 1) % cfg.eval_steps == 0 or last:
                    eval_loss = self.evaluate()
                    record["eval_loss"] = eval_loss
                    if eval_loss < self.state["best_eval_loss"]:
                        self.state["best_eval_loss"], self.state["best_step"] = eval_loss, step + 1
                        self.save_model(self.out / "best")
                        record["best"] = True
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", eval=f"{self.state['best_eval_loss']:.4f}")
                if local + 1 == self.steps_per_epoch:
                    # The epoch's generations feed the next epoch's training layer; the store then starts afresh.
                    self.state["previous_hard_negatives"] = {k: v for k, v in self.state["epoch_hard_negatives"].items() if v}
                    self.state["epoch"] = epoch + 1
                if (step + 1) % cfg.save_steps == 0 or last:
                    self._checkpoint()
        bar.close()
        self.save_model(self.out / "final")
        return TrainResult(self.out, self.out / "best", self.state["best_eval_loss"], self.state["best_step"], self.state["step"], self.state["history"])
