"""Parameters of the Stage-1 jobs (affinity, grouping, approximation error, validation against fine-tuning).

Every knob and seed is a field so a job's params reproduce its artifacts. One `seed` drives everything
random in a run: the LoRA A initialisation, the per-task subsamples, the projection sketch and the subset
sampler (each derives its own stream from it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.ml.defaults import (
    DEFAULT_MAX_LENGTH,
    STAGE1_TRAIN_ROWS,
    GroupCount,
    LoraTargets,
    Seeds,
    TaskNames,
    known_tasks,
)
from shared.ml.training.params import (
    GROUPS_DOC,
    MAX_LENGTH_DOC,
    MODEL_DOC,
    QUANTIZATION_DOC,
    SEED_DOC,
    TrainingParams,
)

if TYPE_CHECKING:
    import torch

# Chosen by the lambda sweep on validation data (bench/affinity_smollm2.py; closing note of issue 3). The
# objective is a MEAN over rows plus lam_eff * ||w||^2 in the d-dim sketch space, with lam_eff = lam *
# mean_i ||g~_i||^2 by default (lam_scale="gradient"), so one default serves models whose gradient norms
# differ by orders of magnitude (tiny-llama ~20, SmolLM2-135M ~2e3).
DEFAULT_LAMBDA = 1e-3

# What validate-affinity compares estimated and true subset scores on.
ValidateAffinityMetric = Literal["neg_loss", "accuracy", "margin", "neg_vocab_loss"]


def effective_lambda(lam: float, lam_scale: str, grads: torch.Tensor) -> float:
    """The absolute penalty used by the solver for a run's training gradients G [N, d]."""
    if lam_scale == "absolute":
        return float(lam)
    scale = float((grads.double() ** 2).sum(1).mean()) if grads.numel() else 1.0
    return float(lam) * (scale if scale > 0 else 1.0)


class _ModelRun(BaseModel):
    """Fields shared by every Stage-1 job that runs the model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description=MODEL_DOC)
    quantization: Literal["none", "nf4"] = Field(default="none", description=QUANTIZATION_DOC)
    tasks: list[str] = Field(min_length=2, description="task names (built-in or imported)")
    seed: int = Field(default=0, ge=0, le=2**62, description=SEED_DOC + " and the projection sketch")
    max_train: int | None = Field(default=500, ge=1, description="training examples per task (stratified); None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    dim: int = Field(default=400, ge=1, le=65536, description="projection dimension d")
    rank: int = Field(default=4, ge=1, le=256, description="LoRA rank r of the adapter the gradients are taken of")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default 8 * rank)")
    targets: LoraTargets = Field(description="modules the LoRA adapter wraps (default q_proj, k_proj, v_proj)")
    # Default "choice": on the H200 validation run (issue 3 closing note) it cut the mean relative error of the
    # estimated accuracy from 41% (vocab) to 23%; "vocab" is the reference's full-vocabulary f.
    output: Literal["vocab", "choice"] = Field(
        default="choice",
        description="the differentiated f: log-odds of the gold answer token restricted to the task's answer choices "
        "(choice; softplus(-f) = cross-entropy over the choices), or under the full-vocabulary softmax (vocab)",
    )
    # Default "meta": on the H200 validation run (issue 3 closing note) the estimated accuracies were within 4.1%
    # of really fine-tuned ones from a meta-initialisation, against 24% from a fresh adapter (base).
    init: Literal["base", "meta"] = Field(
        default="meta",
        description="theta0: a fresh LoRA (A random, B = 0; the base model's outputs), or a meta-initialisation: the "
        "LoRA first fine-tuned on all the run's tasks for meta_epochs (the paper's setting; every subset's "
        "fine-tune then starts close to theta0, where the first-order model holds)",
    )
    meta_epochs: int = Field(default=1, ge=1, le=100, description="epochs of the all-task fine-tune of init='meta'")
    meta_lr: float = Field(
        default=1e-3, gt=0, le=1.0, description="learning rate of the all-task fine-tune of init='meta'"
    )
    meta_batch_size: int = Field(
        default=32, ge=1, le=1024, description="batch size of the all-task fine-tune of init='meta'"
    )
    lam: float = Field(
        default=DEFAULT_LAMBDA, gt=0, le=1e9, description="L2 penalty of the logistic regression (see lam_scale)"
    )
    lam_scale: Literal["gradient", "absolute"] = Field(
        default="gradient",
        description="gradient: the penalty is lam * mean_i ||g~_i||^2 (training rows of the run), which makes lam "
        "invariant to the scale of the model's gradients; absolute: the penalty is lam itself",
    )
    batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="rows per gradient-pass batch (default: 16 on a CPU, 512 on a GPU)"
    )
    batch_tokens: int | None = Field(
        default=None,
        ge=16,
        le=2**24,
        description="padded tokens per gradient-pass batch (default: none on a CPU; on a GPU what half the memory the "
        "weights leave free holds, estimated from the model's size)",
    )
    eval_batch_size: int | None = Field(
        default=None, ge=1, le=8192, description="rows per estimation forward (default: 64 on a CPU, 512 on a GPU)"
    )
    project_rows: int = Field(default=64, ge=1, le=65536, description="examples buffered per sketch projection")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192, description=MAX_LENGTH_DOC)
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the model runs (auto: cuda when available)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="model compute dtype: auto = bf16 on CUDA, fp32 on CPU (quantization none only for others)",
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        names = known_tasks(v)
        if len(names) < 2:
            raise ValueError(f"need at least 2 distinct tasks, got {names}")
        return names

    @model_validator(mode="after")
    def _precision(self) -> _ModelRun:
        if self.precision != "auto" and self.quantization != "none":
            raise ValueError(
                f"precision={self.precision!r} needs quantization 'none' (a 4-bit base computes in bf16); "
                "use precision 'auto' with nf4"
            )
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 8.0 * self.rank


class AffinityParams(_ModelRun):
    """Stage 1 (gradients at theta0 -> per-subset logistic regressions -> estimated performance -> T)."""

    subset_size: int | None = Field(
        default=None, ge=2, description="tasks per subset (default 3, or 0.3 n above 10 tasks)"
    )
    coverage: int = Field(default=5, ge=1, le=1000, description="every pair co-occurs in at least this many subsets")
    enumerate_limit: int = Field(default=120, ge=1, description="use every subset when C(n, s) is at most this")
    # Default "linear" and metric "neg_loss" on STAGE1_TRAIN_ROWS rows: the cheapest Stage 1 in the H200 search,
    # 0.18-0.20x of the single adapter's FLOPs; its figures against the controls are beside STAGE1_TRAIN_ROWS.
    max_train: int | None = Field(
        default=STAGE1_TRAIN_ROWS,
        ge=1,
        description="training examples per task for the meta fine-tune and the gradient pass "
        "(stratified); a pipeline uses min(its max_train, this default) unless set",
    )
    mode: Literal["forward", "linear"] = Field(
        default="linear",
        description="how a subset's solution is scored on validation rows: forward = a real forward "
        "pass with the back-mapped adapter; linear = the first-order f0 + g . w (one more "
        "gradient pass, over the validation rows)",
    )
    gradients: Literal["B", "AB"] = Field(
        default="B",
        description="the LoRA matrices differentiated at theta0: B only (all of the first-order change from a fresh "
        "adapter, whose A gradients are zero), or A and B (from a meta-initialised theta0, B0 != 0, the A "
        "directions also move f); AB needs mode 'linear'",
    )
    backmap: Literal["sketch", "representer"] = Field(
        default="sketch",
        description="Delta = P w (sketch), or sum_i c_i g_i with P^T Delta = w (representer; +1 gradient pass)",
    )
    metric: Literal["accuracy", "neg_loss", "macro_f1"] = Field(
        default="neg_loss",
        description="the estimated performance the affinity matrix holds: accuracy, neg_loss "
        "(minus the cross-entropy over the answer choices) or macro_f1",
    )
    solver_max_iter: int = Field(default=50, ge=1, le=1000, description="iterations of the logistic-regression solver")
    subsets_per_forward: int = Field(
        default=8, ge=1, le=512, description="subset adapters evaluated in one batched forward"
    )
    subsets: list[list[str]] | None = Field(
        default=None,
        description="explicit subsets (lists of task names) used instead of sampled ones; "
        "subset_size, coverage and enumerate_limit are then ignored",
    )

    @field_validator("subsets")
    @classmethod
    def _subset_names(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("subsets: give at least one subset (or leave it unset to sample them)")
        out = []
        for k, s in enumerate(v):
            names = known_tasks(s) if s else []
            if not names or len(set(names)) != len(names):
                raise ValueError(f"subsets: subset {k} ({s}) must be a non-empty list of distinct task names")
            out.append(names)
        return out

    @model_validator(mode="after")
    def _check(self) -> AffinityParams:
        n = len(self.tasks)
        if self.subset_size is not None and self.subset_size > n:
            raise ValueError(f"subset_size={self.subset_size} is more than the {n} tasks")
        if self.gradients == "AB" and self.mode != "linear":
            raise ValueError("gradients='AB' needs mode 'linear' (a forward pass applies only B deltas)")
        for k, s in enumerate(self.subsets or []):
            unknown = [t for t in s if t not in self.tasks]
            if unknown:
                raise ValueError(f"subsets: subset {k} names task(s) {unknown} that are not in tasks {self.tasks}")
        return self


class GroupingParams(BaseModel):
    """Clustering an affinity matrix into groups. `affinity` defaults to WORKDIR/affinity.json."""

    model_config = ConfigDict(extra="forbid")

    affinity: str | None = Field(default=None, description="path of an affinity.json (default: WORKDIR/affinity.json)")
    groups: GroupCount = Field(default="auto", description=GROUPS_DOC)
    method: Literal["auto", "sdp", "spectral"] = Field(
        default="auto",
        description="clustering: sdp (semidefinite relaxation), spectral, or auto (sdp up to "
        "sdp_max_n tasks, spectral above)",
    )
    metric: Literal["accuracy", "neg_loss", "macro_f1"] | None = Field(
        default=None, description="default: the file's metric"
    )
    centre: bool = Field(default=True, description="row-centre T before symmetrising (removes per-task level)")
    seed: int = Field(default=0, ge=0, description="seed of the clustering and of the structure test's permutations")
    sdp_max_n: int = Field(default=40, ge=2, le=500, description="above this many tasks use spectral clustering")
    m_max: int | None = Field(default=None, ge=2, description="largest m tried by groups=auto")
    structure_alpha: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="groups=auto: level of the permutation test for group structure in T; above it the "
        "pipeline falls back to the arm validation favours (single, per-task or groups)",
    )
    permutations: int = Field(default=999, ge=99, le=100_000, description="permutations of the structure test")
    tasks: list[str] | None = Field(default=None, description="if given, must match the affinity file's tasks")

    @model_validator(mode="after")
    def _check(self) -> GroupingParams:
        if self.tasks is not None and isinstance(self.groups, int) and self.groups > len(self.tasks):
            raise ValueError(f"groups={self.groups} is more than the {len(self.tasks)} tasks")
        return self


class ApproxErrorParams(_ModelRun):
    """First-order error: f0 + g . w (w rescaled to ||P w|| = scale * ||A0||) vs the true f at theta0 + P w.

    precision defaults to fp32: bf16 logits carry rounding noise of ~0.05 in f, which would be a floor
    under the very error this measures."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="fp32", description="model compute dtype (fp32: bf16 rounding would hide the error)"
    )
    # the reference's setting: directions around a fresh adapter, scale relative to ||A0||
    init: Literal["base", "meta"] = Field(
        default="base", description="theta0: base (a fresh adapter, the reference's setting) or meta"
    )

    scales: list[float] = Field(
        default_factory=lambda: [0.02, 0.05, 0.1],
        min_length=1,
        description="step sizes: ||P w|| as a fraction of ||A0||, each in (0, 10]",
    )
    directions: int = Field(default=4, ge=1, le=256, description="subset solutions used as directions")
    subset_size: int | None = Field(default=None, ge=1, description="tasks per direction's subset (1 = single tasks)")

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0 < s <= 10:
                raise ValueError(f"scale {s} must be in (0, 10]")
        return v


class ValidateParams(_ModelRun):
    """Estimate K subsets, really fine-tune a LoRA on each, compare on the validation splits."""

    subsets: int = Field(default=8, ge=1, le=1000, description="number of sampled subsets K")
    subset_size: int | None = Field(default=None, ge=1, description="1 = single-task fine-tunes")
    coverage: int = Field(default=5, ge=1, description="every pair of tasks co-occurs in at least this many subsets")
    lams: list[float] | None = Field(default=None, description="extra lambdas to report (estimation error per lambda)")
    outputs: list[Literal["vocab", "choice"]] | None = Field(
        default=None, description="extra differentiated outputs to report (one more gradient pass each; untimed)"
    )
    step_scales: list[float] | None = Field(
        default=None, description="extra multipliers of the solved step w to report (diagnoses a too short/long step)"
    )
    epochs: int = Field(default=5, ge=1, le=100, description="epochs of each real fine-tune")
    lr: float = Field(default=5e-4, gt=0, le=1.0, description="learning rate of each real fine-tune")
    train_batch_size: int = Field(default=8, ge=1, le=1024, description="batch size of each real fine-tune")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of each real fine-tune")
    select: Literal["best", "last"] = Field(
        default="best", description="which epoch is the true fine-tuned model (best = lowest mean val loss)"
    )
    backmap: Literal["sketch", "representer"] = Field(default="sketch", description="back-map of the timed estimate")
    compare_backmaps: bool = Field(default=True, description="also report the other back-map's errors (not timed)")

    @field_validator("lams", "step_scales")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError("every value must be > 0")
        return v


class ValidateAffinityParams(BaseModel):
    """Stage 1's affinity estimate against the truth it stands for: every subset really fine-tuned the way Stage 2
    trains group adapters, over several seeds; agreement of within-task orders, T matrices and groups.

    Shared knobs (model, quantization, tasks, max_train, max_val, max_length, device) are set once for both sides,
    so the estimate and the fine-tunes of one seed see the same rows. `affinity` holds any other AffinityParams
    field (e.g. {"dim": 64, "init": "base"}); `training` any other TrainingParams field (e.g. {"patience": 0});
    the LoRA shape (rank, alpha, targets) of `training` is shared with Stage 1, as in the pipeline.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description=MODEL_DOC)
    quantization: Literal["none", "nf4"] = Field(default="nf4", description=QUANTIZATION_DOC)
    tasks: TaskNames = Field(description="task names (built-in or imported)")
    seeds: Seeds = Field(
        default_factory=lambda: [0, 1], description="one Stage-1 run and one fine-tune per subset for each seed"
    )
    max_train: int | None = Field(default=500, ge=1, description="training examples per task (stratified); None = all")
    max_val: int | None = Field(default=1000, ge=1, description="validation examples per task; None = all")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192, description=MAX_LENGTH_DOC)
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the models run (auto: cuda when available)"
    )
    epochs: int = Field(default=3, ge=1, le=100, description="fine-tuning epochs (Stage 2's default)")
    lr: float = Field(default=5e-4, gt=0, le=1.0, description="fine-tuning learning rate")
    batch_size: int = Field(default=8, ge=1, le=1024, description="fine-tuning batch size")
    subset_size: int | None = Field(default=None, ge=2, description="tasks per subset (default: Stage 1's rule)")
    enumerate_limit: int = Field(default=20, ge=1, description="use every subset when C(n, s) is at most this")
    min_subsets: int = Field(default=40, ge=2, description="otherwise sample at least this many (pair-covering)")
    coverage: int = Field(
        default=5, ge=1, le=1000, description="pair coverage of the sampled subsets (raised until min_subsets)"
    )
    subset_seed: int = Field(
        default=0, ge=0, description="seed of the subset sampler (the same subsets for every seed)"
    )
    metric: ValidateAffinityMetric = Field(
        default="neg_loss",
        description="target: neg_loss = -cross-entropy over the task's answer choices; accuracy; margin = gold choice "
        "logit minus the best other one; neg_vocab_loss = -answer-token cross-entropy over the vocabulary",
    )
    groups: GroupCount = Field(default="auto", description="m for the ARI (auto: the silhouette choice on T_true)")
    noise_factor: float = Field(default=2.0, ge=0, description="pairwise order: true gap must exceed this x seed noise")
    bootstrap: int = Field(
        default=2000, ge=200, le=100_000, description="bootstrap resamples for the confidence intervals"
    )
    permutations: int = Field(default=999, ge=999, le=1_000_000, description="permutations of the Mantel test of T")
    random_partitions: int = Field(
        default=1000,
        ge=1000,
        le=1_000_000,
        description="random partitions the groups' agreement (ARI) is compared with",
    )
    stats_seed: int = Field(default=0, ge=0, description="seed of the bootstrap, permutations and random partitions")
    all_task_reference: bool = Field(
        default=True, description="also fine-tune one all-task adapter per seed (a reference)"
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Stage-1 settings (AffinityParams fields); max_train/max_val may be set lower than the top-level "
        "values to run Stage 1 on a subsample of the rows the fine-tunes see",
    )
    training: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="other Stage-1 estimators scored against the SAME fine-tunes: name -> AffinityParams fields applied "
        'on top of `affinity` (e.g. {"base": {"init": "base"}, "rows200": {"max_train": 200}}); '
        "adding variants to a finished validation reuses its fine-tunes",
    )

    @model_validator(mode="after")
    def _check(self) -> ValidateAffinityParams:
        n = len(self.tasks)
        if self.subset_size is not None and self.subset_size >= n:
            raise ValueError(f"subset_size={self.subset_size} must be less than the {n} tasks (subsets must differ)")
        if isinstance(self.groups, int) and self.groups > n:
            raise ValueError(f"groups={self.groups} is more than the {n} tasks")
        fixed = {"tasks", "seed", "subsets", "model", "quantization", "max_length", "device", "groups", "groups_source"}
        overrides = [("affinity", self.affinity), ("training", self.training)]
        overrides += [(f"variants.{name}", v) for name, v in self.variants.items()]
        for label, values in overrides:
            clash = sorted((fixed | ({"max_train", "max_val"} if label == "training" else set())) & set(values))
            if clash:
                raise ValueError(f"{label}.{clash[0]} is set by the validation itself; use the top-level field")
        for name in self.variants:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,39}", name) or name == "default":
                raise ValueError(f"variants: name {name!r} must be 1-40 of a-z, 0-9, _ (and not 'default')")
        for variant in [None, *self.variants]:
            label = "affinity" if variant is None else f"variants.{variant}"
            aff = self.affinity_params(self.seeds[0], [self.tasks[:2]], variant)
            if aff.mode == "forward" and aff.backmap != "sketch":
                raise ValueError(f"{label}: the validation re-reads forward-mode estimates with backmap 'sketch'")
            if aff.mode == "linear" and self.metric not in ("neg_loss", "accuracy"):
                raise ValueError(
                    f"{label}: mode 'linear' estimates only neg_loss and accuracy, not metric {self.metric!r}"
                )
            for key, top in (("max_train", self.max_train), ("max_val", self.max_val)):
                mine = getattr(aff, key)
                if top is not None and (mine is None or mine > top):
                    raise ValueError(
                        f"{label}.{key}={mine} must be at most the top-level {key}={top} "
                        "(Stage 1 may only see a subsample of the fine-tunes' rows)"
                    )
        self.training_params(self.seeds[0])
        return self

    def training_params(self, seed: int) -> TrainingParams:
        """The Stage-2 TrainingParams of one seed (no groups: the subsets are passed as adapter specs)."""
        data: dict[str, Any] = {
            "model": self.model,
            "quantization": self.quantization,
            "seed": seed,
            "max_train": self.max_train,
            "max_val": self.max_val,
            "max_length": self.max_length,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }
        data.update(self.training)
        return _validated(TrainingParams, data, "training")

    def affinity_params(self, seed: int, subsets: list[list[str]], variant: str | None = None) -> AffinityParams:
        """Stage 1 of one seed on the given subsets, with the training's LoRA shape (`variant`: one of `variants`)."""
        data: dict[str, Any] = {
            "model": self.model,
            "quantization": self.quantization,
            "tasks": list(self.tasks),
            "seed": seed,
            "max_train": stage1_rows(self.max_train),
            "max_val": self.max_val,
            "max_length": self.max_length,
            "device": self.device,
            "metric": "neg_loss",
            "subsets": subsets,
        }
        for key in ("rank", "alpha", "targets"):
            if key in self.training:
                data[key] = self.training[key]
        data.update(self.affinity)
        if variant is not None:
            data.update(self.variants[variant])
        return _validated(AffinityParams, data, "affinity" if variant is None else f"variants.{variant}")


def stage1_rows(max_train: int | None) -> int:
    """Stage 1's default training rows per task under a run's max_train (see STAGE1_TRAIN_ROWS)."""
    return STAGE1_TRAIN_ROWS if max_train is None else min(max_train, STAGE1_TRAIN_ROWS)


def _validated(cls: type[BaseModel], data: dict[str, Any], label: str) -> Any:
    """cls.model_validate(data); an unknown or bad option raises a ValueError naming `label`.option."""
    from pydantic import ValidationError

    unknown = sorted(set(data) - set(cls.model_fields))
    if unknown:
        raise ValueError(f"{label}: unknown option(s) {unknown}; {cls.__name__} accepts {sorted(cls.model_fields)}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        parts = [
            f"{label}.{'.'.join(str(x) for x in e['loc']) or 'input'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise ValueError("; ".join(parts)) from None
