"""The SDM LM fine-tuning loop (SDM_SPEC §3.3–§3.6) and its cross-entropy baseline.

Size: one class, the loop and the passes it makes through one model, which read best whole; the parts that
stand alone (sampling, bases, ranks, state, checkpoints, the SDM layers) are their own modules.

Per epoch: (SDM loss only) fit the training-set SDM layer on one instance per training document, embedded with
the frozen LM (with ``train_layer_refit_steps`` N > 0, refit it the same way every N steps into the epoch). Per
optimiser step: draw each document's instance (:mod:`training.sampling`), compute each
instance's base b = 2 + SDM(z')_y with the training layer (:mod:`training.bases`), and take an AdamW step on Eq. 1
(or CE). Every ``eval_steps``: fit a validation SDM layer on the calibration documents and compute the evaluation
loss; the checkpoint with the lowest evaluation loss is kept. Several processes stay in step through
:mod:`training.ranks`; the loop's position is a :class:`training.state.TrainerState`.

Every random draw comes from a ``random.Random`` seeded by (seed, epoch, step, document), so a resumed run makes
exactly the draws an uninterrupted run makes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdm_core import SDMEstimator
from sdm_core.folders import atomic_folder
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, is_sharded
from training.bases import CE_BASE, bases_from_h, uniform_bases
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import FinetuneConfig
from training.encoding import EncodedInstance, collate, encode_instance
from training.generation import greedy_generate
from training.loss import ce_token_loss, logits_to_keep, sdm_token_loss
from training.ranks import RankSync
from training.records import Record
from training.sampling import InstanceSampler
from training.state import TrainerCallback, TrainerState, TrainResult
from training.verification_layer import (
    CLASS_NAMES,
    Instance,
    draw_layer_instances,
    embed_instances,
    fit_verification_layer,
    prefix_embeddings,
    refit_due,
    shared_prefix_lengths,
    split_flags,
)

__all__ = ["SDMTrainer", "TrainResult", "git_revision"]

log = logging.getLogger("training")


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


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


def _optimizer_and_schedule(model, config: FinetuneConfig, total_steps: int):
    """AdamW without weight decay on biases and norms; linear warmup then linear decay to 0 (HF's default schedule)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    warmup = min(config.warmup_steps, total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total_steps - step) / max(total_steps - warmup, 1))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class SDMTrainer:
    """Fine-tunes ``model`` on CONTRASTIVE-MASKING instances with the SDM next-token loss (or CE).

    ``callbacks`` are told after every checkpoint (:class:`training.state.TrainerCallback`)."""

    def __init__(
        self,
        config: FinetuneConfig,
        model,
        tokenizer,
        train_records: Sequence[Record],
        calibration_records: Sequence[Record],
        accelerator=None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.tokenizer = tokenizer
        self.train_records = list(train_records)
        self.calibration_records = list(calibration_records)
        if not self.train_records or not self.calibration_records:
            raise ValueError("fine-tuning needs non-empty train and calibration records")
        self.chat = ChatFormat(system_prompt=config.system_prompt)
        self.recipe = HiddenStateRecipe(sequence_end=config.recipe_sequence_end, max_length=config.max_length)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self._check_accelerator()
        self.out = Path(config.output_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sdm_config = replace(config.sdm, seed=config.seed, progress=False, class_names=CLASS_NAMES)
        optimizer, self.scheduler = _optimizer_and_schedule(model, config, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.sharded = is_sharded(self.model)  # FSDP2: forwards, generation and state gathering are collective
        if self.sharded:
            from torch.distributed.fsdp import register_fsdp_forward_method

            # peft's generate decodes with the inner model, past the root module's hooks; registered, it enters
            # through the root like a forward (nested root forwards are no-ops, so plain models are unaffected).
            register_fsdp_forward_method(self.model, "generate")
        eval_docs = list(self.calibration_records)
        random.Random(f"{config.seed}:eval-docs").shuffle(eval_docs)
        self.eval_records = eval_docs[: config.max_eval_docs] if config.max_eval_docs else eval_docs
        self.ranks = RankSync(self.accelerator)
        self.sampler = InstanceSampler(
            config, self._generate, self.docs_per_step, self.accelerator.process_index, self.accelerator.num_processes
        )
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.train_layer: SDMEstimator | None = None
        self.warned_uniform: set[int] = set()  # epochs already warned about an all-uniform step
        if config.loss == "sdm" and config.train_layer_refit_steps >= self.steps_per_epoch:
            log.warning("train_layer_refit_steps >= %d steps an epoch: no refit within an epoch", self.steps_per_epoch)

    def _check_accelerator(self) -> None:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2:
            # FSDP1 wraps the model so that its unwrapped module holds flattened shards: the no-grad passes and the
            # checkpoints here are written for FSDP2 (fully_shard), where the model stays the root module.
            raise ValueError(
                "FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
                "(training/accelerate/fsdp.yaml)"
            )
        if self.config.mixed_precision == "bf16" and self.accelerator.device.type == "cpu" and not _cpu_has_bf16():
            log.warning(
                "mixed_precision bf16 on a CPU without native bfloat16 instructions (AVX512-BF16 or AMX): "
                "the autocast products are emulated and likely slower than float32; use --mixed-precision no"
            )

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

    def _log(self, record: dict) -> None:
        self.state.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(json.dumps(record))

    # -- the model's passes ---------------------------------------------------------------------------------
    def _generate(self, prompts: Sequence, progress: bool = False, desc: str = "generating") -> list[str]:
        """Greedy completions. Sharded: every rank takes part, with or without prompts of its own, because each
        forward gathers the weights from all ranks."""
        if not prompts and not self.sharded:
            return []
        with self._autocast():
            return greedy_generate(
                self.unwrapped,
                self.tokenizer,
                prompts,
                self.chat,
                self.config.max_new_tokens,
                self.config.generate_batch_size,
                progress,
                desc,
                synced=self.sharded,
            )

    def _autocast(self):
        """bfloat16 autocast for the LM's passes under ``mixed_precision`` bf16. The SDM layers' fitting and scoring
        stay outside it: their nearest-neighbour distances need float32."""
        if self.config.mixed_precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)

    def _embed(self, instances: Sequence[Instance], progress: bool = False) -> torch.Tensor:
        """The instances' h from a no-grad pass of the current weights (under :meth:`_autocast`)."""
        with self._autocast():
            return embed_instances(
                self.unwrapped,
                self.tokenizer,
                instances,
                self.chat,
                self.recipe,
                self.config.embed_batch_size,
                progress,
            )

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, keep: int = 0, hidden_states: bool = False):
        """The training model's forward (under :meth:`_autocast`); ``keep``: logits of the last ``keep`` positions
        only (0: all), see :func:`training.loss.logits_to_keep`."""
        with self._autocast():
            return self.model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=False,
                logits_to_keep=keep,
                output_hidden_states=hidden_states,
            )

    def _idle_loss(self) -> torch.Tensor:
        """A zero loss over one padding token: the collective passes run, the gradients do not change."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.accelerator.device)
        return self._forward(ids).logits.sum() * 0.0

    # -- bases and losses -----------------------------------------------------------------------------------
    def _bases(self, instances: Sequence[Instance], layer: SDMEstimator | None, flags: dict[str, bool]) -> torch.Tensor:
        """b per instance from a separate no-grad pass (``CE_BASE`` for the CE baseline)."""
        if layer is None:
            return torch.full((len(instances),), CE_BASE)
        h = self._embed(instances)
        if self.sharded:  # each embedding batch is a collective forward; match the rank with the most instances
            with torch.no_grad():
                for _ in range(self.ranks.missing_passes(math.ceil(len(instances) / self.config.embed_batch_size))):
                    self._idle_loss()
        return bases_from_h(h, instances, layer, flags)

    def _encode(self, instances: Sequence[Instance]) -> list[EncodedInstance]:
        return [
            encode_instance(self.tokenizer, i.prompt, i.response, i.label, self.chat, self.config.max_length)
            for i in instances
        ]

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
        self,
        encoded: Sequence[EncodedInstance],
        instances: Sequence[Instance],
        prefixes: Sequence[int],
        flags: dict[str, bool],
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The SDM loss with b from the same forward pass (see ``_shared_prefixes``): (loss sum, tokens, b)."""
        ids, mask, labels = collate(encoded, self.pad_id)
        device = self.accelerator.device
        out = self._forward(ids.to(device), mask.to(device), keep=logits_to_keep(labels), hidden_states=True)
        h = self._prefix_h(out.hidden_states[-1], prefixes)
        bases = bases_from_h(h, instances, self.train_layer, flags)
        loss_sum, tokens = sdm_token_loss(out.logits, labels.to(device), bases.to(device))
        return loss_sum, tokens, bases

    # -- SDM layers -----------------------------------------------------------------------------------------
    def _fit_layer(
        self, records: Sequence[Record], flags: dict[str, bool], hard_negatives: dict, tag: str
    ) -> SDMEstimator:
        rng = random.Random(f"{self.config.seed}:{tag}")
        instances = draw_layer_instances(records, hard_negatives, rng, self.config.gamma_positive)
        h = self._embed(instances, self.config.progress)
        return fit_verification_layer(h, instances, flags, self.sdm_config)

    def _refit_train_layer(self, epoch: int, local: int, flags: dict[str, bool]) -> float | None:
        """Every ``train_layer_refit_steps`` steps into an epoch (SDM loss): the training layer fitted again as at the
        epoch start (its split, the previous epoch's hard negatives) with the current weights and a draw of its own.
        At the step's start, after the last checkpoint, so a resumed run refits where an uninterrupted one does and
        the checkpoint holds the layer in use. Returns the refit's wall seconds (None: no refit)."""
        if self.train_layer is None or not refit_due(local, self.config.train_layer_refit_steps):
            return None
        started = time.perf_counter()
        step = epoch * self.steps_per_epoch + local
        hard_negatives = self.state.previous_hard_negatives
        self.train_layer = self._fit_layer(self.train_records, flags, hard_negatives, f"train-layer:{epoch}:{step}")
        seconds = time.perf_counter() - started
        log.info("step %d: training layer refitted in %.1f s", step + 1, seconds)
        return seconds

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """The evaluation loss over the calibration documents: Eq. 1 under a freshly fitted validation layer (or CE)."""
        step, epoch = self.state.step, self.state.epoch
        flags = split_flags([r.id for r in self.calibration_records], self.config.seed, epoch)
        layer = None
        if self.config.loss == "sdm":
            limit = self.config.validation_layer_docs
            layer_docs = self.calibration_records[:limit] if limit else self.calibration_records
            layer = self._fit_layer(layer_docs, flags, self.state.validation_hard_negatives, f"validation-layer:{step}")
        store: dict[str, list[str]] = {}
        instances = self.sampler.draw(
            self.eval_records, f"eval:{step}", generate_ok=epoch >= self.config.generate_from_epoch, store=store
        )
        self.state.validation_hard_negatives = store
        bases = self._bases(instances, layer, flags)
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.config.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(instances), size):
                loss_sum, n = self._loss_sum(self._encode(instances[start : start + size]), bases[start : start + size])
                total += float(loss_sum)
                tokens += n
        self.model.train()
        return total / max(tokens, 1)

    def _evaluate_into(self, record: dict) -> None:
        """Evaluate, record the loss, and keep the model when it is the best so far (strictly lower wins)."""
        eval_loss = self.evaluate()
        record["eval_loss"] = eval_loss
        if eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = eval_loss, self.state.step
            self.save_model(self.out / "best")
            record["best"] = True

    # -- saving and resuming --------------------------------------------------------------------------------
    def save_model(self, folder: Path) -> None:
        """Rank 0 writes the model; every rank calls this (a sharded model's full weights are gathered collectively)."""
        model = self.unwrapped
        state_dict = _retie(model, self.accelerator.get_state_dict(self.model)) if self.sharded else None
        meta = {"model_source": self.config.model, "lora": self.config.lora, "step": self.state.step}

        def write(tmp: Path) -> None:
            if state_dict is None:
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "sdm_training.json").write_text(json.dumps(meta, indent=1))

        if self.accelerator.is_main_process:
            atomic_folder(folder, write, if_exists="replace")

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.out / "checkpoint",
            model=self.unwrapped,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.state.to_dict(),
            train_layer=self.train_layer,
            write=self.accelerator.is_main_process,
        )
        for callback in self.callbacks:
            callback.on_checkpoint(self)

    def _open_run(self, resume: bool) -> None:
        """Restore the last checkpoint (``resume``), or start the run's outputs afresh."""
        self.out.mkdir(parents=True, exist_ok=True)
        main = self.accelerator.is_main_process
        if resume:
            state, self.train_layer = load_checkpoint(
                self.out / "checkpoint", model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.state = TrainerState.from_dict(state)
            log.info("resumed at epoch %d step %d", self.state.epoch, self.state.step)
            if main:  # drop records logged after the checkpoint; they are redone
                (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.state.history))
        elif main:
            (self.out / "metrics.jsonl").write_text("")
            (self.out / "config.json").write_text(
                json.dumps(
                    {
                        "config": self.config.to_dict(),
                        "git_revision": git_revision(),
                        "torch": torch.__version__,
                        "steps": self.total_steps,
                    },
                    indent=1,
                )
            )

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        """Epoch by epoch, step by step; evaluates every ``eval_steps`` and checkpoints every ``save_steps``."""
        self._open_run(resume)
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=f"fine-tuning ({self.config.loss})",
            disable=not self.config.progress,
        )
        started = time.perf_counter()
        for epoch in range(self.state.epoch, self.config.epochs):
            order, flags = self._begin_epoch(epoch)
            for local in range(self.state.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                refit_seconds = self._refit_train_layer(epoch, local, flags)
                record = self._train_step(epoch, local, order, flags)
                if refit_seconds is not None:  # the step's mean_base is the refitted layer's
                    record["layer_refit_seconds"] = round(refit_seconds, 2)
                record["seconds"] = round(time.perf_counter() - started, 1)
                record["hard_negatives"] = sum(len(v) for v in self.state.epoch_hard_negatives.values())
                self._end_step(record, epoch, local)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", eval=f"{self.state.best_eval_loss:.4f}")
        bar.close()
        self.save_model(self.out / "final")
        s = self.state
        return TrainResult(self.out, self.out / "best", s.best_eval_loss, s.best_step, s.step, s.history)

    def _begin_epoch(self, epoch: int) -> tuple[list[Record], dict[str, bool]]:
        """The epoch's document order and support flags; at the epoch's first step (not on a resume inside it) also
        its training layer and, with generation_timing "epoch", its decoded prompts."""
        order = list(self.train_records)
        random.Random(f"{self.config.seed}:order:{epoch}").shuffle(order)
        flags = split_flags([r.id for r in self.train_records], self.config.seed, epoch)
        if self.state.step == epoch * self.steps_per_epoch or self.state.epoch != epoch:
            self.state.epoch = epoch
            if self.config.loss == "sdm":
                self.train_layer = self._fit_layer(
                    self.train_records, flags, self.state.previous_hard_negatives, f"train-layer:{epoch}"
                )
            self.state.epoch_hard_negatives = {}
            self.state.pregenerated = self.sampler.pregenerate(epoch, order, self.steps_per_epoch)
        return order, flags

    def _train_step(self, epoch: int, local: int, order: Sequence[Record], flags: dict[str, bool]) -> dict:
        """One optimiser step over the step's documents; returns its metrics record."""
        step = epoch * self.steps_per_epoch + local
        found: dict[str, list[str]] = {}
        instances = self.sampler.draw(
            self.sampler.step_documents(order, local),
            f"train:{epoch}:{step}",
            generate_ok=epoch >= self.config.generate_from_epoch,
            store=found,
            pregenerated=self.state.pregenerated,
        )
        # Every rank keeps every rank's hard negatives: the next epoch's training layer (fitted on each rank) and the
        # checkpoint (written by rank 0) need all of them. A document is drawn once an epoch, so only the step's new
        # ones travel.
        self.state.epoch_hard_negatives.update(self.ranks.union(found))
        step_loss, bases = self._accumulate_gradients(instances, flags)
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        uniform = float(uniform_bases(bases)) if self.config.loss == "sdm" and self.train_layer is not None else 0.0
        step_loss, base_sum, base_count, uniform = self.ranks.sum(
            step_loss, float(bases.sum()), float(len(bases)), uniform
        )
        if uniform and uniform == base_count:
            self._warn_all_uniform(epoch, step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step + 1
        return {
            "step": step + 1,
            "epoch": epoch + (local + 1) / self.steps_per_epoch,
            "loss": step_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "mean_base": base_sum / max(base_count, 1.0),
            "uniform_bases": int(uniform),
        }

    def _accumulate_gradients(
        self, instances: Sequence[Instance], flags: dict[str, bool]
    ) -> tuple[float, torch.Tensor]:
        """The forward and backward passes of a step's micro-batches: (this rank's share of the step's token-mean
        loss, b per instance)."""
        encoded = self._encode(instances)
        prefixes = self._shared_prefixes(instances, encoded) if self.train_layer is not None else None
        size = self.config.micro_batch_size
        total_tokens, idle_passes, shared = self.ranks.step_agreement(
            sum(e.trained_tokens for e in encoded), math.ceil(len(encoded) / size), prefixes is not None
        )
        if not shared:
            # One decision for the step, as one process makes it over all the step's documents; it also keeps a
            # sharded model's collective forwards in step across ranks.
            prefixes = None
        bases = self._bases(instances, self.train_layer, flags) if prefixes is None else None
        shared_bases = []
        step_loss = 0.0
        world = self.accelerator.num_processes
        for start in range(0, len(encoded), size):
            batch = slice(start, start + size)
            if prefixes is None:
                loss_sum, _ = self._loss_sum(encoded[batch], bases[batch])
            else:
                loss_sum, _, b = self._loss_sum_shared(encoded[batch], instances[batch], prefixes[batch], flags)
                shared_bases.append(b)
            # Dividing by the step's total unmasked tokens (all ranks) keeps Eq. 1's token mean exact under gradient
            # accumulation; DDP averages gradients over ranks, hence the world-size factor.
            loss = loss_sum * world / max(total_tokens, 1)
            self.accelerator.backward(loss)
            step_loss += float(loss.detach()) / world
        for _ in range(idle_passes):
            self.accelerator.backward(self._idle_loss())
        if prefixes is not None:
            bases = torch.cat(shared_bases) if shared_bases else torch.zeros(0)
        return step_loss, bases

    def _warn_all_uniform(self, epoch: int, step: int) -> None:
        """Once an epoch: every instance of a step has d = 0 under the epoch's training layer."""
        if epoch in self.warned_uniform:
            return
        self.warned_uniform.add(epoch)
        log.warning(
            "step %d: every instance has d = 0 under the epoch's training layer (its h lie beyond the "
            "layer's calibration distances; typically h has moved since the layer's fit), so the SDM loss "
            "is a fixed-base cross-entropy there; 'uniform_bases' in metrics.jsonl counts such instances "
            "per step, and --train-layer-refit-steps N refits the layer every N steps (docs/training.md).",
            step + 1,
        )

    def _end_step(self, record: dict, epoch: int, local: int) -> None:
        """After a step: evaluate when due, log, close the epoch at its last step, checkpoint when due."""
        step = self.state.step
        last = step == self.total_steps
        if step % self.config.eval_steps == 0 or last:
            self._evaluate_into(record)
        self._log(record)
        if local + 1 == self.steps_per_epoch:
            # The epoch's generations feed the next epoch's training layer; the store then starts afresh.
            self.state.previous_hard_negatives = {k: v for k, v in self.state.epoch_hard_negatives.items() if v}
            self.state.epoch = epoch + 1
        if step % self.config.save_steps == 0 or last:
            self._checkpoint()
