"""What the previews of a run cost, from the recipe's own settings (no torch: the studio's recipe form shows it).

A preview renders every prompt x seed in two sampled columns, the base and the adapter, each with
``preview.steps`` Stage C evaluations, doubled by classifier-free guidance (the sampler batches the conditional
and the unconditional half together whenever ``cfg != 1``, ``diffusion/sampler.py``). The base column never
changes during a run, so ``trainers/previews.py`` samples it at the first preview only and reuses it: later
previews sample the adapter column alone.

The cost is counted in Stage C sample evaluations (one latent through Stage C once) and set beside the training's
own: each training sample is one forward and one backward pass, about three forward passes (the backward pass
costs about twice the forward; Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1). The
published settings train and preview at the same latent size (768 px -> 24x24 for training, 1024 px -> 24x24 for
generation), so the counts compare like for like.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..diffusion.samplers import get_sampler

__all__ = ["PREVIEW_COLUMNS", "PREVIEW_SHARE_WARNING", "TRAINING_PASSES_PER_SAMPLE", "PreviewCost", "preview_cost"]

# The sampled columns of a preview grid, in order (a ControlNet's hint column is drawn, not sampled).
PREVIEW_COLUMNS = ("base", "adapter")
# Forward-pass equivalents of one training sample (forward + backward).
TRAINING_PASSES_PER_SAMPLE = 3
# Above this share of the training's own Stage C work the studio warns that previews slow the run noticeably.
PREVIEW_SHARE_WARNING = 0.25


@dataclass(frozen=True)
class PreviewCost:
    """Stage C sample evaluations of a run's previews (see the module docstring)."""

    prompts: int
    seeds: int
    steps: int
    guidance: int  # 2 when classifier-free guidance doubles every evaluation, else 1
    previews: int  # how many previews the run renders
    training: int  # the training's own work in the same unit (samples x TRAINING_PASSES_PER_SAMPLE)

    @property
    def per_column(self) -> int:
        """Evaluations of one sampled column of one preview (every prompt and seed)."""
        return self.prompts * self.seeds * self.steps * self.guidance

    @property
    def first_preview(self) -> int:
        """The first preview samples every column."""
        return self.per_column * len(PREVIEW_COLUMNS)

    @property
    def later_preview(self) -> int:
        """Later previews reuse the base column and sample the adapter column only."""
        return self.per_column * (len(PREVIEW_COLUMNS) - 1)

    @property
    def total(self) -> int:
        """Over the whole run."""
        return self.first_preview + (self.previews - 1) * self.later_preview if self.previews else 0

    @property
    def share(self) -> float:
        """Previews' work as a share of the training's."""
        return self.total / self.training if self.training else 0.0

    def describe(self) -> str:
        """One paragraph for the studio (Markdown)."""
        if not self.previews:
            return "Previews are off (`preview.every: 0`) or the run ends before the first one: they cost nothing."
        guided = " x 2 (guidance)" if self.guidance == 2 else ""
        return (f"Each preview samples {self.prompts} prompt(s) x {self.seeds} seed(s) x {self.steps} steps{guided} "
                f"= **{self.per_column:,}** Stage C evaluations per column: **{self.first_preview:,}** for the first "
                f"({len(PREVIEW_COLUMNS)} columns), **{self.later_preview:,}** for each later one (the base column is "
                f"sampled once per run and reused). {self.previews} preview(s) over the run: **{self.total:,}** "
                f"evaluations, about **{self.share:.0%}** of the training's own Stage C work "
                f"({self.training:,}: every training sample is about {TRAINING_PASSES_PER_SAMPLE} evaluations).")


def preview_cost(recipe: Any) -> PreviewCost:
    """The preview cost of a validated recipe (``config.Recipe``)."""
    preview, train = recipe.preview, recipe.train
    previews = train.max_steps // preview.every if preview.every else 0
    # the images of one optimizer step: train.global_batch when set, else one process's micro-batches
    samples = train.max_steps * (train.global_batch or train.grad_accum * train.batch_size)
    return PreviewCost(prompts=len(preview.prompts), seeds=len(preview.seeds), steps=preview.steps,
                       guidance=2 if get_sampler(preview.sampler).guided and preview.cfg != 1 else 1,
                       previews=previews,
                       training=samples * TRAINING_PASSES_PER_SAMPLE)
