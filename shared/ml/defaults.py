"""Torch-free constants shared by the ML core and by params classes the API validates without torch."""

DEFAULT_MAX_LENGTH = 256
QUANTIZATIONS = ("none", "nf4")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")
