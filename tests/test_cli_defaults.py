"""Defaults live once, in the params models: every option of a command that runs a job's code defaults to the
value the same job gets over HTTP (the params model's default), or to nothing (the model then decides)."""

from __future__ import annotations

import json
from typing import Any

import typer
from typer.core import TyperOption

from services.cli.common import floats, groups_option
from services.cli.main import app
from services.cli.stage1 import seeds_option
from shared.ml.affinity.params import (
    AffinityParams,
    ApproxErrorParams,
    GroupingParams,
    ValidateAffinityParams,
    ValidateParams,
)
from shared.ml.eval_params import EvalParams
from shared.ml.study.params import StudyParams
from shared.ml.training.params import TrainingParams
from shared.ml.training.pipeline_params import PipelineParams

# command -> the params models its options fill, searched in order (the first holding a field wins)
MODELS: dict[str, list[type]] = {
    "affinity": [AffinityParams],
    "group": [GroupingParams],
    "approx-error": [ApproxErrorParams],
    "validate-estimates": [ValidateParams],
    "validate-affinity": [ValidateAffinityParams, AffinityParams],  # --dim/--init go to its Stage-1 section
    "train": [TrainingParams],
    "pipeline": [PipelineParams, TrainingParams, AffinityParams, GroupingParams],
    "eval": [EvalParams],
    "study": [StudyParams, TrainingParams],
}
# options named otherwise than their field (Stage 2's nested sections)
RENAMED = {
    "single": "baselines.single",
    "per_task": "baselines.per_task",
    "boost": "boosting.enabled",
    "boost_threshold": "boosting.error_threshold",
    "boost_rounds": "boosting.max_rounds",
    "eta": "boosting.eta",
    "boost_lr": "boosting.lr",
    "boost_epochs": "boosting.epochs",
    "boost_budget": "boosting.budget",
    "fit_weights": "ensemble.fit_weights",
    "weight_candidates": "ensemble.candidates",
    "name": "ensemble.name",
}
# options given as text that the command parses into the field's value
PARSE = {"scales": lambda text: floats(text, "--scales"), "seeds": seeds_option, "groups": groups_option}
# Commands with options named like params fields that are not a job's params, and why.
EXEMPT = {
    "demo": "its own small pipeline (demo_params), submitted with every knob explicit",
    "submit": "sends only the options given; the API applies the model's defaults",
    "inference": "the inference service's settings (InferenceSettings), not a job's params",
    "up": "the inference service's settings",
}
FIELD_NAMES = {
    "model",
    "quantization",
    "max_train",
    "max_val",
    "max_test",
    "epochs",
    "seed",
    "seeds",
    "lr",
    "batch_size",
    "max_length",
    "dim",
    "rank",
    "tasks",
    "groups",
}


def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _field(models: list[type], name: str) -> tuple[type, str, Any] | None:
    """(model, field path, default) of the first model that has the option's field."""
    for path in (RENAMED.get(name), name):
        if path is None:
            continue
        for model in models:
            owner, *rest = path.split(".")
            fields = model.model_fields
            if owner not in fields:
                continue
            info = fields[owner]
            if rest:
                nested = info.annotation
                info = nested.model_fields[rest[0]]
            if info.is_required():
                return None
            return model, path, info.get_default(call_default_factory=True)
    return None


def test_every_option_defaults_to_its_params_model_default() -> None:
    commands = _commands()
    compared: list[str] = []
    left_to_model: list[str] = []
    wrong: list[str] = []
    for command, models in MODELS.items():
        assert command in commands, command
        for param in commands[command].params:
            if not isinstance(param, TyperOption) or param.name in (None, "help", "as_json"):
                continue
            found = _field(models, param.name)
            if found is None:
                continue
            model, path, expected = found
            got = param.default
            label = f"{command} --{param.name.replace('_', '-')} ({model.__name__}.{path})"
            if got is None and expected is not None:
                left_to_model.append(label)  # not given: the command leaves the field out
                continue
            if isinstance(got, str) and param.name in PARSE:
                got = PARSE[param.name](got)
            if got != expected:
                wrong.append(f"{label}: CLI {got!r} vs model {expected!r}")
            compared.append(label)
    assert not wrong, "\n".join(wrong)
    assert len(compared) >= 100, compared  # the walk really saw the commands' options
    # what the issue found: approx-error ran 100/50 rows while the same job over HTTP ran 500/200
    approx = {p.name: p.default for p in commands["approx-error"].params}
    assert (
        (approx["max_train"], approx["max_val"])
        == (500, 200)
        == (ApproxErrorParams.model_fields["max_train"].default, ApproxErrorParams.model_fields["max_val"].default)
    )
    # the Stage-1 defaults chosen by the studies reach `chorus affinity` too
    affinity = {p.name: p.default for p in commands["affinity"].params}
    assert (affinity["mode"], affinity["metric"], affinity["max_train"]) == ("linear", "neg_loss", 150)
    assert all(label.startswith(("pipeline", "validate-affinity", "study")) for label in left_to_model), left_to_model


def test_options_left_to_the_model_are_really_left_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`chorus study` options default to nothing, so its --params file (else the model) decides: a value of the
    file is not replaced by a CLI default. --model names no model, so nothing would run if one were."""
    from typer.testing import CliRunner

    for bad, message in (({"seeds": [1, 1]}, "seeds"), ({"groups": 3}, "groups=3 is more than the 2 tasks")):
        params = tmp_path / "study.json"
        params.write_text(json.dumps({"tasks": ["cb", "rte"], **bad}))
        r = CliRunner().invoke(
            app,
            ["study", "--out", str(tmp_path / "out"), "--params", str(params), "--model", "no-such-model"],
            env={"COLUMNS": "250"},
        )
        assert r.exit_code == 2 and message in r.output, r.output  # the file's value reached the model
    help_text = " ".join(CliRunner().invoke(app, ["study", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "[default: 0,1,2]" in help_text and "[default: 500]" in help_text


def test_only_exempt_commands_have_job_like_options_outside_the_models() -> None:
    for name, command in _commands().items():
        if name in MODELS or name in EXEMPT:
            continue
        options = {p.name for p in command.params if isinstance(p, TyperOption)}
        assert not options & FIELD_NAMES, f"{name}: {sorted(options & FIELD_NAMES)} (add it to MODELS or EXEMPT)"
