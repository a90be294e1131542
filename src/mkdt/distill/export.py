"""``mkdt export``: a distilled set as an image folder of PNGs and/or the ``images.pt``/``labels.pt``/``lr.pt``
layout, with a ``manifest.json`` saying what every file holds.

Layout of the export folder::

    train/synthetic/00000.png ...   one de-normalised uint8 PNG per image (ImageFolder layout: mkdt's
                                    ``imagefolder`` source and torchvision's ``ImageFolder`` read it)
    images.pt  labels.pt  lr.pt     normalised float images N x C x H x W, their regression targets N x D
                                    and the learned lr (0-d), for MTT-style evaluators such as DD-Ranking
    manifest.json                   normalisation, what the targets are, the lr, where the set came from

Why the class folder is ``synthetic``: an mkdt set carries teacher representations as targets, not class
labels, so every image goes to one class; tools that need a class layout get one. The ``.pt`` files
are written from plain tensors only, so ``torch.load(..., weights_only=True)`` reads them back;
``mkdt pretrain --set source=<export folder>`` pre-trains on them (see :func:`mkdt.formats.load_pt_set`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import atomic_path, atomic_write_bytes, file_sha256, save_json
from mkdt.distill.config import ExportConfig
from mkdt.distill.outputs import png_bytes, to_uint8
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import PT_MANIFEST, SyntheticSet, load_synthetic
from mkdt.layout import RunLayout

MANIFEST_FILE = PT_MANIFEST
MANIFEST_VERSION = 1
IMAGE_FOLDER = "train"  # the split folder of the ImageFolder layout
SYNTHETIC_CLASS = "synthetic"  # the one class folder of a set without class labels


def input_path(config: ExportConfig) -> Path:
    return Path(config.input) if config.input else RunLayout(config.out).distilled()


def _export(config: ExportConfig, run: StageRun) -> dict:
    source = input_path(config)
    if not source.is_file():
        raise MkdtError(f"{source}: distilled set not found; run `mkdt distill` first or set export.input to a "
                        f"synthetic-set file")
    synthetic = load_synthetic(source)
    files: dict[str, object] = {}
    if config.format in ("pt", "both"):
        files["pt"] = write_pt(run.folder, synthetic)
        for name in files["pt"]:
            run.output(name, name)
    if config.format in ("png", "both"):
        files["png"] = write_pngs(run.folder / IMAGE_FOLDER, synthetic)
    manifest = export_manifest(synthetic, source, run.rel(source), config.format)
    save_json(run.output("manifest", MANIFEST_FILE), manifest)
    return {"input": run.rel(source), "dest": str(run.folder), "images": len(synthetic), "lr": synthetic.lr,
            **files}


STAGE = Stage(
    "export", ExportConfig, _export,
    "export a distilled set to PNGs (ImageFolder layout) and/or images.pt/labels.pt/lr.pt, with a manifest",
    folder=lambda config, layout: Path(config.dest) if config.dest else layout.export_dir,
    inputs=lambda config, layout: {"input": input_path(config)}, input_fields=("input", "dest"),
)


def export_distilled(config: ExportConfig) -> StageResult:
    """Export the run's distilled set (or ``input``) to ``dest`` (default ``<out>/export``)."""
    return run_stage(STAGE, config)


def _torch_save(path: Path, tensor: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        torch.save(tensor.detach().cpu().contiguous().clone(), str(tmp))


def write_pt(dest: Path, synthetic: SyntheticSet) -> list[str]:
    """``images.pt`` (normalised float), ``labels.pt`` (targets), ``lr.pt`` (0-d, when the set has a learned lr)."""
    dest.mkdir(parents=True, exist_ok=True)
    _torch_save(dest / "images.pt", synthetic.images.float())
    _torch_save(dest / "labels.pt", synthetic.targets.float())
    written = ["images.pt", "labels.pt"]
    if synthetic.lr is not None:
        _torch_save(dest / "lr.pt", torch.tensor(float(synthetic.lr)))
        written.append("lr.pt")
    return written


def write_pngs(folder: Path, synthetic: SyntheticSet, class_name: str = SYNTHETIC_CLASS) -> int:
    """One ``NNNNN.png`` per image (de-normalised uint8) in ``folder/<class_name>/`` (ImageFolder layout)."""
    folder = folder / class_name
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(synthetic.images, synthetic.mean, synthetic.std)
    digits = max(5, len(str(len(pixels) - 1)))
    for i, image in enumerate(pixels):
        atomic_write_bytes(folder / f"{i:0{digits}d}.png", png_bytes(image))
    return len(pixels)


def export_manifest(synthetic: SyntheticSet, source: Path, source_name: str, fmt: str) -> dict[str, Any]:
    """What the export holds: normalisation, the targets' meaning and size, the lr, the source set."""
    n, c, h, w = synthetic.images.shape
    meta = synthetic.meta
    manifest: dict[str, Any] = {
        "format": "mkdt-export", "version": MANIFEST_VERSION, "count": n, "image_shape": [c, h, w],
        "normalisation": {
            "mean": list(synthetic.mean), "std": list(synthetic.std),
            "images.pt": "normalised float32: (pixel in [0, 1] - mean) / std, per channel",
            "png": "de-normalised uint8: round(clamp(x * std + mean, 0, 1) * 255)",
        },
        "targets": {
            "file": "labels.pt", "shape": list(synthetic.targets.shape), "dim": int(synthetic.targets.shape[1]),
            "meaning": "regression targets learned from the teacher's representations (knowledge distillation), "
                       "not class labels; pre-train an encoder + linear head to them with MSE",
        },
        "lr": {"value": synthetic.lr, "file": "lr.pt" if synthetic.lr is not None else None,
               "meaning": "the learned inner SGD learning rate to pre-train with" if synthetic.lr is not None
               else "none stored (a real subset or a set without a learned lr)"},
        "source": {"file": source_name, "sha256": file_sha256(source), "data_name": meta.get("data_name"),
                   "fingerprint": meta.get("fingerprint"), "method": meta.get("method"),
                   "iterations": meta.get("iterations")},
        "files": {},
    }
    if fmt in ("pt", "both"):
        manifest["files"]["pt"] = ["images.pt", "labels.pt"] + (["lr.pt"] if synthetic.lr is not None else [])
    if fmt in ("png", "both"):
        manifest["files"]["png"] = f"{IMAGE_FOLDER}/{SYNTHETIC_CLASS}/*.png"
    return manifest
