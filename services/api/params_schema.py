"""The JSON schemas of the job types' params as the API publishes them (GET /v1/job-types, OpenAPI).

The ML library keeps the stage sections of its composite params (`affinity`, `grouping`, `training` of a
pipeline, study or affinity validation) as free dicts and builds the stage models from them when it
validates. Here those sections are typed for documentation with the stage models' own schemas, so every
knob shows its type, default and description; validation stays the library's (services/api/job_params.py).
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from shared.jobs.registry import JobType, JobTypeUnavailable, load_ref

# Section name -> the stage params model its fields belong to.
SECTION_MODELS = {
    "affinity": "shared.ml.affinity.params:AffinityParams",
    "grouping": "shared.ml.affinity.params:GroupingParams",
    "training": "shared.ml.training.params:TrainingParams",
}
# Stage fields the job sets itself (the library refuses or overwrites them in the section).
SET_BY_THE_JOB = {"training": frozenset({"groups", "groups_source"}), "grouping": frozenset({"affinity"})}
# Stage 1 takes the LoRA shape from the training section when it is set there.
LORA_SHAPE = ("rank", "alpha", "targets")
REF_PREFIX = "#/$defs/"


def section_models(cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The stage sections of a params model: {field name: stage params model} for its free-dict fields."""
    out: dict[str, type[BaseModel]] = {}
    for name, ref in SECTION_MODELS.items():
        field = cls.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is dict:
            out[name] = load_ref(ref)
    return out


def _shared_note(name: str, parent: type[BaseModel], section: str, sections: Iterable[str]) -> tuple[str, bool] | None:
    """How a stage field left unset in the section gets its value when not (only) from the stage's own default:
    (note, whether the stage's default still applies)."""
    fields = parent.model_fields
    if name in fields:
        return f"default: the job's top-level `{name}`", False
    if name == "seed" and "seeds" in fields:
        return "default: each seed of the job's `seeds`", False
    if section == "affinity" and name in LORA_SHAPE and "training" in sections:
        return f"default: `training.{name}` when set there, otherwise the default shown", True
    return None


def _section_schema(
    parent: type[BaseModel],
    section: str,
    stage: type[BaseModel],
    sections: Iterable[str],
    parent_prop: dict[str, Any],
    defs: dict[str, Any],
) -> dict[str, Any]:
    sub = stage.model_json_schema()
    for name, definition in sub.pop("$defs", {}).items():
        defs.setdefault(name, definition)
    props: dict[str, Any] = {}
    for name, prop in sub["properties"].items():
        if name in SET_BY_THE_JOB.get(section, ()):
            continue
        shared = _shared_note(name, parent, section, sections)
        if shared is not None:
            note, keeps_default = shared
            prop = dict(prop)
            if not keeps_default:
                prop.pop("default", None)
            prop["description"] = f"{prop['description']} ({note})" if prop.get("description") else note.capitalize()
        props[name] = prop
    excluded = sorted(SET_BY_THE_JOB.get(section, ()))
    description = parent_prop.get("description") or (
        f"{stage.__name__} fields for this job's {section} stage; a field left out takes the default shown "
        "(or the job's shared value where noted)"
    )
    if excluded:
        description += f". Set by the job itself, not here: {', '.join(excluded)}"
    return {
        "type": "object",
        "title": f"{parent.__name__}.{section}",
        "description": description,
        "properties": props,
        "additionalProperties": False,
        "default": {},
    }


def params_schema(cls: type[BaseModel]) -> dict[str, Any]:
    """`cls.model_json_schema()` with its stage sections typed (refs under `#/$defs/`)."""
    schema = cls.model_json_schema()
    defs: dict[str, Any] = dict(schema.pop("$defs", {}))
    sections = section_models(cls)
    for section, stage in sections.items():
        parent_prop = schema["properties"].get(section, {})
        schema["properties"][section] = _section_schema(cls, section, stage, sections, parent_prop, defs)
    if defs:
        schema["$defs"] = defs
    return schema


def _rewrite_refs(value: Any, prefix: str) -> Any:
    if isinstance(value, dict):
        return {
            k: (
                prefix + v[len(REF_PREFIX) :]
                if k == "$ref" and isinstance(v, str) and v.startswith(REF_PREFIX)
                else _rewrite_refs(v, prefix)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_refs(v, prefix) for v in value]
    return value


def openapi_components(job_types: Iterable[JobType]) -> tuple[dict[str, Any], dict[str, str]]:
    """(OpenAPI component schemas of every available job type's params and their definitions,
    {job type: component name})."""
    components: dict[str, Any] = {}
    names: dict[str, str] = {}
    for jt in job_types:
        try:
            cls = jt.params_class()
        except JobTypeUnavailable:
            continue
        schema = _rewrite_refs(params_schema(cls), "#/components/schemas/")
        for name, definition in schema.pop("$defs", {}).items():
            if components.setdefault(name, definition) != definition:
                raise ValueError(f"two different params definitions are both named {name!r}")
        components[cls.__name__] = schema
        names[jt.name] = cls.__name__
    return components, names


def document_job_params(app: Any, job_types: dict[str, JobType], body_model: str = "JobCreate") -> None:
    """Add every job type's params schema to the app's OpenAPI components and list them under
    `<body_model>.params` (as alternatives next to a plain object: the job type picks the model, and the
    API, not the schema, validates against it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components, names = openapi_components(job_types.values())
        target = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in components.items():
            if name in target and target[name] != definition:
                raise ValueError(f"OpenAPI component {name!r} already exists")
            target[name] = definition
        body = target.get(body_model)
        if body is not None and "params" in body.get("properties", {}):
            params = copy.deepcopy(body["properties"]["params"])
            refs = [{"$ref": f"#/components/schemas/{name}"} for name in dict.fromkeys(names.values())]
            listing = ", ".join(f"{jt}: {name}" for jt, name in names.items())
            params.pop("type", None)
            params.pop("additionalProperties", None)
            params["anyOf"] = [*refs, {"type": "object", "additionalProperties": True}]
            params["description"] = (
                f"{params.get('description', '')} The model of each job type: {listing} "
                "(GET /v1/job-types returns the same schemas)."
            ).strip()
            body["properties"]["params"] = params
        return schema

    app.openapi = openapi
