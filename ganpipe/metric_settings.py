"""The `eval.*` keys that tune individual metrics (uplift, coverage and density, lpips), with their
defaults in one place: `EvalConfig` inherits them, and `ganpipe.metrics.EvalContext` holds them,
so a metric called without a config (checkpoint scores, tests) gets the same defaults.

Kept apart from ganpipe.config so that config.py stays one readable file and from
ganpipe.metrics so that loading a config does not import torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MetricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    uplift_ratios: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0], min_length=1,
        description="uplift: synthetic rows per real training row, each mix scored (class-balanced synthetic rows)")
    uplift_repeats: int = Field(3, ge=1, le=100, description="uplift: repeats (seeds) of every training; the "
                                "uncertainty is the standard error over them (1: a binomial estimate)")
    uplift_holdout_fraction: float = Field(0.3, gt=0, lt=1, description="uplift: share of each class's real rows "
                                           "held out for scoring (seeded, stratified); no classifier trains on them")
    uplift_real_fraction: float = Field(1.0, gt=0, le=1, description="uplift: share of the remaining real rows "
                                        "each classifier trains on (per class), to simulate a smaller labelled set")
    uplift_real_per_class: int | None = Field(None, ge=1, description="uplift: real training rows per class "
                                              "instead of uplift_real_fraction (at most what each class has)")
    uplift_classifier: Literal["auto", "cnn", "logistic", "gboost"] = Field(
        "auto", description="uplift's downstream classifier. auto: cnn for images, gboost for vectors; "
                            "cnn (a small CNN trained with random-crop augmentation; images only), logistic "
                            "(scikit-learn, flattened pixels or standardised vectors), gboost (scikit-learn "
                            "HistGradientBoostingClassifier; vectors only)")
    uplift_flip: bool = Field(False, description="uplift's cnn: random horizontal flips too (off by default: "
                              "a mirrored digit or letter is another symbol, or none)")
    uplift_cnn_steps: int | None = Field(None, ge=1, description="uplift's cnn: optimiser steps per training, the "
                                         "same for every mix (default: from the largest mix's size)")
    prdc_k: int = Field(5, ge=1, description="coverage and density: the k of the k-nearest-neighbour balls")
    lpips_weights: str | None = Field(
        None, description="srgan: the lpips package's LPIPS weights (alex or vgg; torch.save(lpips.LPIPS(net='alex')"
                          ".state_dict(), 'lpips-alex.pth'), or .safetensors); never downloaded; unset: lpips is "
                          "reported unavailable")

    @field_validator("uplift_ratios")
    @classmethod
    def _positive_ratios(cls, ratios: list[float]) -> list[float]:
        if any(not r > 0 for r in ratios):
            raise ValueError("every uplift ratio must be a positive number of synthetic rows per real row")
        return sorted(set(ratios))
