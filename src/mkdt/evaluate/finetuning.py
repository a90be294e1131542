"""``mkdt finetune``: KRR-ST's evaluation — fine-tune the whole encoder with a new linear head.

Protocol (KRR-ST, Lee et al. 2024): SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine decay over
the iterations, random crop (padding 4) + horizontal flip, cross-entropy on a labelled fraction of the
downstream train split; test accuracy per seed. Downstream images are adapted and normalised exactly
as for the probe (encoder resolution/channels, the encoder's pre-training mean/std).

Long runs checkpoint (weights, momentum, data-order generator) every ``checkpoint_every``
iterations, so an interrupted run resumes where it stopped and ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.artifacts import TensorSpec, load_tensors, read_metadata, save_json, save_tensors
from mkdt.config import StageConfig, require, to_dict
from mkdt.data import DataConfig, ImageSet, labelled_split, load_dataset, normalize
from mkdt.distributed import DistContext, barrier, broadcast_object, gather_records, is_main_process, shard
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.evaluate.features import Encoder, adapt, load_encoder
from mkdt.evaluate.probing import (encoder_path, load_done, majority_fraction, percent_key, probe_name,
                                   remove_partial, save_partial, summarise, unique_labels)
from mkdt.layout import RESULTS_FILE
from mkdt.progress import Progress
from mkdt.runtime import derive_seed, generator, seeded


@dataclasses.dataclass
class FinetuneConfig(StageConfig):
    """Encoder file, downstream sets, labelled fractions and KRR-ST's fine-tuning schedule."""

    encoder: str | None = None  # None = <out>/pretrain/<name>/encoder.safetensors
    name: str | None = None
    downstream: list[DataConfig] = dataclasses.field(default_factory=lambda: [DataConfig(name="digits")])
    train_split: str = "train"
    test_split: str = "test"
    percents: list[float] = dataclasses.field(default_factory=lambda: [100.0])
    split_mode: str = "stratified"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    iterations: int = 10000
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4
    flip: bool = True
    checkpoint_every: int = 500
    eval_batch_size: int = 512
    collapse_threshold: float = 0.9  # flag a classifier predicting one class for this share of the test set

    def check(self) -> None:
        for key in ("iterations", "batch_size", "checkpoint_every", "eval_batch_size"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        require(self.lr > 0, "lr", "positive", self.lr)
        for key in ("momentum", "weight_decay", "crop_padding"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        require(self.split_mode in ("stratified", "uniform"), "split_mode", "stratified or uniform", self.split_mode)
        require(self.downstream, "downstream", "a non-empty list of data sets", self.downstream)
        require(self.seeds, "seeds", "a non-empty list", self.seeds)
        require(self.percents and all(0 < p <= 100 for p in self.percents), "percents",
                "a non-empty list of numbers in (0, 100]", self.percents)




# ----------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------
def crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding + random horizontal flip (uint8 or float batches).

    Random numbers come from ``gen`` on the CPU, so CPU and CUDA see the same crops.
    """
    n, _, h, w = x.shape
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------
# one fine-tuning run
# ----------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(x))


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / total))


def fresh_classifier(path: Path, num_classes: int, seed: int, device: torch.device) -> Classifier:
    encoder = load_encoder(path, device)
    with seeded(seed):
        model = Classifier(encoder.model, num_classes)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, step: int,
                    order: list[torch.Tensor], losses: list[float]) -> None:
    """Weights, momentum buffers, generator state and the rest of the current epoch's batch order."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["order"] = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf
    tensors["rng"] = gen.get_state()
    save_tensors(path, tensors, {"step": step, "losses": losses})


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    batch_size: int) -> tuple[int, list[torch.Tensor], list[float]]:
    tensors = load_tensors(path, {"rng": TensorSpec(dtype=torch.uint8), "order": TensorSpec(dtype=torch.int64)})
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"momentum.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(device)
    gen.set_state(tensors["rng"])
    # The remaining batches are full except possibly the last, so re-splitting restores them exactly.
    meta = read_metadata(path)
    return int(meta["step"]), list(tensors["order"].split(batch_size)), [float(v) for v in meta.get("losses", [])]


def train_classifier(cfg: FinetuneConfig, model: Classifier, images: torch.Tensor, labels: torch.Tensor,
                     mean: tuple[float, ...], std: tuple[float, ...], gen: torch.Generator, ckpt: Path,
                     desc: str) -> list[float]:
    """SGD + cosine on uint8 ``images``; resumes from ``ckpt`` if present; returns logged losses."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step, order, losses = load_checkpoint(ckpt, model, opt, gen, cfg.batch_size) if ckpt.is_file() else (0, [], [])
    model.train()
    with Progress(cfg.iterations, desc, initial=step, enabled=is_main_process()) as bar:
        while step < cfg.iterations:
            if not order:
                order = list(torch.randperm(len(images), generator=gen).split(cfg.batch_size))
            idx = order.pop(0)
            x = crop_flip(images[idx].to(device), cfg.crop_padding, cfg.flip, gen)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, step, cfg.iterations)
            loss = F.cross_entropy(model(normalize(x, mean, std)), labels[idx].to(device))
            if not torch.isfinite(loss):
                raise MkdtError(f"fine-tuning diverged at iteration {step} (loss {loss.item()}); lower lr "
                                f"(now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1, loss=float(loss.detach()))
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                losses.append(float(loss.detach()))
                if step < cfg.iterations:
                    save_checkpoint(ckpt, model, opt, gen, step, order, losses)
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
             std: tuple[float, ...], batch_size: int, num_classes: int) -> tuple[float, float]:
    model.eval()
    device = next(model.parameters()).device
    preds = [model(normalize(chunk.to(device), mean, std)).argmax(1).cpu() for chunk in images.split(batch_size)]
    pred = torch.cat(preds)
    return 100.0 * float((pred == labels).float().mean()), majority_fraction(pred, num_classes)


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def load_sets(cfg: FinetuneConfig, data_cfg: DataConfig, encoder: Encoder) -> tuple[ImageSet, ImageSet]:
    sets = []
    for split in (cfg.train_split, cfg.test_split):
        data = load_dataset(data_cfg, split=split)
        if data.labels is None:
            raise MkdtError(f"downstream {data_cfg.name} split '{split}' has no labels; fine-tuning needs labels")
        sets.append(adapt(data, encoder.in_channels, encoder.resolution))
    return sets[0], sets[1]


def finetune_one(cfg: FinetuneConfig, path: Path, encoder: Encoder, train: ImageSet, test: ImageSet, label: str,
                 percent: float, seed: int, device: torch.device, ckpt_dir: Path) -> dict[str, Any]:
    assert train.labels is not None and test.labels is not None
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    split_seed = derive_seed(cfg.seed, "labelled", cfg.split_mode, percent_key(percent), seed)
    idx = labelled_split(train.labels, percent, split_seed, mode=cfg.split_mode)
    model = fresh_classifier(path, num_classes, derive_seed(cfg.seed, "finetune-head", label, seed), device)
    gen = generator(derive_seed(cfg.seed, "finetune-order", label, percent_key(percent), seed))
    ckpt = ckpt_dir / f"{label.replace('#', '_')}_{percent_key(percent)}_{seed}.safetensors"
    losses = train_classifier(cfg, model, train.images[idx], train.labels[idx], encoder.mean, encoder.std, gen, ckpt,
                              desc=f"finetune {label} {percent_key(percent)}% seed {seed}")
    acc, share = accuracy(model, test.images, test.labels, encoder.mean, encoder.std, cfg.eval_batch_size, num_classes)
    ckpt.unlink(missing_ok=True)
    return {"downstream": label, "protocol": "finetune", "percent": float(percent), "seed": int(seed),
            "train_size": int(len(idx)), "accuracy": acc, "majority_fraction": share,
            "collapsed": share >= cfg.collapse_threshold, "diverged": False, "losses": losses}


def prepare_sets(cfg: FinetuneConfig, pending: list[str], encoder: Encoder, ctx: DistContext) -> None:
    """Under torchrun, rank 0 loads (and, with ``download``, fetches/caches) each pending set before the
    other ranks touch it, so no two processes write the same data files at once."""
    if not ctx.distributed:
        return
    if ctx.is_main:
        for label, data_cfg in zip(unique_labels(list(cfg.downstream)), cfg.downstream):
            if label in pending:
                load_sets(cfg, data_cfg, encoder)
    barrier(ctx)


def _finetune(config: FinetuneConfig, run: StageRun) -> dict[str, Any]:
    """Fine-tune the encoder on every downstream set / percent / seed; writes ``results.json``.

    Launched by torchrun, the (set, percent, seed) runs are shared round-robin between the ranks
    (each on its own device, each with its own checkpoint file) and gathered to rank 0, which alone
    writes the results.
    """
    ctx = run.dist
    path = encoder_path(config)
    encoder = load_encoder(path, ctx.device)
    ckpt_dir = run.path("checkpoints")
    done = broadcast_object(load_done(run) if ctx.is_main else None, ctx)
    labels = unique_labels(list(config.downstream))
    jobs = [(lab, p, s) for lab in labels for p in config.percents for s in config.seeds
            if f"{lab}|{percent_key(p)}|{s}" not in done]
    mine = shard(jobs, ctx)
    new: dict[str, dict] = {}
    prepare_sets(config, sorted({job[0] for job in jobs}), encoder, ctx)
    for label, data_cfg in zip(labels, config.downstream):
        todo = [job for job in mine if job[0] == label]
        if not todo:
            continue
        train, test = load_sets(config, data_cfg, encoder)
        for _, percent, seed in todo:
            new[f"{label}|{percent_key(percent)}|{seed}"] = finetune_one(config, path, encoder, train, test, label,
                                                                        percent, seed, ctx.device, ckpt_dir)
            save_partial(run, done, new)
    done.update(gather_records(new, ctx))
    if not ctx.is_main:
        return {}
    keys = [f"{lab}|{percent_key(p)}|{s}" for lab in labels for p in config.percents for s in config.seeds]
    runs = [done[k] for k in keys]
    results = {
        "name": run.folder.name, "encoder": run.rel(path), "encoder_digest": encoder.digest,
        "encoder_meta": encoder.meta,
        "downstream": {lab: to_dict(c) for lab, c in zip(labels, config.downstream)},
        "protocols": {"finetune": {"optimizer": f"SGD lr {config.lr} momentum {config.momentum} wd "
                                                f"{config.weight_decay}, cosine", "iterations": config.iterations,
                                   "batch_size": config.batch_size, "augmentation":
                                       f"random crop (padding {config.crop_padding}) + flip" if config.flip else
                                       f"random crop (padding {config.crop_padding})",
                                   "split": config.split_mode}},
        "percents": [float(p) for p in config.percents], "seeds": list(config.seeds), "std_ddof": 1,
        "runs": runs, "summary": summarise(runs), "identity": run.key, "jobs": {k: done[k] for k in keys},
    }
    save_json(run.output("results", RESULTS_FILE), results)
    remove_partial(run.folder)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {"name": run.folder.name, "results": run.rel(run.path(RESULTS_FILE)), "summary": results["summary"]}


STAGE = Stage(
    "finetune", FinetuneConfig, _finetune, "fine-tune an encoder on a downstream set",
    folder=lambda config, layout: layout.finetune_dir(probe_name(config, encoder_path(config))),
    inputs=lambda config, layout: {"encoder": encoder_path(config)}, input_fields=("encoder",),
    runtime=("checkpoint_every", "eval_batch_size"), units=("downstream", "percents", "seeds"),
    extends=lambda old, new: True, torchrun=True,
)


def finetune(config: FinetuneConfig) -> StageResult:
    """Fine-tune one encoder; ``<out>/finetune/<name>/results.json``."""
    return run_stage(STAGE, config)
