"""``mkdt export``: a distilled set as a PNG folder and/or the ``images.pt``/``labels.pt``/``lr.pt`` layout.

Why the .pt layout: MTT-style evaluators (e.g. DD-Ranking) read plain tensors saved with ``torch.save``:
normalised float images N x C x H x W, their labels (here the learned targets N x D) and the learned
lr as a 0-d tensor. They are written from plain tensors only, so ``torch.load(..., weights_only=True)``
reads them back. The PNG folder (one denormalised uint8 image per file) is for viewing and for tools
that take image folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mkdt.artifacts import atomic_path, atomic_write_bytes, save_json
from mkdt.distill.config import ExportConfig
from mkdt.distill.outputs import png_bytes, to_uint8
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.formats import SyntheticSet, load_synthetic
from mkdt.layout import RunLayout


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
        files["png"] = write_pngs(run.folder / "png", synthetic)
    return {"input": run.rel(source), "dest": str(run.folder), "images": len(synthetic), "lr": synthetic.lr,
            **files}


STAGE = Stage(
    "export", ExportConfig, _export, "export a distilled set to PNGs or the images.pt/labels.pt/lr.pt layout",
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
    save_json(dest / "meta.json", {"mean": list(synthetic.mean), "std": list(synthetic.std), "lr": synthetic.lr,
                                   "images": list(synthetic.images.shape), "targets": list(synthetic.targets.shape),
                                   "normalised": True, **{k: v for k, v in synthetic.meta.items()
                                                          if isinstance(v, (str, int, float))}})
    return written


def write_pngs(folder: Path, synthetic: SyntheticSet) -> int:
    """One ``NNNNN.png`` per image (denormalised uint8) and ``meta.json`` with the lr and normalisation."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(synthetic.images, synthetic.mean, synthetic.std)
    digits = max(5, len(str(len(pixels) - 1)))
    for i, image in enumerate(pixels):
        atomic_write_bytes(folder / f"{i:0{digits}d}.png", png_bytes(image))
    save_json(folder / "meta.json", {"mean": list(synthetic.mean), "std": list(synthetic.std), "lr": synthetic.lr,
                                     "count": len(pixels)})
    return len(pixels)
