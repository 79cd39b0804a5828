"""Job params as the API accepts them: validated with the job type's own pydantic model, after closing
the doors the library leaves open for local CLI users (server paths, other owners' datasets).

* `model` must be a registered model name (shared/ml/model_names.py), or the absolute path of a folder
  inside a directory the operator allowed (CHORUS_ALLOWED_MODEL_DIRS): any other path would let a caller
  load a folder of the server, and unbounded tiny-llama seeds would each build and cache a model.
* `training.groups` is required (the job would only fail in the worker without it).
* `grouping.affinity` is an artifact id (`art-...`) of the caller, or an inline affinity object that is
  stored as the caller's artifact; a file path is refused. The worker materialises the artifact.
* `training.groups` may be an artifact id of a groups.json (inlined here as task lists); never a path.
* Task names of another owner's uploaded datasets are reported exactly like unknown tasks.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.deps import Principal, owned
from services.api.errors import ApiError, pydantic_error
from services.api.params_schema import SET_BY_THE_JOB, section_models
from shared.db.models import Artifact, Dataset
from shared.errors import InvalidParams
from shared.jobs.registry import JobType, JobTypeUnavailable
from shared.ml.model_names import ModelNameError, check_api_model
from shared.storage import ArtifactStore, record_artifact

ARTIFACT_ID = re.compile(r"^art-[0-9a-f]{24}$")
MAX_INLINE_BYTES = 8 << 20


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(InvalidParams.http_status, InvalidParams.code, f"{param}: {message}", param)


def _check_model(value: Any, param: str, allowed_dirs: Sequence[Path]) -> None:
    if isinstance(value, str):
        try:
            check_api_model(value, allowed_dirs)
        except ModelNameError as exc:
            raise _invalid(
                f"{exc} (server paths are not accepted outside the allowed model directories)", param
            ) from exc


def owned_artifact(db: Session, art_id: str, principal: Principal, param: str) -> Artifact:
    art = db.get(Artifact, art_id) if ARTIFACT_ID.fullmatch(art_id) else None
    if art is None or not owned(principal, art.owner):
        raise _invalid(
            f"no artifact {art_id!r} (give the id of one of your artifacts; server paths are not accepted)", param
        )
    if art.kind != "file":
        raise _invalid(f"artifact {art_id!r} is a folder, expected a JSON file", param)
    return art


def _store_inline(db: Session, value: dict[str, Any], name: str, principal: Principal, param: str) -> str:
    data = json.dumps(value, sort_keys=True).encode()
    stored = ArtifactStore().put_bytes(data)
    art = record_artifact(db, stored, owner=principal.owner, name=name, meta={"source": "inline", "param": param})
    return art.id


INLINE_PLACEHOLDER = "art-" + "0" * 24


def prepare(
    db: Session,
    job_type: JobType,
    params: dict[str, Any],
    principal: Principal,
    inline: dict[str, Any],
    allowed_model_dirs: Sequence[Path] = (),
) -> dict[str, Any]:
    """A copy of `params` with references resolved and unsafe values refused (raises ApiError).
    Inline objects to store once validation passed are put in `inline` (param name -> object)."""
    params = dict(params)
    _check_model(params.get("model"), "params.model", allowed_model_dirs)
    for section in ("affinity", "grouping", "training"):
        sub = params.get(section)
        if isinstance(sub, dict):
            _check_model(sub.get("model"), f"params.{section}.model", allowed_model_dirs)
    if job_type.name == "grouping":
        ref = params.get("affinity")
        if isinstance(ref, dict):
            if len(json.dumps(ref)) > MAX_INLINE_BYTES:
                raise _invalid(f"inline object is over {MAX_INLINE_BYTES:,} bytes", "params.affinity")
            inline["affinity"] = ref
            params["affinity"] = INLINE_PLACEHOLDER
        elif isinstance(ref, str):
            owned_artifact(db, ref, principal, "params.affinity")
        elif ref is not None:
            raise _invalid(
                "give an artifact id (art-...) of an affinity.json or the affinity object itself", "params.affinity"
            )
        if ref is None:
            raise _invalid(
                "required: an artifact id (art-...) of an affinity.json, e.g. from an affinity job", "params.affinity"
            )
    if job_type.name == "pipeline":
        grouping = params.get("grouping")
        if isinstance(grouping, dict) and "affinity" in grouping:
            raise _invalid("is produced by the pipeline's affinity stage and cannot be set", "params.grouping.affinity")
    if job_type.name == "training" and params.get("groups") is None:
        raise _invalid(
            'required: the groups to train, as lists of task names ([["cb", "rte"], ["sst2"]]) '
            "or an artifact id (art-...) of a groups.json, e.g. from a grouping job",
            "params.groups",
        )
    if job_type.name == "training" and isinstance(params.get("groups"), str):
        ref = params["groups"]
        art = owned_artifact(db, ref, principal, "params.groups")
        try:
            data = json.loads(ArtifactStore().resolve(art.path).read_text())
        except (OSError, ValueError) as exc:
            raise _invalid(f"artifact {ref!r} is not valid JSON: {exc}", "params.groups") from exc
        params["groups"] = data.get("groups") if isinstance(data, dict) else data
        params.setdefault("groups_source", ref)
    return params


def task_names(model: BaseModel) -> list[str]:
    names: list[str] = []
    tasks = getattr(model, "tasks", None)
    if isinstance(tasks, list):
        names.extend(t for t in tasks if isinstance(t, str))
    groups = getattr(model, "groups", None)
    if isinstance(groups, list):
        names.extend(t for g in groups if isinstance(g, list) for t in g if isinstance(t, str))
    return names


def validate(
    db: Session,
    job_type: JobType,
    params: dict[str, Any],
    principal: Principal,
    allowed_model_dirs: Sequence[Path] = (),
) -> dict[str, Any]:
    """The params to store: the job type's model, validated and dumped with every default filled in.
    `allowed_model_dirs`: where model folders may be (CHORUS_ALLOWED_MODEL_DIRS; empty: registered names only)."""
    try:
        cls = job_type.params_class()
    except JobTypeUnavailable as exc:
        raise ApiError(
            501,
            "job_type_unavailable",
            f"job type {job_type.name!r} is not available in this deployment yet: {exc}",
            "type",
        ) from exc
    inline: dict[str, Any] = {}
    prepared = prepare(db, job_type, params, principal, inline, allowed_model_dirs)
    try:
        model = cls.model_validate(prepared)
    except ValidationError as exc:
        message, param = section_problem(cls, prepared) or _top_level_problem(cls, exc)
        raise ApiError(InvalidParams.http_status, InvalidParams.code, message, param) from exc
    except ValueError as exc:  # a validator outside pydantic's wrapping
        message, param = section_problem(cls, prepared) or (f"params: {exc}", "params")
        raise ApiError(InvalidParams.http_status, InvalidParams.code, message, param) from exc
    names = task_names(model)
    if names and not principal.is_admin:
        foreign = db.scalars(
            select(Dataset.task_name).where(Dataset.task_name.in_(names), Dataset.owner != principal.owner)
        ).all()
        if foreign:
            raise _invalid(f"unknown task(s) {', '.join(map(repr, sorted(foreign)))}", "params.tasks")
    out = model.model_dump(mode="json")
    for name, value in inline.items():  # stored only now that everything else is valid
        out[name] = _store_inline(db, value, f"{name}.json", principal, f"params.{name}")
    return out


# -- where a validation error is ------------------------------------------------------------------------
def _unknown_option(param: str, name: str, known: Sequence[str], model: str, hint: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = hint or (f" (did you mean {close[0]!r}?)" if close else "")
    return f"{param}: unknown option{hint}; {model} accepts {', '.join(sorted(known))}"


def _more(errors: list[Any]) -> str:
    return f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""


def _named_path(message: str, first: str | None = None) -> tuple[list[str], str] | None:
    """The field path a model-level message starts with, and what it says about it: the library's checks write
    "training.epochs: must be ...", "training.groups is set by ..." or "groups=5 is more than ..." (kept
    whole). `first`: the path must start with this name."""
    match = re.match(r"(\w+)((?:\.\w+)*)(:\s*|\s+|=|$)", message)
    if match is None or (first is not None and match.group(1) != first):
        return None
    path = [match.group(1), *match.group(2).split(".")[1:]]
    rest = message if match.group(3) == "=" else message[match.end() :]
    return path, rest or message


def _top_level_problem(cls: type[BaseModel], exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) of a validation error of the params model itself; an unknown field gets a hint, a
    model-level check that names its field is reported at that field."""
    errors = exc.errors()
    first: Mapping[str, Any] = {}
    if errors:
        first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "extra_forbidden" and len(loc) == 1:
        param = f"params.{loc[0]}"
        sections = [
            s
            for s, stage in section_models(cls).items()
            if loc[0] in stage.model_fields and loc[0] not in SET_BY_THE_JOB.get(s, ())
        ]
        hint = f" here (set it in {' or '.join(f'params.{s}.{loc[0]}' for s in sections)})" if sections else ""
        return _unknown_option(param, loc[0], list(cls.model_fields), cls.__name__, hint) + _more(errors), param
    if not loc and first.get("type") == "value_error":
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        named = _named_path(message)
        if named is not None and named[0][0] in cls.model_fields:
            param = "params." + ".".join(named[0])
            return f"{param}: {named[1]}{_more(errors)}", param
    return pydantic_error(exc, ("params",))


def _failure(cls: type[BaseModel], data: dict[str, Any]) -> Exception | None:
    try:
        cls.model_validate(data)
    except (ValidationError, ValueError) as exc:
        return exc
    return None


def _located(exc: Exception, section: str, given: dict[str, Any], stage: type[BaseModel]) -> tuple[str, str]:
    """(message, param) of an error of stage section `section` (whose dict was `given`), with its full path."""
    errors: list[Any] = exc.errors() if isinstance(exc, ValidationError) else []
    if errors:
        loc = [str(x) for x in errors[0]["loc"]]
        message = str(errors[0]["msg"]).removeprefix("Value error, ")
        kind = errors[0].get("type")
    else:
        loc, message, kind = [], str(exc), None
    known = [k for k in stage.model_fields if k not in SET_BY_THE_JOB.get(section, ())]
    unknown = [k for k in given if k not in stage.model_fields]
    if loc and loc[0] == section:  # the section's own value (not a dict)
        path = loc
    elif loc:
        path = [section, *loc]
        if kind == "extra_forbidden" and len(loc) == 1:
            param = f"params.{'.'.join(path)}"
            return _unknown_option(param, loc[0], known, stage.__name__) + _more(errors), param
    elif unknown:  # the library's "<section>: unknown option(s) [...]"
        param = f"params.{section}.{unknown[0]}"
        return _unknown_option(param, unknown[0], known, stage.__name__), param
    else:  # a model-level message: "<section>.<field>: what is wrong", "<field>=<value> ..." or other text
        named = _named_path(message, section) or _named_path(message)
        if named is not None and named[0][0] == section:
            path, message = named
        elif named is not None and named[0][0] in stage.model_fields:
            path, message = [section, *named[0]], named[1]
        else:
            path = [section]
    param = "params." + ".".join(path)
    return f"{param}: {message}{_more(errors)}", param


def section_problem(cls: type[BaseModel], params: dict[str, Any]) -> tuple[str, str] | None:
    """(message, param) naming the full path (`params.training.epochs`) when the params fail because of one
    stage section (`affinity`, `grouping`, `training`), whose errors the library reports without it; None when
    the shared fields alone fail, or only a combination of sections does."""
    stages = section_models(cls)
    sections = [s for s in stages if isinstance(params.get(s), dict) and params[s]]
    if not sections:
        return None
    base = {**params, **{s: {} for s in sections}}
    if _failure(cls, base) is not None:
        return None
    for section in sections:
        exc = _failure(cls, {**base, section: params[section]})
        if exc is not None:
            return _located(exc, section, params[section], stages[section])
    return None
