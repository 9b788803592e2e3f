"""The curriculum training loop (the same code for one process and for FSDP ranks).

For each stage of the plan: freeze the stage's modules, build AdamW over the rest, and run its
steps: micro-batches from the :class:`~unimedvl.training.data.BatchStream` (gradient
accumulation), the weighted CE + flow loss (:func:`.objective.training_losses`), gradient
clipping, the warm-up/cosine learning rate, an EMA of every weight.  Each optimiser step appends a
row to ``RUN/metrics.jsonl``.  Checkpoints (every ``checkpoint_every`` steps and at each stage end)
are written atomically by :mod:`.checkpointing`, ``RUN/checkpoints/latest.json`` naming the newest
complete one.  ``resume`` restores the model, EMA, optimiser, data position and step; every random
draw of a step comes from a generator seeded by (plan seed, global step), so a resumed run repeats
an uninterrupted one bit for bit.

What wraps the model comes from outside it (:mod:`.parallelize`), in this order: LoRA adapters,
activation checkpointing (``plan.activation_checkpointing``: each decoder and ViT layer is
recomputed in the backward), then FSDP2 under ``torchrun``.  ``plan.precision`` ``auto`` trains in
bf16 autocast on GPUs (FSDP2 gathers bf16 parameters and reduces fp32 gradients; master weights,
optimiser and EMA stay fp32) and in fp32 on CPUs.  Rows also carry the step's model FLOP/s and,
where the accelerator's peak is known, MFU (:mod:`.flops`); with ``tensorboard`` installed the
same scalars go to ``RUN/tensorboard``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..formats.atomic import write_text
from ..formats.checkpoint import CheckpointError
from ..image_transforms import ImageTransform
from ..model import UniMedVL
from ..precision import training_compute
from . import checkpointing
from .checkpointing import CHECKPOINTS_DIR, checkpoint_name
from .data import BatchStream, DatasetIndex, MixtureSampler
from .distributed import DistContext
from .flops import peak_flops, step_flops
from .lora import apply_lora, lora_parameters
from .objective import training_losses
from .parallelize import apply_activation_checkpointing, shard_model
from .plan import Plan, PlanError, StageConfig
from .plots import plot_run
from .sequence import DropoutConfig, build_batch


@dataclass
class TrainResult:
    global_step: int
    checkpoint: Path | None
    metrics: Path


def _set_trainable(model: UniMedVL, frozen: tuple[str, ...]) -> list[torch.nn.Parameter]:
    trainable = []
    for name, p in model.named_parameters():
        freeze = name.endswith("pos_embed") or any(name == f or name.startswith(f + ".") for f in frozen)
        p.requires_grad_(not freeze)
        if not freeze:
            trainable.append(p)
    return trainable


def check_frozen_modules(model: torch.nn.Module, plan: Plan) -> None:
    """:class:`PlanError` naming every ``frozen`` entry of the plan's stages that names no module
    (a typo would otherwise freeze nothing and train what was meant to stay fixed)."""
    names = [n for n, _ in model.named_parameters()]
    for i, stage in enumerate(plan.stages):
        unknown = [f for f in stage.frozen if not any(n == f or n.startswith(f + ".") for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise PlanError(f"plan {plan.name!r}: stages[{i}] ({stage.name}): frozen names no module of the model: {unknown}; "
                            f"top-level modules: {tops}")


def plan_signature(plan: Plan) -> list[list]:
    """What a checkpoint records of its plan's curriculum: each stage's name and length."""
    return [[s.name, s.steps] for s in plan.stages]


class Trainer:
    def __init__(
        self,
        plan: Plan,
        dataset: str | Path,
        run_dir: str | Path,
        *,
        model: UniMedVL,
        tokenizer,
        device: str = "cpu",
        on_log: Callable[[dict], None] | None = None,
        dist_ctx: DistContext = DistContext(),
        tensorboard: bool = True,
        on_autoencoder_log: Callable[[dict], None] | None = None,
    ):
        self.plan, self.run_dir, self.model, self.tokenizer = plan, Path(run_dir), model.to(device), tokenizer
        self.device = torch.device(device)
        self.lora = lora = plan.lora
        self.dist = dist_ctx
        check_frozen_modules(self.model, plan)  # before anything is written or trained
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if plan.inference is not None:
            self.model.config.transforms = plan.inference  # checkpoints and exports record the scale the model learns at
        if plan.autoencoder is not None:
            self._prepare_autoencoder(dataset, on_autoencoder_log)
        self.precision = training_compute(plan.precision, self.device)
        self.peak_flops = peak_flops(self.device)
        self._tensorboard = tensorboard
        if lora is not None:
            apply_lora(self.model, lora)  # only the adapters train; export merges them
        # from outside the model, as torchtitan: activation checkpointing first, FSDP2 last
        if plan.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if dist_ctx.enabled:
            shard_model(self.model, bf16=self.precision == "bf16")
        self.index = DatasetIndex(dataset)
        self.on_log = on_log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.global_step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.stream: BatchStream | None = None
        self._stage_index = -1

    # ---- the autoencoder step ---------------------------------------------------------------
    def _prepare_autoencoder(self, dataset, on_log) -> None:
        """The plan's ``autoencoder`` step: trained once into ``RUN/autoencoder`` (rank 0; a finished
        one is reused), then loaded into the model on every rank before anything is sharded."""
        from .autoencoder import load_trained_autoencoder, train_autoencoder

        folder = self.run_dir / "autoencoder"
        ae = self.model.vae_model
        if self.dist.is_main and load_trained_autoencoder(ae, folder) is None:
            stage = self.plan.stages[0]
            ae.float()
            train_autoencoder(ae, dataset, folder, self.plan.autoencoder, ImageTransform(*stage.vae_transform),
                              seed=self.plan.seed, on_log=on_log)
        self.dist.barrier()
        if not self.dist.is_main and load_trained_autoencoder(ae, folder) is None:  # rank 0 holds it already
            raise RuntimeError(f"{folder}: the autoencoder step did not finish")

    # ---- stages ---------------------------------------------------------------------------
    def _enter_stage(self, index: int, stream_state: dict | None = None, optimizer_state: dict | None = None) -> StageConfig:
        stage = self.plan.stages[index]
        if self.lora is not None:
            for p in self.model.parameters():
                p.requires_grad_(False)
            trainable = lora_parameters(self.model)
            for p in trainable:
                p.requires_grad_(True)
        else:
            trainable = _set_trainable(self.model, stage.frozen)
        self._sync_frozen_ema()
        # the fused kernel is several times faster than the per-tensor loop (7x on a 2-core CPU)
        self.optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=stage.betas, eps=stage.eps, weight_decay=stage.weight_decay,
                                           fused=True)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        sampler = MixtureSampler(self.index, stage, seed=self.plan.seed * 1000 + index)
        self.stream = BatchStream(self.index, sampler, self.tokenizer, stage, seed=self.plan.seed * 1000 + index)
        if stream_state is not None:
            self.stream.load_state_dict(stream_state)
        self._stage_index = index
        return stage

    # ---- one optimiser step ------------------------------------------------------------------
    def _step(self, stage: StageConfig, stage_step: int) -> dict:
        self.model.train()
        lr = stage.lr_at(stage_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        vit, vae = ImageTransform(*stage.vit_transform), ImageTransform(*stage.vae_transform)
        dropout = DropoutConfig(stage.dropout_text, stage.dropout_vit, stage.dropout_vae)
        start = time.perf_counter()
        totals = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "tokens": 0, "flops": 0.0, "families": {}, "per_family": {}}
        ce_parts = mse_parts = 0
        for accum_index in range(stage.grad_accum):
            # every rank draws the same micro-batches and takes its own: the global batch is the
            # same for any number of processes, and so is each micro-batch's random stream
            candidates = [self.stream.next_batch() for _ in range(self.dist.world)]
            micro_index = accum_index * self.dist.world + self.dist.rank
            micro = candidates[self.dist.rank]
            generator = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + self.global_step * 1009 + micro_index)
            tb = build_batch(self.model, [p for _, p in micro], [f for f, _ in micro], self.tokenizer.special, generator=generator,
                             vit_transform=vit, vae_transform=vae, dropout=dropout, timestep_shift=stage.timestep_shift)
            with self._autocast():
                losses = training_losses(self.model, tb, ce_weight=stage.ce_weight, mse_weight=stage.mse_weight)
            totals["flops"] += step_flops(self.model.config, tb.batch, int(tb.labels.numel()))
            (losses.total / stage.grad_accum).backward()
            values = losses.as_floats()
            totals["loss"] += values["loss"] / stage.grad_accum
            if values["ce"] is not None:
                totals["ce"] += values["ce"]
                ce_parts += 1
            if values["mse"] is not None:
                totals["mse"] += values["mse"]
                mse_parts += 1
            totals["tokens"] += tb.batch.num_tokens
            for fam, parts in losses.per_family.items():
                acc = totals["per_family"].setdefault(fam, {})
                for key, value in parts.items():
                    acc.setdefault(key, []).append(value)
            for f, _ in micro:
                totals["families"][f] = totals["families"].get(f, 0) + 1
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema(stage.ema_decay)
        elapsed = time.perf_counter() - start
        self.global_step += 1
        ce = totals["ce"] / ce_parts if ce_parts else None
        mse = totals["mse"] / mse_parts if mse_parts else None
        if self.dist.enabled:  # log the global means
            totals["loss"] = self.dist.mean(totals["loss"])
            ce = self.dist.mean(ce) if ce is not None else None
            mse = self.dist.mean(mse) if mse is not None else None
            totals["tokens"] = int(round(self.dist.mean(totals["tokens"]) * self.dist.world))
            totals["flops"] = self.dist.mean(totals["flops"]) * self.dist.world
        flops_per_s = totals["flops"] / elapsed  # of all ranks together
        mfu = flops_per_s / (self.peak_flops * self.dist.world) if self.peak_flops else None
        return {
            "stage": stage.name, "step": self.global_step, "stage_step": stage_step + 1, "loss": totals["loss"],
            "ce": ce, "mse": mse,
            "lr": lr, "grad_norm": grad_norm, "tokens": totals["tokens"], "tokens_per_s": totals["tokens"] / elapsed,
            "tflops_per_s": flops_per_s / 1e12, "mfu": mfu,
            "samples_per_family": totals["families"],
            "per_family": {f: {k: sum(v) / len(v) for k, v in parts.items()} for f, parts in sorted(totals["per_family"].items())},
        }

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        """EMA of the parameters this stage trains; frozen ones cannot change, their EMA was set on entering it."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                self.ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @torch.no_grad()
    def _sync_frozen_ema(self) -> None:
        """A stage's frozen parameters keep their current weights as their EMA (once per stage, not per step)."""
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                self.ema[name].copy_(p.detach().float())

    # ---- checkpoints: written and read by .checkpointing; the loop adds its own state -----------
    def _save_checkpoint(self) -> Path:
        meta = {"stage_index": self._stage_index, "stream": self.stream.state_dict(), "plan": self.plan.name,
                "stages": plan_signature(self.plan),
                "lora": None if self.lora is None else dataclasses.asdict(self.lora)}
        return checkpointing.save_checkpoint(self.run_dir, self.global_step, model=self.model, ema=self.ema,
                                             optimizer=self.optimizer, tokenizer=self.tokenizer, dist=self.dist, meta=meta)

    def _resume_from(self, path: Path) -> None:
        state = checkpointing.read_state(path, self.dist)
        self._check_same_plan(path, state)
        self.global_step = state["global_step"]
        stage_index, _ = self.plan.stage_at(self.global_step)
        # a checkpoint at a stage's last step resumes into a fresh next stage (entered by the loop,
        # with a new optimiser); one mid-stage restores the stage's data position and optimiser
        same_stage = stage_index == state["stage_index"]
        if same_stage:
            try:
                self._enter_stage(stage_index, state["stream"], None)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path / 'state.json'}: field 'stream' does not restore the data position "
                                      f"({type(e).__name__}: {e})") from None
        self.ema = checkpointing.load_checkpoint(path, model=self.model, ema=self.ema,
                                                 optimizer=self.optimizer if same_stage else None, dist=self.dist)

    def _check_same_plan(self, path: Path, state: dict) -> None:
        """Refuse to resume a run under another curriculum: the stage labels, data mixture and step
        counts would silently be those of the new plan.  Start a new run folder (or ``--init-from``
        an exported checkpoint) to train on with another plan."""
        differences = []
        if "plan" in state and state["plan"] != self.plan.name:
            differences.append(f"plan name {state['plan']!r} -> {self.plan.name!r}")
        recorded = state.get("stages")
        if recorded is not None and [list(s) for s in recorded] != plan_signature(self.plan):
            old = ", ".join(f"{n}:{k}" for n, k in recorded)
            new = ", ".join(f"{n}:{k}" for n, k in plan_signature(self.plan))
            differences.append(f"stages (name:steps) [{old}] -> [{new}]")
        lora = None if self.lora is None else dataclasses.asdict(self.lora)
        if "lora" in state and state["lora"] is not None and lora is not None:
            lora["targets"] = list(lora["targets"])
            saved = dict(state["lora"], targets=list(state["lora"].get("targets", [])))
            if saved != lora:
                differences.append(f"lora {saved} -> {lora}")
        elif "lora" in state and (state["lora"] is None) != (lora is None):
            differences.append(f"lora {state['lora']} -> {lora}")
        if differences:
            raise PlanError(f"{path / 'state.json'}: this run was trained with another plan; refusing to resume it "
                            f"({'; '.join(differences)}). Use a new --out folder, or --init-from an exported checkpoint")

    def _open_tensorboard(self, purge_step: int | None):
        if not (self._tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: pip install 'unimedvl[train]'
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    # ---- the run ----------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None, checkpoint_at_end: bool = True) -> TrainResult:
        """Train through the plan (or up to ``max_steps`` global steps); returns the last state.
        Stopping early at ``max_steps`` writes a checkpoint there unless ``checkpoint_at_end`` is off."""
        existed = self.metrics_path.exists()
        self.dist.barrier()  # every rank has looked before rank 0 writes anything
        if resume:
            if self.dist.is_main:
                checkpointing.remove_partial_checkpoints(self.run_dir)  # checkpoints the killed run did not finish
            self.dist.barrier()
            latest = checkpointing.latest_checkpoint(self.run_dir)
            if latest is not None:
                self._resume_from(latest)
            if existed and self.dist.is_main:  # drop rows of steps after the checkpoint: they are redone
                rows = [r for r in self.metrics_path.read_text().splitlines() if r and json.loads(r)["step"] <= self.global_step]
                write_text(self.metrics_path, "".join(r + "\n" for r in rows))
        elif existed:
            raise FileExistsError(f"{self.run_dir} already holds a run; pass resume=True (--resume) to continue it")
        last_ckpt = None
        writer = self._open_tensorboard(purge_step=self.global_step + 1 if resume else None)
        end = self.plan.total_steps if max_steps is None else min(max_steps, self.plan.total_steps)
        with open(self.metrics_path if self.dist.is_main else os.devnull, "a") as log:
            while self.global_step < end:
                stage_index, stage_step = self.plan.stage_at(self.global_step)
                if stage_index != self._stage_index:
                    self._enter_stage(stage_index)
                stage = self.plan.stages[stage_index]
                row = self._step(stage, stage_step)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if writer is not None:
                    _write_scalars(writer, row)
                if self.on_log and (row["stage_step"] % stage.log_every == 0 or row["stage_step"] == stage.steps):
                    self.on_log(row)
                if row["stage_step"] % stage.checkpoint_every == 0 or row["stage_step"] == stage.steps:
                    last_ckpt = self._save_checkpoint()
                if row["stage_step"] == stage.steps and self.dist.is_main:
                    log.flush()
                    plot_run(self.run_dir)
        if checkpoint_at_end and self.global_step and (last_ckpt is None or last_ckpt.name != checkpoint_name(self.global_step)):
            latest = checkpointing.latest_checkpoint(self.run_dir)
            if latest is None or latest.name != checkpoint_name(self.global_step):
                last_ckpt = self._save_checkpoint()
        if writer is not None:
            writer.close()
        if self.dist.is_main:
            plot_run(self.run_dir)
        return TrainResult(self.global_step, last_ckpt or checkpointing.latest_checkpoint(self.run_dir), self.metrics_path)


def _write_scalars(writer, row: dict) -> None:
    """One metrics row as TensorBoard scalars: ``train/*`` and ``family/<family>/{ce,mse}``."""
    step = row["step"]
    for key in ("loss", "ce", "mse", "lr", "grad_norm", "tokens_per_s", "tflops_per_s", "mfu"):
        if row.get(key) is not None:
            writer.add_scalar(f"train/{key}", row[key], step)
    for family, parts in row["per_family"].items():
        for key, value in parts.items():
            writer.add_scalar(f"family/{family}/{key}", value, step)
    writer.flush()
