"""MTT-SSL's inner objective (the paper's naive baseline, Section 3): the SSL loss on the synthetic set.

The paper's negative result, implemented as faithfully as MKDT itself: the same outer loop, expert
sampling and normalised parameter-distance loss, but the experts were trained with the SSL loss
(:mod:`mkdt.experts.ssl_experts`) and every unrolled inner step is a plain SGD step on that same loss —
projector, Barlow Twins (or SimCLR) loss and augmentation read from the experts' metadata — between two
augmented views of the synthetic minibatch, through the functional student (backbone + projector in
one flat vector, the experts' layout). Learned targets play no part: they are not learned with this
objective (``learn_targets: true`` is refused) and the stored targets are the initial set's.

Views: the experts' :class:`mkdt.ssl.BatchAugment` (random resized crop, flip, colour jitter,
grayscale), which is differentiable in the pixels (``grid_sample`` and per-image linear colour maps;
the colour clamps to [0, 1] stop the gradient of out-of-range pixels only). It is used rather than the
KD path's flip/shift so that the inner steps optimise exactly the experts' objective. The views of a
step are drawn from a generator keyed by the run seed and the step's minibatch (the index order of a
fresh random permutation): a deterministic function of the plan, so no shared random stream is
consumed (KD runs and the torchrun draw order are untouched), a resumed run and a replayed step see
the same views, and every rank agrees.

Only the plain path: the memory-saving reverse pass implements the KD objective (``memory_saving: auto``
means the plain path for ssl; ``true`` is refused by the config).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch

from mkdt.artifacts import read_metadata
from mkdt.distill.experts import ExpertBank, check_objective, expert_files
from mkdt.errors import MkdtError
from mkdt.ssl.student import SSLStudent, SslExpertSettings, build_student, sample_views, two_view_loss
from mkdt.models import ModelConfig
from mkdt.models.functional import functional_forward
from mkdt.runtime import derive_seed, generator
from mkdt.ssl.augment import BatchAugment
from mkdt.ssl.objectives import build_loss


class SSLInnerStudent(SSLStudent):
    """The experts' SSL student (same parameters, same layout) with their loss and augmentation attached.

    It is the run's inner objective (:class:`mkdt.distill.matching.InnerObjective`): the unrolled steps
    descend :meth:`step_loss` instead of the KD MSE.
    """

    def __init__(self, student: SSLStudent, settings: SslExpertSettings, mean: Sequence[float],
                 std: Sequence[float], view_seed: int):
        super().__init__(student.backbone, student.projector)
        self.loss_fn = build_loss(settings.objective)  # no parameters: the layout stays the experts'
        self.augment = BatchAugment(settings.augment, mean, std)
        self.view_seed = int(view_seed)

    def views(self, step: Any, x: torch.Tensor) -> tuple[dict, dict]:
        """The two views' parameters of one inner step: keyed by the step's minibatch (see module doc)."""
        order = step.indices.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        key = hashlib.sha256(order).hexdigest()[:16]
        return sample_views(self.augment, x, generator(derive_seed(self.view_seed, "views", key)))

    def step_loss(self, problem: Any, theta: torch.Tensor, step: Any) -> torch.Tensor:
        """SSL loss at parameters ``theta`` of two views of the step's synthetic minibatch (differentiable
        in ``theta`` and the images)."""
        layout, images = problem.layout, problem.images
        x = images[step.indices.to(images.device)]
        if len(x) < 2:
            raise MkdtError(f"an inner minibatch of {len(x)} image cannot feed the SSL loss; change batch_syn")
        return two_view_loss(lambda v: functional_forward(self, layout, theta, v), self.loss_fn, self.augment, x,
                             self.views(step, x))


def read_settings(folder: Path) -> SslExpertSettings:
    """The SSL settings of the experts in ``folder`` (first file), refusing KD experts in one line."""
    first = expert_files(folder)[0]
    meta = read_metadata(first)
    check_objective(first, meta, "ssl")
    if not isinstance(meta.get("ssl"), dict):
        raise MkdtError(f"{first}: SSL expert without its 'ssl' settings metadata; retrain the experts")
    return SslExpertSettings.from_meta(meta["ssl"])


def build_inner_student(model: ModelConfig, folder: Path, in_channels: int, resolution: int,
                        mean: Sequence[float], std: Sequence[float], seed: int) -> SSLInnerStudent:
    """The functional student of an MTT-SSL run: the experts' architecture, loss and augmentation.

    Its own weights never matter (every step runs at an expert's or an unrolled theta).
    """
    settings = read_settings(folder)
    student = build_student(model, settings, in_channels, resolution, seed=derive_seed(seed, "distill", "student"))
    return SSLInnerStudent(student, settings, mean, std, derive_seed(seed, "distill", "ssl-views"))


def check_setup(bank: ExpertBank, images: int, batch_syn: int) -> None:
    """All experts share one SSL objective/augmentation (the inner loss is theirs), and no inner
    minibatch holds a single image (batch norm and the cross-correlation need two)."""
    first = bank.experts[0]
    for expert in bank.experts[1:]:
        if expert.meta.get("ssl") != first.meta.get("ssl"):
            raise MkdtError(f"{expert.path}: trained with other SSL settings than {first.path.name}; use experts "
                            f"of one `mkdt experts --set objective=ssl` run")
    sizes = {min(batch_syn, images)} | ({images % batch_syn} if images > batch_syn and images % batch_syn else set())
    if min(sizes) < 2:
        raise MkdtError(f"distill: with {images} synthetic images and batch_syn={batch_syn} an inner minibatch "
                        f"holds one image, which the SSL loss cannot use; change batch_syn")


__all__ = ["SSLInnerStudent", "build_inner_student", "check_setup", "read_settings"]
