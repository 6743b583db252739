"""The value types config keys are made of: seeds, names (which become folder and registry
names, so they are checked as path components), fractions, Adam betas, ADA's transform names and
the loss names. Apart from ganpipe.config so that modules needing one type (the augmentation, the
registry) do not import every section."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field


def _seed_range(value: int) -> int:
    if not 0 <= value < 2**31:
        raise ValueError("seed must be in [0, 2**31)")
    return value


Seed = Annotated[int, AfterValidator(_seed_range)]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = ("use letters, digits, '_', '.' and '-', starting with a letter or digit, without '..', "
             "at most 128 characters")


def check_name(value: str) -> str:
    """Names become folder names (runs/<train.run_name>, exports/<register.name>/) and registry
    names: one plain path component, never a path (no separator, no '..', no leading dot or '-',
    no control character), short enough for any filesystem."""
    if not NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"not a name: {NAME_RULE}")
    return value


Name = Annotated[str, AfterValidator(check_name)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
AdaTransform = Literal["xflip", "rotate90", "translate", "scale", "aniso", "brightness", "contrast", "saturation",
                       "cutout"]
LossName = Literal["minimax", "non_saturating", "hinge", "least_squares", "wgan_gp", "relativistic"]
