"""Built-in tasks: sizes against SOURCES.md, labels, templates, stratified splits, stable ids, verbalizers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import unicodedata

import pytest

from shared.config import REPO_ROOT, get_settings
from shared.ml.encoding import bind, encode_prompt
from shared.ml.models import build_tiny_tokenizer
from shared.ml.tasks.base import SPLITS, Task, normalise
from shared.ml.tasks.builtin import BUILTIN_TASKS, CORE_TASKS, make_builtin_tasks
from shared.ml.tasks.registry import get_task, list_tasks, parse_task_list
from shared.ml.tasks.splits import carve_val, label_proportions, three_way

pytestmark = pytest.mark.skipif(
    not (get_settings().data_dir / "cb" / "train.jsonl").is_file(), reason="../shared/data is not available"
)

# Exact (train, val, test) sizes: pinned so a change in the split policy is noticed.
SIZES = {
    "cb": (225, 25, 56),
    "copa": (360, 40, 100),
    "rte": (2241, 249, 277),
    "wic": (4885, 543, 638),
    "wsc": (499, 55, 104),
    "boolq": (2616, 327, 327),
    "multirc": (24600, 2643, 4848),
    "sst2": (6920, 872, 1821),
    "mr": (8530, 1066, 1066),
    "subj": (8000, 1000, 1000),
    "cr": (3019, 378, 378),
    "mpqa": (8484, 1061, 1061),
    "sst5": (8544, 1101, 2210),
    "trec": (4907, 545, 500),
    "ag_news": (6080, 760, 760),
    "tweet_emotion": (3257, 374, 1421),
    "tweet_hate": (9000, 1000, 2970),
    "tweet_irony": (2862, 955, 784),
    "tweet_offensive": (11916, 1324, 860),
    "tweet_stance_abortion": (587, 66, 280),
    "tweet_stance_atheism": (461, 52, 220),
    "tweet_stance_climate": (355, 40, 169),
    "tweet_stance_feminist": (597, 67, 285),
    "tweet_stance_hillary": (620, 69, 295),
}

# What SOURCES.md counts: official train (carved into train+val) and official val (our test) ...
SUPERGLUE = {
    "cb": (250, 56),
    "copa": (400, 100),
    "wic": (5428, 638),
    "rte": (2490, 277),
    "wsc": (554, 104),
    "multirc": (27243, 4848),
    "trec": (5452, 500),
}
# ... single files carved 80/10/10 ...
SINGLE_FILE = {"mr": 10662, "subj": 10000, "cr": 3775, "mpqa": 10606, "boolq": 3270, "ag_news": 7600}
# ... and official three-way splits.
OFFICIAL = {
    "sst2": (6920, 872, 1821),
    "sst5": (8544, 1101, 2210),
    "tweet_emotion": (3257, 374, 1421),
    "tweet_hate": (9000, 1000, 2970),
    "tweet_irony": (2862, 955, 784),
    "tweet_offensive": (11916, 1324, 860),
    "tweet_stance_climate": (355, 40, 169),
}
CARVED_VAL = [*SUPERGLUE, *SINGLE_FILE]


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {task.name: task for task in list_tasks() if task.source == "builtin"}


def test_builtin_names(tasks: dict[str, Task]) -> None:
    assert BUILTIN_TASKS[: len(CORE_TASKS)] == CORE_TASKS
    assert set(CORE_TASKS) == {
        "cb",
        "copa",
        "rte",
        "wic",
        "wsc",
        "boolq",
        "multirc",
        "sst2",
        "mr",
        "subj",
        "cr",
        "mpqa",
    }
    assert tuple(tasks) == BUILTIN_TASKS
    assert set(SIZES) == set(BUILTIN_TASKS)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_sizes_pinned(tasks: dict[str, Task], name: str) -> None:
    sizes = tasks[name].sizes()
    assert (sizes["train"], sizes["val"], sizes["test"]) == SIZES[name]


def test_sizes_match_sources_md(tasks: dict[str, Task]) -> None:
    for name, (train, test) in SUPERGLUE.items():
        s = tasks[name].sizes()
        assert (s["train"] + s["val"], s["test"]) == (train, test), name
    for name, total in SINGLE_FILE.items():
        s = tasks[name].sizes()
        assert sum(s.values()) == total, name
        assert abs(s["val"] - total / 10) <= 2 and abs(s["test"] - total / 10) <= 2, (name, s)
    for name, expected in OFFICIAL.items():
        assert tuple(tasks[name].sizes().values()) == expected, name


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_labels_and_fields(tasks: dict[str, Task], name: str) -> None:
    task = tasks[name]
    assert task.template.rstrip().endswith("Answer:")
    assert task.label_names is not None and len(task.label_names) == len(task.choices)
    assert task.description
    for split in SPLITS:
        examples = task.split(split)
        assert examples, (name, split)
        assert all(0 <= ex.label < len(task.choices) for ex in examples)
        if task.truncate_field:
            assert all(isinstance(ex.fields[task.truncate_field], str) for ex in examples)
    assert {ex.label for ex in task.split("train")} == set(range(len(task.choices)))


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_templates_render(tasks: dict[str, Task], name: str) -> None:
    task = tasks[name]
    rng = random.Random(0)
    for split in SPLITS:
        examples = task.split(split)
        for ex in examples[:5] + rng.sample(examples, min(25, len(examples))):
            prompt = task.render(ex.fields)
            assert prompt.endswith("Answer:") and "{{" not in prompt and prompt == normalise(prompt)
            assert len(prompt) > len("Answer:") + 10


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_ids_unique_and_shaped(tasks: dict[str, Task], name: str) -> None:
    ids = [ex.id for split in SPLITS for ex in tasks[name].split(split)]
    assert len(ids) == len(set(ids))
    for split in SPLITS:
        assert all(ex.id.startswith(f"{name}/{split}/") for ex in tasks[name].split(split))


def _fingerprint(task: Task) -> str:
    rows = [(s, ex.id, ex.label, sorted(ex.fields.items())) for s in SPLITS for ex in task.split(s)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_ids_stable_across_loads_and_processes(tasks: dict[str, Task]) -> None:
    names = ["wsc", "boolq", "mpqa", "multirc", "cb"]  # grouped carves and a plain one
    fresh = {t.name: t for t in make_builtin_tasks() if t.name in names}
    expected = {n: _fingerprint(tasks[n]) for n in names}
    assert {n: _fingerprint(fresh[n]) for n in names} == expected
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); from test_tasks import _fingerprint; "
        "from shared.ml.tasks.registry import get_task; "
        f"print(json.dumps({{n: _fingerprint(get_task(n)) for n in {names!r}}}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("name", CARVED_VAL)
def test_carved_splits_are_stratified(tasks: dict[str, Task], name: str) -> None:
    task = tasks[name]
    train = label_proportions([ex.label for ex in task.split("train")])
    carved = ["val", "test"] if name in SINGLE_FILE else ["val"]
    tolerance = 0.02 if name == "multirc" else 0.01 + 1 / len(task.split("val"))  # multirc: whole passages
    for split in carved:
        props = label_proportions([ex.label for ex in task.split(split)])
        assert props.keys() == train.keys()
        assert max(abs(props[k] - train[k]) for k in train) <= tolerance, (name, split, props, train)


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("mpqa", "sentence"),
        ("cr", "sentence"),
        ("wsc", "text"),
        ("boolq", "passage"),
        ("multirc", "paragraph"),
        ("rte", "premise"),
    ],
)
def test_carves_keep_shared_context_in_one_split(tasks: dict[str, Task], name: str, field: str) -> None:
    task = tasks[name]
    seen = {s: {normalise(ex.fields[field]).lower() for ex in task.split(s)} for s in SPLITS}
    assert not seen["train"] & seen["val"]
    if name in SINGLE_FILE:
        assert not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_latin1_files(tasks: dict[str, Task]) -> None:
    for name in ("mr", "subj"):
        texts = [ex.fields["sentence"] for s in SPLITS for ex in tasks[name].split(s)]
        assert not any(unicodedata.category(c) == "Cc" for t in texts for c in t)  # no raw C1 bytes left
        assert any("…" in t for t in texts) and any("é" in t for t in texts)


def test_superglue_label_mapping(tasks: dict[str, Task]) -> None:
    cb = {ex.id: ex for ex in tasks["cb"].split("test")}
    first = json.loads((get_settings().data_dir / "cb" / "val.jsonl").open().readline())
    ex = cb["cb/test/0"]
    assert tasks["cb"].label_names[ex.label] == first["label"] and ex.fields["premise"] == first["premise"]
    assert tasks["cb"].choices == ["Yes", "No", "Maybe"] and tasks["cb"].label_names == [
        "entailment",
        "contradiction",
        "neutral",
    ]
    # MultiRC: label 0 (false answer) must read "No" (the reference had this inverted).
    multirc = {ex.id: ex for ex in tasks["multirc"].split("test")}
    assert tasks["multirc"].choices == ["No", "Yes"]
    assert multirc["multirc/test/0-0-0"].fields["answer"] == "No" and multirc["multirc/test/0-0-0"].label == 0
    assert (
        multirc["multirc/test/0-0-2"].fields["answer"].startswith("Less the mass")
        and multirc["multirc/test/0-0-2"].label == 1
    )
    wsc = tasks["wsc"].split("test")[0]
    assert {"text", "span1_text", "span2_text"} <= wsc.fields.keys()
    assert f'pronoun "{wsc.fields["span2_text"].lower()}" refer to {wsc.fields["span1_text"]}' in tasks["wsc"].render(
        wsc.fields
    )


def test_copa_prompt_uses_question(tasks: dict[str, Task]) -> None:
    copa = tasks["copa"]
    for ex in copa.split("test")[:20]:
        prompt = copa.render(ex.fields)
        cue = "What was the cause?" if ex.fields["question"] == "cause" else "What happened as a result?"
        assert cue in prompt and f"A: {ex.fields['choice1']} B: {ex.fields['choice2']}" in normalise(prompt)


def test_boolq_description_says_how_it_was_split(tasks: dict[str, Task]) -> None:
    assert "carved" in tasks["boolq"].description and "val" in tasks["boolq"].description
    assert "MR" in tasks["sst2"].description and "stsa" in tasks["sst2"].description


def test_verbalizers_bind_to_tiny_tokenizer(tasks: dict[str, Task]) -> None:
    tokenizer = build_tiny_tokenizer()
    for task in tasks.values():
        bound = bind(task, tokenizer)
        assert len(set(bound.choice_token_ids)) == len(task.choices), task.name
        if bound.letters is not None:  # first tokens collided: lettered options
            assert bound.letters == [chr(ord("A") + i) for i in range(len(task.choices))]
            assert "Options: A: " in bound.prompt(task.split("test")[0].fields)


def test_lettered_fallback_when_first_tokens_collide() -> None:
    tokenizer = build_tiny_tokenizer()
    task = Task(
        name="collide",
        template="{{ text }} Answer:",
        choices=["Yes, it is", "Yes and no"],
        loader=lambda: {s: [] for s in SPLITS},
    )
    first = [tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in task.choices]
    assert first[0] == first[1]
    bound = bind(task, tokenizer)
    assert bound.letters == ["A", "B"] and len(set(bound.choice_token_ids)) == 2
    assert bound.prompt({"text": "Nice."}) == "Nice. Options: A: Yes, it is B: Yes and no. Answer:"


def test_long_context_is_cut_from_the_left(tasks: dict[str, Task]) -> None:
    tokenizer = build_tiny_tokenizer()
    boolq = tasks["boolq"]
    bound = bind(boolq, tokenizer)
    longest = max(boolq.split("test"), key=lambda ex: len(ex.fields["passage"]))
    encoded = encode_prompt(bound, longest, tokenizer, max_length=96)
    assert len(encoded.input_ids) <= 96
    text = tokenizer.decode(encoded.input_ids, skip_special_tokens=True)
    assert text.endswith("Answer:") and normalise(longest.fields["question"]) in text


def test_registry_lookup_and_task_lists() -> None:
    assert get_task("cb") is get_task("cb")  # one Task per process: splits are loaded once
    with pytest.raises(ValueError, match="unknown task 'nope'.*cb, copa"):
        get_task("nope")
    assert parse_task_list(" cb,rte ,cb,,sst2") == ["cb", "rte", "sst2"]
    assert parse_task_list(["cb", "rte,cb"]) == ["cb", "rte"]
    assert parse_task_list("core") == list(CORE_TASKS)
    with pytest.raises(ValueError, match="unknown task.*'nope'"):
        parse_task_list("cb,nope")
    with pytest.raises(ValueError, match="no task names"):
        parse_task_list(" , ")
    described = get_task("cb").describe()
    assert described == {
        "name": "cb",
        "choices": ["Yes", "No", "Maybe"],
        "sizes": {"train": 225, "val": 25, "test": 56},
        "source": "builtin",
    }


def test_core_tasks_load_fast() -> None:
    start = time.perf_counter()
    fresh = [t for t in make_builtin_tasks() if t.name in CORE_TASKS]
    for task in fresh:
        task.sizes()
    assert time.perf_counter() - start < 15  # about 1.5 s on one idle core


def test_split_helpers() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val = carve_val(labels, 0.1)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert [labels[i] for i in val].count(0) == 5 and carve_val(labels, 0.1) == (train, val)
    tr, va, te = three_way(labels)
    assert (len(tr), len(va), len(te)) == (80, 10, 10) and sorted(tr + va + te) == list(range(100))
    tiny = [0, 0, 1, 1]  # too small to stratify: falls back to a plain seeded split
    parts = three_way(tiny)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3] and all(parts)
    groups = [f"g{i // 3}" for i in range(60)]  # 20 groups of 3 rows
    group_labels = [(i // 3) % 2 for i in range(60)]
    tr, va = carve_val(group_labels, 0.2, groups=groups)
    assert len(va) == 12 and not {groups[i] for i in tr} & {groups[i] for i in va}
    assert sorted(tr + va) == list(range(60))
