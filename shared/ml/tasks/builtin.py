"""Built-in tasks over the staged files in `get_settings().data_dir` (see ../shared/data/SOURCES.md).

Data is read in place, never copied. Split policy (seed 0, sklearn):
* SuperGLUE: the official `val.jsonl` is our TEST split; val = stratified 10% of `train.jsonl`.
* single-file datasets (mr, subj, cr, mpqa, ag_news) and BoolQ (only its official val is staged):
  80/10/10 stratified carve.
* carves keep rows sharing a context together (MultiRC passage, WSC sentence, BoolQ passage, RTE premise,
  identical text in single-file datasets) so near-duplicates never straddle two splits.
Example ids are "<task>/<split>/<original idx or 0-based source line>" and never depend on the run.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import get_settings
from shared.ml.tasks.base import Example, Task, normalise
from shared.ml.tasks.splits import SEED, carve_val, three_way

Row = tuple[Any, dict[str, Any], int]  # (original id, template fields, label index)
Splits = dict[str, list[Example]]

# The 12 tasks of the issue; BUILTIN_TASKS (below) adds cheap extras.
CORE_TASKS: tuple[str, ...] = (
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
)

# cp1252 decodings of the C1 bytes 0x80-0x9f (undefined ones stay as read): the Latin-1 files use
# cp1252 punctuation (0x85 ellipsis, 0x91/0x92 quotes, 0x96/0x97 dashes).
_CP1252 = {b: bytes([b]).decode("cp1252", errors="ignore") for b in range(0x80, 0xA0)}
_C1_TABLE = {b: ch for b, ch in _CP1252.items() if ch}
_AG_ENTITY = re.compile(r"#(\d+);")


# ---------------------------------------------------------------------------------------------- readers


def _file(*parts: str) -> Path:
    path = get_settings().data_dir.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"built-in data file missing: {path} (set CHORUS_DATA_DIR to the shared/data folder)")
    return path


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Lines split on '\\n' only (iterating the file object; never str.splitlines, which splits at 0x85)."""
    with path.open(encoding=encoding, newline="\n") as fh:
        for line in fh:
            text = line[:-1] if line.endswith("\n") else line
            yield text.translate(_C1_TABLE) if encoding == "latin-1" else text


def _jsonl(*parts: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(_file(*parts)) if line.strip()]


def _labelled_lines(*parts: str, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """Kim-2014 style "<label> <sentence>" lines."""
    out = []
    for number, line in enumerate(_lines(_file(*parts), encoding), start=1):
        label, _, text = line.partition(" ")
        if not label.isdigit():
            raise ValueError(f"{'/'.join(parts)} line {number}: expected '<label> <text>', got {line[:60]!r}")
        out.append((int(label), text.strip()))
    return out


def _tweet_split(folder: str, split: str) -> list[Row]:
    texts = list(_lines(_file(folder, f"{split}_text.txt")))
    labels = [int(x) for x in _lines(_file(folder, f"{split}_labels.txt")) if x.strip()]
    if len(texts) != len(labels):
        raise ValueError(f"{folder}/{split}: {len(texts)} texts but {len(labels)} labels")
    return [(i, {"text": t.strip()}, y) for i, (t, y) in enumerate(zip(texts, labels, strict=True))]


# ---------------------------------------------------------------------------------------------- splitting


def _make(task: str, split: str, rows: Sequence[Row]) -> list[Example]:
    return [Example(f"{task}/{split}/{key}", fields, label) for key, fields, label in rows]


def _pick(rows: Sequence[Row], index: Sequence[int]) -> list[Row]:
    return [rows[i] for i in index]


def _val_from_train(
    task: str, train: Sequence[Row], test: Sequence[Row], group: Callable[[Row], Hashable] | None = None
) -> Splits:
    """Official test rows as given; val = stratified 10% of train (seed 0), grouped by `group`."""
    groups = [group(r) for r in train] if group else None
    tr, va = carve_val([r[2] for r in train], 0.1, SEED, groups)
    return {
        "train": _make(task, "train", _pick(train, tr)),
        "val": _make(task, "val", _pick(train, va)),
        "test": _make(task, "test", test),
    }


def _three_way(task: str, rows: Sequence[Row], group: Callable[[Row], Hashable] | None = None) -> Splits:
    """80/10/10 stratified carve (seed 0), grouped by `group`."""
    groups = [group(r) for r in rows] if group else None
    tr, va, te = three_way([r[2] for r in rows], (0.8, 0.1, 0.1), SEED, groups)
    return {
        "train": _make(task, "train", _pick(rows, tr)),
        "val": _make(task, "val", _pick(rows, va)),
        "test": _make(task, "test", _pick(rows, te)),
    }


def _official(task: str, train: Sequence[Row], val: Sequence[Row], test: Sequence[Row]) -> Splits:
    return {"train": _make(task, "train", train), "val": _make(task, "val", val), "test": _make(task, "test", test)}


def _same_text(field: str) -> Callable[[Row], Hashable]:
    return lambda row: normalise(str(row[1][field])).lower()


# ---------------------------------------------------------------------------------------------- loaders


def _superglue(
    task: str, folder: str, convert: Callable[[dict[str, Any]], Row], group: Callable[[Row], Hashable] | None = None
) -> Callable[[], Splits]:
    def load() -> Splits:
        train = [convert(r) for r in _jsonl(folder, "train.jsonl")]
        test = [convert(r) for r in _jsonl(folder, "val.jsonl")]
        return _val_from_train(task, train, test, group)

    return load


def _cb(r: dict[str, Any]) -> Row:
    labels = {"entailment": 0, "contradiction": 1, "neutral": 2}
    return r["idx"], {"premise": r["premise"], "hypothesis": r["hypothesis"]}, labels[r["label"]]


def _rte(r: dict[str, Any]) -> Row:
    labels = {"entailment": 0, "not_entailment": 1}
    return r["idx"], {"premise": r["premise"], "hypothesis": r["hypothesis"]}, labels[r["label"]]


def _copa(r: dict[str, Any]) -> Row:
    fields = {k: r[k] for k in ("premise", "question", "choice1", "choice2")}
    return r["idx"], fields, int(r["label"])


def _wic(r: dict[str, Any]) -> Row:
    return (
        r["idx"],
        {"word": r["word"], "sentence1": r["sentence1"], "sentence2": r["sentence2"]},
        int(bool(r["label"])),
    )


def _wsc(r: dict[str, Any]) -> Row:
    target = r["target"]
    fields = {"text": r["text"], "span1_text": target["span1_text"], "span2_text": target["span2_text"]}
    return r["idx"], fields, int(bool(r["label"]))


def _boolq(r: dict[str, Any]) -> Row:
    return r["idx"], {"passage": r["passage"], "question": r["question"]}, int(bool(r["label"]))


def _multirc_rows(name: str) -> list[Row]:
    """One row per answer option; id "<passage idx>-<question idx>-<answer idx>"."""
    rows: list[Row] = []
    for passage in _jsonl("multirc", name):
        text = passage["passage"]["text"]
        for q in passage["passage"]["questions"]:
            for a in q["answers"]:
                key = f"{passage['idx']}-{q['idx']}-{a['idx']}"
                rows.append((key, {"paragraph": text, "question": q["question"], "answer": a["text"]}, int(a["label"])))
    return rows


def _load_multirc() -> Splits:
    train, test = _multirc_rows("train.jsonl"), _multirc_rows("val.jsonl")
    return _val_from_train("multirc", train, test, group=lambda row: str(row[0]).split("-", 1)[0])


def _load_boolq() -> Splits:
    rows = [_boolq(r) for r in _jsonl("boolq", "val.jsonl")]
    return _three_way("boolq", rows, group=_same_text("passage"))


def _single_file(task: str, *parts: str, encoding: str = "utf-8") -> Callable[[], Splits]:
    def load() -> Splits:
        rows = [(i, {"sentence": text}, y) for i, (y, text) in enumerate(_labelled_lines(*parts, encoding=encoding))]
        return _three_way(task, rows, group=_same_text("sentence"))

    return load


def _stsa(task: str, folder: str, stem: str) -> Callable[[], Splits]:
    def load() -> Splits:
        def rows(split: str) -> list[Row]:
            return [
                (i, {"sentence": t}, y)
                for i, (y, t) in enumerate(_labelled_lines(*folder.split("/"), f"{stem}.{split}"))
            ]

        return _official(task, rows("train"), rows("dev"), rows("test"))

    return load


def _load_trec() -> Splits:
    def rows(name: str, encoding: str) -> list[Row]:
        return [(i, {"question": t}, y) for i, (y, t) in enumerate(_labelled_lines("trec", name, encoding=encoding))]

    return _val_from_train(
        "trec", rows("TREC.train.all", "latin-1"), rows("TREC.test.all", "utf-8"), _same_text("question")
    )


def _load_ag_news() -> Splits:
    def clean(text: str) -> str:
        return _AG_ENTITY.sub(lambda m: chr(int(m.group(1))), text.replace("\\", " ")).strip()

    with _file("ag_news", "test.csv").open(encoding="utf-8", newline="") as fh:
        rows: list[Row] = [
            (i, {"title": clean(title), "description": clean(desc)}, int(label) - 1)
            for i, (label, title, desc) in enumerate(csv.reader(fh))
        ]
    return _three_way(
        "ag_news", rows, group=lambda row: normalise(row[1]["title"] + " " + row[1]["description"]).lower()
    )


def _tweets(folder: str) -> Callable[[], Splits]:
    task = folder.replace("/", "_")

    def load() -> Splits:
        return _official(task, _tweet_split(folder, "train"), _tweet_split(folder, "val"), _tweet_split(folder, "test"))

    return load


# ---------------------------------------------------------------------------------------------- definitions

_YES_NO_MAYBE = "Yes or No or Maybe? Answer:"
_TWEET = 'Tweet: "{{ text }}" '  # tweets rarely end in punctuation: quote them off from the question
_MR_SST_NOTE = (
    " Overlap: SST is built from the MR rotten-tomatoes snippets (~45% of SST sentences occur verbatim in MR);"
    " do not train on one of sst2/sst5/mr and test on another without de-duplication."
)
_STANCE_TARGETS = {
    "abortion": "the legalization of abortion",
    "atheism": "atheism",
    "climate": "climate change being a real concern",
    "feminist": "the feminist movement",
    "hillary": "Hillary Clinton",
}


_SUPERGLUE_NOTE = "test = official SuperGLUE val file; val = stratified 10% of the official train file (seed 0)"
_CARVE_NOTE = (
    "no official split: carved 80/10/10 train/val/test, stratified by label (seed 0), identical texts kept in one split"
)


@dataclass(frozen=True)
class _TaskSpec:
    """The Task arguments of one built-in task; `task()` makes a fresh Task with its own lists and split cache."""

    name: str
    template: str
    choices: tuple[str, ...]
    loader: Callable[[], Splits]
    label_names: tuple[str, ...] | None = None
    truncate_field: str | None = None
    description: str = ""

    def task(self) -> Task:
        return Task(
            name=self.name,
            template=self.template,
            choices=list(self.choices),
            loader=self.loader,
            label_names=None if self.label_names is None else list(self.label_names),
            truncate_field=self.truncate_field,
            description=self.description,
        )


def _sentiment(name: str, kind: str, loader: Callable[[], Splits], description: str) -> _TaskSpec:
    return _TaskSpec(
        name=name,
        template="{{ sentence }} Is the sentiment of this " + kind + " positive or negative? Answer:",
        choices=("negative", "positive"),
        loader=loader,
        truncate_field="sentence",
        description=description,
    )


def _binary_tweet(name: str, question: str, label_names: tuple[str, str], what: str) -> _TaskSpec:
    return _TaskSpec(
        name=name,
        template=_TWEET + question + " Yes or No? Answer:",
        choices=("No", "Yes"),
        label_names=label_names,
        loader=_tweets(name),
        truncate_field="text",
        description=f"TweetEval {what}; official train/val/test files.",
    )


def _stance(target: str, phrase: str) -> _TaskSpec:
    return _TaskSpec(
        name=f"tweet_stance_{target}",
        template=_TWEET + "What is the stance of this tweet on " + phrase + ": none, against or favor? Answer:",
        choices=("none", "against", "favor"),
        loader=_tweets(f"tweet_stance/{target}"),
        truncate_field="text",
        description=f"TweetEval stance towards {phrase} (SemEval-2016 T6); official train/val/test files.",
    )


# Every built-in task, core tasks first (the order of BUILTIN_TASKS).
_BUILTIN_SPECS: tuple[_TaskSpec, ...] = (
    _TaskSpec(
        name="cb",
        template="{{ premise }} Based on the sentences, is it true that {{ hypothesis }}? " + _YES_NO_MAYBE,
        choices=("Yes", "No", "Maybe"),
        label_names=("entailment", "contradiction", "neutral"),
        loader=_superglue("cb", "cb", _cb),
        truncate_field="premise",
        description=f"SuperGLUE CommitmentBank (3-way entailment); {_SUPERGLUE_NOTE}.",
    ),
    _TaskSpec(
        name="copa",
        template=(
            "{{ premise }} {% if question == 'cause' %}What was the cause?{% else %}What happened as a result?"
            "{% endif %} A: {{ choice1 }} B: {{ choice2 }} Answer:"
        ),
        choices=("A", "B"),
        label_names=("choice1", "choice2"),
        loader=_superglue("copa", "copa", _copa),
        truncate_field="premise",
        description=f"SuperGLUE COPA (choice of plausible cause/effect); {_SUPERGLUE_NOTE}.",
    ),
    _TaskSpec(
        name="rte",
        template=(
            '{{ premise }} Using only the above description and what you know about the world, is "{{ hypothesis }}"'
            " definitely correct? Yes or no? Answer:"
        ),
        choices=("Yes", "No"),
        label_names=("entailment", "not_entailment"),
        loader=_superglue("rte", "rte", _rte, group=_same_text("premise")),
        truncate_field="premise",
        description=f"SuperGLUE RTE (== GLUE RTE); {_SUPERGLUE_NOTE}, rows sharing a premise kept together.",
    ),
    _TaskSpec(
        name="wic",
        template=(
            '{{ sentence1 }} {{ sentence2 }} Based on the sentences, is it true that the word "{{ word }}" have the'
            " same meaning in the two sentences? " + _YES_NO_MAYBE
        ),
        choices=("No", "Yes"),
        label_names=("false", "true"),
        loader=_superglue("wic", "wic", _wic),
        description=f"SuperGLUE Word-in-Context v1.1; {_SUPERGLUE_NOTE}.",
    ),
    _TaskSpec(
        name="wsc",
        template=(
            '{{ text }} Based on the sentences, is it true that the pronoun "{{ span2_text | lower }}" refer to'
            " {{ span1_text }}? " + _YES_NO_MAYBE
        ),
        choices=("No", "Yes"),
        label_names=("false", "true"),
        loader=_superglue("wsc", "wsc", _wsc, group=_same_text("text")),
        truncate_field="text",
        description=f"SuperGLUE WSC (recast Winograd); {_SUPERGLUE_NOTE}, rows sharing a sentence kept together.",
    ),
    _TaskSpec(
        name="boolq",
        template="{{ passage }} Based on the sentences, is it true that {{ question }}? " + _YES_NO_MAYBE,
        choices=("No", "Yes"),
        label_names=("false", "true"),
        loader=_load_boolq,
        truncate_field="passage",
        description=(
            "SuperGLUE BoolQ. The official train file is not staged, so train/val/test are all carved 80/10/10 "
            "(stratified, seed 0) from the official val file (3,270 questions); questions sharing a passage are "
            "kept in one split. Not comparable to published BoolQ numbers."
        ),
    ),
    _TaskSpec(
        name="multirc",
        template="{{ paragraph }} {{ question }} Based on the sentences, is it true that {{ answer }}? "
        + _YES_NO_MAYBE,
        choices=("No", "Yes"),  # label 0 = false -> No (the reference had these inverted)
        label_names=("false", "true"),
        loader=_load_multirc,
        truncate_field="paragraph",
        description=(
            f"SuperGLUE MultiRC, one example per (paragraph, question, answer option); {_SUPERGLUE_NOTE}, "
            "split by passage so no paragraph is in both train and val. Ids: multirc/<split>/<passage>-<question>-<answer>."
        ),
    ),
    _sentiment(
        "sst2",
        "movie review",
        _stsa("sst2", "sst2/stsa", "stsa.binary"),
        "SST-2 sentence level (stsa.binary train/dev/test = our train/val/test; not the GLUE phrase data)."
        + _MR_SST_NOTE,
    ),
    _sentiment(
        "mr",
        "movie review",
        _single_file("mr", "mr", "rt-polarity.all", encoding="latin-1"),
        f"MR rotten-tomatoes sentence polarity (Pang & Lee 2005); {_CARVE_NOTE}." + _MR_SST_NOTE,
    ),
    _TaskSpec(
        name="subj",
        template="{{ sentence }} Is this sentence subjective or objective? Answer:",
        choices=("subjective", "objective"),
        loader=_single_file("subj", "subj", "subj.all", encoding="latin-1"),
        truncate_field="sentence",
        description=f"SUBJ subjectivity (Pang & Lee 2004; review snippets vs plot sentences); {_CARVE_NOTE}.",
    ),
    _sentiment(
        "cr",
        "product review",
        _single_file("cr", "cr", "custrev.all"),
        f"CR customer reviews (Hu & Liu 2004); {_CARVE_NOTE}.",
    ),
    _TaskSpec(
        name="mpqa",
        template='Phrase: "{{ sentence }}" Is the opinion expressed by this phrase positive or negative? Answer:',
        choices=("negative", "positive"),
        loader=_single_file("mpqa", "mpqa", "mpqa.all"),
        truncate_field="sentence",
        description=f"MPQA opinion polarity of short phrases; {_CARVE_NOTE} (many phrases repeat).",
    ),
    # ---- extras
    _TaskSpec(
        name="sst5",
        template="{{ sentence }} How would you rate this movie review: terrible, bad, okay, good or great? Answer:",
        choices=("terrible", "bad", "okay", "good", "great"),
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        loader=_stsa("sst5", "sst5", "stsa.fine"),
        truncate_field="sentence",
        description="SST-5 fine-grained sentence level (stsa.fine train/dev/test = our train/val/test)." + _MR_SST_NOTE,
    ),
    _TaskSpec(
        name="trec",
        template=(
            "{{ question }} What kind of answer does this question ask for: a description, an entity, an "
            "abbreviation, a person, a location or a number? Answer:"
        ),
        choices=("description", "entity", "abbreviation", "person", "location", "number"),
        label_names=("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
        loader=_load_trec,
        truncate_field="question",
        description="TREC-6 question type; test = official test (500), val = stratified 10% of the official train (seed 0).",
    ),
    _TaskSpec(
        name="ag_news",
        template="{{ title }} {{ description }} Is this news article about World, Sports, Business or Science? Answer:",
        choices=("World", "Sports", "Business", "Science"),
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        loader=_load_ag_news,
        truncate_field="description",
        description=f"AG News topic; only the official test file (7,600) is staged: {_CARVE_NOTE}.",
    ),
    _TaskSpec(
        name="tweet_emotion",
        template=_TWEET + "Which emotion does this tweet express: anger, joy, optimism or sadness? Answer:",
        choices=("anger", "joy", "optimism", "sadness"),
        loader=_tweets("tweet_emotion"),
        truncate_field="text",
        description="TweetEval emotion (SemEval-2018 T1); official train/val/test files.",
    ),
    _binary_tweet(
        "tweet_hate",
        "Is this tweet hateful towards immigrants or women?",
        ("not-hate", "hate"),
        "hate speech (SemEval-2019 HatEval)",
    ),
    _binary_tweet("tweet_irony", "Is this tweet ironic?", ("non_irony", "irony"), "irony (SemEval-2018 T3)"),
    _binary_tweet(
        "tweet_offensive",
        "Is this tweet offensive?",
        ("not-offensive", "offensive"),
        "offensive language (SemEval-2019 OffensEval)",
    ),
    *(_stance(target, phrase) for target, phrase in _STANCE_TARGETS.items()),
)


def make_builtin_tasks() -> list[Task]:
    """Fresh Task objects (each caches its own splits) for every built-in task, core tasks first."""
    return [spec.task() for spec in _BUILTIN_SPECS]


BUILTIN_TASKS: tuple[str, ...] = tuple(spec.name for spec in _BUILTIN_SPECS)
