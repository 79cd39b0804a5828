"""Torch-free constants and field types shared by the ML core and by params classes the API validates
without torch."""

import re
from typing import Annotated

from pydantic import AfterValidator, Field

DEFAULT_MAX_LENGTH = 256
QUANTIZATIONS = ("none", "nf4")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _module_names(v: list[str]) -> list[str]:
    for t in v:
        if not _MODULE_NAME.match(t):
            raise ValueError(f"LoRA target {t!r} is not a module name")
    return v


# The LoRA target modules of a params class (at least one; each a plain module name).
LoraTargets = Annotated[list[str], Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1),
                        AfterValidator(_module_names)]
