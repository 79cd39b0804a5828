"""Export an ensemble as a self-contained folder that plain transformers + peft can serve.

`export_ensemble(source, out)` writes into `out` (atomically: a hidden sibling folder renamed into place)
    adapters/<member>/   the members' PEFT folders, copied, sha256 checked against the manifest
    ensemble.json        the manifest; member paths are adapters/<member> (fingerprint recomputed only
                         when a path had to change)
    inference.json       everything inference needs per task: template, fields, whitespace rule, BOS
                         rule, truncation, max_length, choices and their answer token ids, member weights
                         (the base term included) and the base model identity
    README.md            how to reproduce the served probabilities; its code is `SNIPPET`, the same
                         script the tests run against the chorus scorer
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from shared.errors import BadInput
from shared.ml.encoding import bind, bos_policy
from shared.ml.model_names import portable_name
from shared.ml.training.adapters import CONFIG_FILE, META_FILE, WEIGHTS_FILE, load_adapter_state
from shared.ml.training.ensemble import EnsembleManifest, load_manifest, write_manifest
from shared.storage import sha256_file

INFERENCE_FORMAT = "chorus.inference/v1"
MANIFEST_FILE = "ensemble.json"
INFERENCE_FILE = "inference.json"
README_FILE = "README.md"
WHITESPACE_RULE = "collapse every whitespace run (regex \\s+, newlines included) to one space, then strip both ends"
OPTIONS_RULE = (
    "when `options` is set (the choices' first tokens collided): cut a trailing 'Answer:' off the "
    "rendered prompt, right-strip it, and append ' Options: A: <choice 0> B: <choice 1> .... Answer:'"
)
TRUNCATION_RULE = (
    "tokenize the prompt without special tokens; budget = max_length - 1 if a BOS is prepended else max_length. "
    "While it is over budget (at most 4 rounds) and `truncate_field` is a string field: tokenize that field alone, "
    "drop its first (overflow + 1) tokens, decode the rest as the new field value and re-render. If still over "
    "budget, keep the last `budget` tokens. Then prepend the BOS id when `bos_token_id` is not null."
)
SCORE_RULE = (
    "z_k = the logits of `answer_token_ids` at the last prompt token with member k active (the base "
    "member: no adapter); ensemble logits = sum_k weights[k] * z_k over non-zero weights; "
    "probabilities = softmax over the choices"
)

# The one reproduction script: README.md shows it and the tests run it against the chorus scorer.
SNIPPET = '''\
"""Usage: python reproduce.py EXPORT_DIR ROWS_JSON [BASE_MODEL_PATH]  (ROWS_JSON: {task: [fields, ...]})."""
import contextlib, json, re, sys
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2 import StrictUndefined
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

folder, rows = sys.argv[1], json.load(open(sys.argv[2]))
spec = json.load(open(f"{folder}/inference.json"))
base = sys.argv[3] if len(sys.argv) > 3 else spec["base"]["hub_id"]
if base is None:
    sys.exit(f"base model {spec['base']['name']!r} is not on the hub: pass its local folder as BASE_MODEL_PATH")
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # chorus's compute dtype
quant = {}
if spec["base"]["bnb_config"]:  # chorus's NF4 base
    bnb = BitsAndBytesConfig(**spec["base"]["bnb_config"], bnb_4bit_compute_dtype=dtype)
    quant = {"quantization_config": bnb, "device_map": {"": device}}
model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **quant)
model = model if quant else model.to(device)
tok = AutoTokenizer.from_pretrained(base)
for name, member in spec["members"].items():
    if member["path"] is None:
        continue  # the base member: the model without adapter
    if isinstance(model, PeftModel):
        model.load_adapter(f"{folder}/{member['path']}", adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, f"{folder}/{member['path']}", adapter_name=name)
model.eval()
env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)


def render(task, fields):
    text = re.sub(r"\\s+", " ", env.from_string(task["template"]).render(fields)).strip()
    if task["options"]:
        head = text[: -len("Answer:")].rstrip() if text.endswith("Answer:") else text
        listed = " ".join(f"{o}: {c}" for o, c in zip(task["options"], task["choices"]))
        text = f"{head} Options: {listed}. Answer:"
    return tok(text, add_special_tokens=False).input_ids


def encode(task, fields):
    fields, field = dict(fields), task["truncate_field"]
    budget = spec["max_length"] - (spec["bos_token_id"] is not None)
    ids = render(task, fields)
    if len(ids) > budget and field and isinstance(fields.get(field), str):
        context = tok(fields[field], add_special_tokens=False).input_ids
        for _ in range(4):
            if len(ids) <= budget:
                break
            context = context[len(ids) - budget + 1:]
            fields[field] = tok.decode(context)
            ids = render(task, fields)
    ids = ids[-budget:] if len(ids) > budget else ids
    return ([spec["bos_token_id"]] if spec["bos_token_id"] is not None else []) + ids


@torch.no_grad()
def probabilities(task_name, fields):
    task = spec["tasks"][task_name]
    ids = torch.tensor([encode(task, fields)], device=device)
    total = 0.0
    for name, weight in task["weights"].items():
        if weight == 0:
            continue
        if spec["members"][name]["path"] is None:
            ctx = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
        else:
            model.set_adapter(name)
            ctx = contextlib.nullcontext()
        with ctx:
            z = model(input_ids=ids).logits[0, -1].float()[task["answer_token_ids"]]
        total = total + weight * z
    return torch.softmax(total, dim=-1).tolist()


print(json.dumps({t: [probabilities(t, fields) for fields in rows[t]] for t in rows}))
'''

README_TEMPLATE = """\
# {name} (chorus ensemble, exported)

Base model: `{hub_id}` (chorus name `{base_model}`, quantization `{quantization}`).
Tasks: {tasks}.

- `adapters/<member>/`: PEFT LoRA folders (`adapter_config.json`, `adapter_model.safetensors`).
- `ensemble.json`: the chorus manifest (members, sha256 of each adapter, per-task weights).
- `inference.json`: the full inference recipe per task (template, whitespace/BOS/truncation rules,
  answer token ids, member weights; a member with `path: null` is the base model without adapter).

For a row of task t: render the prompt, take the logits of the choices' answer tokens at the last
prompt token with each member active, sum them with the task's weights, softmax. The script below does
exactly that with transformers + peft only (`pip install torch transformers peft`); pass the base
model's local folder as the third argument when it is not on the Hugging Face hub.

```python
{snippet}```

    python reproduce.py . rows.json > probabilities.json
"""


class ExportError(BadInput):
    """An ensemble that cannot be exported (bad source, bad output folder, adapter integrity)."""


def find_manifest(source: Path | str) -> Path:
    """The ensemble.json named by `source`: the file itself, or a run folder holding one."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{str(source)!r} is neither an ensemble.json nor a folder containing one")
    return path


def _task_spec(manifest: EnsembleManifest, task_name: str, tokenizer: Any) -> dict[str, Any]:
    from shared.ml.tasks.registry import get_task
    from shared.ml.tasks.templates import template_variables

    task = get_task(task_name)
    bound = bind(task, tokenizer)
    weights = manifest.task_weights(task_name)
    return {
        "template": task.template,
        "fields": list(template_variables(task.template)),
        "choices": list(task.choices),
        "label_names": list(task.label_names or task.choices),
        "options": bound.letters,
        "answer_token_ids": list(bound.choice_token_ids),
        "truncate_field": task.truncate_field,
        "weights": {m.name: float(weights.get(m.name, 0.0)) for m in manifest.members},
        "active_members": manifest.active_members(task_name),
    }


def _bnb_config(quantization: str) -> dict[str, Any] | None:
    """The BitsAndBytesConfig keyword arguments chorus loads the base with (None: unquantised)."""
    if quantization == "none":
        return None
    if quantization == "nf4":
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_storage": "uint8",
        }  # compute dtype: `compute_dtype` below
    raise ExportError(f"unknown quantization {quantization!r} in the ensemble's base identity")


def _hub_id(base_model: str) -> str | None:
    """The Hugging Face hub id of a registered base model; None for tiny test models and local folders."""
    portable = portable_name(base_model)
    return portable if "/" in portable else None


def inference_spec(manifest: EnsembleManifest, tokenizer: Any) -> dict[str, Any]:
    """inference.json: a full description of how chorus serves `manifest` (tokenizer: the base's)."""
    base = manifest.base
    return {
        "format": INFERENCE_FORMAT,
        "ensemble": {"name": manifest.name, "version": manifest.version, "fingerprint": manifest.fingerprint},
        "base": {
            "name": base.base_model,
            "hub_id": _hub_id(base.base_model),
            "revision": base.base_revision,
            "quantization": base.quantization,
            "bnb_config": _bnb_config(base.quantization),
            "compute_dtype": "bfloat16 on GPU, float32 on CPU",
        },
        "max_length": manifest.max_length,
        "bos_token_id": bos_policy(tokenizer),
        "special_tokens": "never added by the tokenizer call; only the BOS above is prepended",
        "whitespace": WHITESPACE_RULE,
        "template_engine": "Jinja2 (sandboxed, StrictUndefined, autoescape off) rendered with the row's fields",
        "options": OPTIONS_RULE,
        "truncation": {"side": "left", "rule": TRUNCATION_RULE},
        "answer_tokens": "first token of ' ' + choice (or of ' ' + option letter when `options` is set), "
        "tokenized without special tokens",
        "score": SCORE_RULE,
        "members": {m.name: {"path": m.path, "sha256": m.sha256, "role": m.role} for m in manifest.members},
        "tasks": {t: _task_spec(manifest, t, tokenizer) for t in manifest.tasks},
    }


def readme(manifest: EnsembleManifest, spec: dict[str, Any]) -> str:
    return README_TEMPLATE.format(
        name=manifest.name,
        hub_id=spec["base"]["hub_id"] or "not on the hub",
        base_model=manifest.base.base_model,
        quantization=manifest.base.quantization,
        tasks=", ".join(sorted(manifest.tasks)),
        snippet=SNIPPET,
    )


def _base_tokenizer(manifest: EnsembleManifest) -> Any:
    """The tokenizer of the ensemble's base model; refuses a local model whose weights changed."""
    from transformers import AutoTokenizer

    from shared.ml.models import quiet_libraries, resolve_model

    try:
        folder, canonical, revision = resolve_model(manifest.base.base_model)
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(f"base model {manifest.base.base_model!r} of the ensemble is not available: {exc}") from exc
    if revision != manifest.base.base_revision:
        raise ExportError(
            f"base model {canonical!r} has revision {revision[:16]}..., the ensemble was trained on "
            f"{manifest.base.base_revision[:16]}..."
        )
    quiet_libraries()
    return AutoTokenizer.from_pretrained(folder)


def _copy_adapter(src: Path, dst: Path, name: str, sha256: str) -> None:
    try:
        load_adapter_state(src, None, sha256)  # files present, no pickles, weights match meta and manifest
    except ValueError as exc:
        raise ExportError(f"member {name!r}: {exc}") from exc
    dst.mkdir(parents=True)
    for fname in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        shutil.copy2(src / fname, dst / fname)
    if sha256_file(dst / WEIGHTS_FILE) != sha256:
        raise ExportError(f"member {name!r}: the copied {WEIGHTS_FILE} does not match sha256 {sha256[:16]}...")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {str(out)!r} exists and is not an empty folder")


def export_ensemble(source: Path | str, out: Path | str) -> dict[str, Any]:
    """Write the self-contained export of the ensemble at `source` into `out`; returns a summary.

    Nothing is left in `out` on error (the folder is built next to it and renamed into place)."""
    manifest_path = find_manifest(source)
    out = Path(out).expanduser().resolve()
    _check_out(out)
    manifest = load_manifest(manifest_path)
    tokenizer = _base_tokenizer(manifest)
    spec_check = inference_spec(manifest, tokenizer)  # unknown task / bad quantization fail before any copy
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        members = []
        for m in manifest.members:
            if m.path is None:
                members.append(m)
                continue
            assert m.sha256 is not None
            rel = f"adapters/{m.name}"
            _copy_adapter(manifest_path.parent / m.path, tmp / rel, m.name, m.sha256)
            members.append(m.model_copy(update={"path": rel}))
        exported = manifest.model_copy(update={"members": members})
        if exported.content() == manifest.content():
            shutil.copy2(manifest_path, tmp / MANIFEST_FILE)  # unchanged content keeps its fingerprint
        else:
            exported = write_manifest(exported.model_copy(update={"fingerprint": None}), tmp / MANIFEST_FILE)
        spec = {
            **spec_check,
            "ensemble": {**spec_check["ensemble"], "fingerprint": exported.fingerprint},
            "members": {m.name: {"path": m.path, "sha256": m.sha256, "role": m.role} for m in exported.members},
        }
        (tmp / INFERENCE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / README_FILE).write_text(readme(exported, spec))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "name": exported.name,
        "fingerprint": exported.fingerprint,
        "members": [m.name for m in exported.members],
        "tasks": sorted(exported.tasks),
        "base": spec["base"]["hub_id"],
    }
