"""The fused multi-adapter trainer equals K separate trainings (tiny Llama on CPU, float32 and NF4).

Tolerances. One fused step gives each adapter its separate training's gradients within float32 rounding
(checked at 1e-5 below) and the vectorised clip + AdamW equals torch's (1e-6). Over a whole run AdamW
amplifies rounding noise element-wise (it divides by sqrt(v) + eps, so a gradient element near zero moves
by a sign-like step either way): the SEQUENTIAL trainer alone, given an initialisation changed by 1e-7
relative, ends 2e-5 away in relative norm and 1e-4 in the largest element. So end-to-end, LoRA tensors must
agree within 5e-4 in relative Frobenius norm and 2e-3 of the tensor's largest magnitude (observed: 7e-5 and
3.5e-4 at most), validation metrics within 1e-4 (1e-3 for NF4), train losses within 1e-5 relative, best epochs
and epoch counts exactly. The learning rate is kept where the toy training is not chaotic (at lr 5e-3 the
same 1e-7 change moves the result by 4%).
"""

from __future__ import annotations

import pytest
import torch

from shared.ml.models import Base
from shared.ml.progress import Cancelled
from shared.ml.tasks.base import Example, Task
from shared.ml.training.many import AdapterSpec, train_many
from shared.ml.training.multi import LoRAStack, StackedLoRALinear, _Module
from shared.ml.training.trainer import epoch_plan, extract_state, prepare_tasks, temporary_adapter

CFG = dict(
    epochs=3,
    lr=2e-3,
    batch_size=4,
    eval_batch_size=16,
    rank=4,
    seed=0,
    patience=1,
    max_length=64,
    max_train=None,
    max_val=None,
    max_test=None,
)
TARGETS = ("q_proj", "k_proj", "v_proj")


def toy_task(name: str, words: tuple[str, str] = ("bad", "good"), n: int = 16, flip_val: bool = False) -> Task:
    """Sentiment toy task; with flip_val the validation labels are the opposite of what training teaches
    (validation accuracy falls as the adapter learns: early stopping)."""

    def split(s: str, k: int, flip: int) -> list[Example]:
        return [
            Example(f"{name}/{s}/{i}", {"text": f"the movie was {words[i % 2]} number {i}"}, (i + flip) % 2)
            for i in range(k)
        ]

    return Task(
        name=name,
        template="{{text}}. Is the review positive or negative? Answer:",
        choices=["negative", "positive"],
        loader=lambda: {
            "train": split("train", n, 0),
            "val": split("val", 12, int(flip_val)),
            "test": split("test", 12, 0),
        },
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_base):
    tasks = [
        toy_task("toy_a"),
        toy_task("toy_b", ("terrible", "great"), n=10),
        toy_task("toy_c", ("awful", "nice"), n=20),
        toy_task("toy_flip", n=12, flip_val=True),
    ]
    data = prepare_tasks(tiny_base.tokenizer, tasks, CFG)
    with temporary_adapter(tiny_base, "init", 4, 32.0, TARGETS, 0.0, 7) as pm:
        gen = torch.Generator().manual_seed(1)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02, generator=gen)
        init = extract_state(pm, "init")
    # unequal epoch lengths (7, 5 and 3 batches), seeds, an init_state, early stopping (toy_flip)
    specs = [
        AdapterSpec("first", ["toy_a", "toy_b"]),
        AdapterSpec("second", ["toy_c"], seed=3, init_state=init),
        AdapterSpec("third", ["toy_flip"], seed=5),
    ]
    return data, specs


_SEQUENTIAL: dict[str, list] = {}


def _sequential(base, specs, cfg, data):
    key = repr(sorted((k, v) for k, v in cfg.items() if k not in ("step_rows", "step_tokens")))
    if key not in _SEQUENTIAL:
        _SEQUENTIAL[key] = train_many(base, specs, cfg, data, method="sequential")
    return _SEQUENTIAL[key]


def _plain(base: Base) -> bool:
    from peft import PeftModel

    return (
        not isinstance(base.model, PeftModel)
        and not any("lora_" in n for n, _ in base.model.named_parameters())
        and not any(isinstance(m, StackedLoRALinear) for m in base.model.modules())
    )


def assert_same(seq, mul, state_tol: float = 5e-4, metric_tol: float = 1e-4) -> None:
    for s, m in zip(seq, mul, strict=True):
        assert (m.name, m.tasks, m.seed) == (s.name, s.tasks, s.seed)
        assert m.best_epoch == s.best_epoch, s.name
        assert len(m.history) == len(s.history), s.name
        for hs, hm in zip(s.history, m.history, strict=True):
            assert set(hs) == set(hm)
            assert hm["train_loss"] == pytest.approx(hs["train_loss"], rel=1e-5)
            assert hm["val_accuracy"] == pytest.approx(hs["val_accuracy"], abs=metric_tol)
            assert hm.get("train") == hs.get("train")
        assert set(m.val_metrics) == set(s.val_metrics)
        for t in s.val_metrics:
            assert m.val_metrics[t].accuracy == pytest.approx(s.val_metrics[t].accuracy, abs=metric_tol)
            assert m.val_metrics[t].loss == pytest.approx(s.val_metrics[t].loss, abs=metric_tol)
        assert set(m.state) == set(s.state)
        for k in s.state:
            assert m.state[k].dtype == torch.float32 and m.state[k].shape == s.state[k].shape
            diff = m.state[k] - s.state[k]
            assert float(diff.norm()) <= state_tol * float(s.state[k].norm()), (s.name, k)
            assert float(diff.abs().max()) <= 4 * state_tol * float(s.state[k].abs().max()), (s.name, k)
        for f in ("train_tokens", "train_rows", "train_flops", "eval_tokens", "eval_rows", "eval_flops", "steps"):
            assert getattr(m.cost, f) == getattr(s.cost, f), (s.name, f)
        assert m.peft_config == s.peft_config
        assert m.hyperparameters == s.hyperparameters


@pytest.mark.parametrize(
    "extra, mode",
    [
        ({}, "auto"),
        ({"step_rows": 5, "step_tokens": 90}, "stacked"),  # every fused step split into micro-steps
        ({}, "bmm"),
        ({"batching": "length", "batch_tokens": 48}, "auto"),  # mixed-task, length-sorted batches
    ],
    ids=["stacked", "micro-steps", "bmm", "length-batching"],
)
def test_multi_equals_sequential(tiny_base, setup, extra, mode):
    data, specs = setup
    cfg = {**CFG, **extra}
    seq = _sequential(tiny_base, specs, cfg, data)
    forwards = []
    hook = tiny_base.model.get_decoder().register_forward_pre_hook(
        lambda mod, args: forwards.append(torch.is_grad_enabled())
    )
    try:
        mul = train_many(tiny_base, specs, cfg, data, mode=mode)
    finally:
        hook.remove()
    assert _plain(tiny_base)
    if "batching" not in extra:  # the cases are exercised: early stopping, unequal epoch lengths
        assert len(seq[2].history) < cfg["epochs"] and seq[2].best_epoch == 1
        assert len({s.cost.steps // len(s.history) for s in seq}) == 3
    else:  # tasks mixed in a batch
        lengths = {t: data[t].lengths("train", tiny_base.tokenizer, 64) for t in specs[0].tasks}
        assert any(len({t for t, _ in b}) > 1 for b in epoch_plan(lengths, 4, 0, 1, "length", 48))
    assert_same(seq, mul)
    fused_steps = max(m.cost.steps for m in mul)  # every adapter steps on each fused step until it finishes
    train_forwards = sum(forwards)
    if "step_rows" in extra:
        assert train_forwards > fused_steps
    else:
        assert train_forwards == fused_steps
    assert all(m.extra["fused"]["adapters"] == 3 for m in mul)


def test_one_fused_step_gives_each_adapter_its_own_gradient(tiny_base):
    """Rows of two adapters (different lengths, padded together) in one forward/backward, loss = sum of the
    adapters' batch means: each adapter's gradient equals the one PEFT computes for its rows alone."""
    from shared.ml.encoding import Encoded, collate
    from shared.ml.models import answer_logits
    from shared.ml.training.multi import stacked_lora

    gen = torch.Generator().manual_seed(3)
    states = []
    for seed in (0, 1):
        with temporary_adapter(tiny_base, "g", 4, 32.0, TARGETS, 0.0, seed) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 0.05, generator=gen)
            states.append(extract_state(pm, "g"))
    rows = [[Encoded(f"{k}{i}", "t", list(range(5 + k, 12 + 3 * i + k)), 0, 40 + i) for i in range(3)] for k in (0, 1)]
    want = []
    for k in (0, 1):
        with temporary_adapter(tiny_base, "g", 4, 32.0, TARGETS, 0.0, 0, states[k]) as pm:
            batch = collate(rows[k], 0)
            torch.nn.functional.cross_entropy(answer_logits(pm, batch), batch.answer_tokens).backward()
            want.append({n.replace(".g.", "."): p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    for mode in ("stacked", "bmm"):
        with stacked_lora(tiny_base, states, 4, 32.0) as (stack, router):
            stack.zero_grad()
            batch = collate(rows[0] + rows[1], 0)
            ids = torch.tensor([0, 0, 0, 1, 1, 1])
            router.route(ids, mode, torch.arange(8) // 4)
            ce = torch.nn.functional.cross_entropy(
                answer_logits(tiny_base.model, batch), batch.answer_tokens, reduction="none"
            )
            (ce / 3).sum().backward()
            router.on = False
            for m in stack.modules:
                a, b = stack.params[m.path]
                for k in (0, 1):
                    torch.testing.assert_close(a.grad[k], want[k][f"{m.path}.lora_A.weight"], rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(b.grad[k].t(), want[k][f"{m.path}.lora_B.weight"], rtol=1e-5, atol=1e-7)
    assert _plain(tiny_base)


def test_nf4_multi_equals_sequential():
    base = Base.load("tiny-llama", "nf4", "cpu")
    cfg = {**CFG, "epochs": 2, "patience": None}
    data = prepare_tasks(base.tokenizer, [toy_task("toy_a", n=12), toy_task("toy_c", ("awful", "nice"), n=8)], cfg)
    specs = [AdapterSpec("x", ["toy_a", "toy_c"], seed=1), AdapterSpec("y", ["toy_c"], seed=2)]
    seq = train_many(base, specs, cfg, data, method="sequential")
    mul = train_many(base, specs, cfg, data)
    assert_same(seq, mul, state_tol=1e-3, metric_tol=1e-3)
    assert _plain(base)


def test_stacked_clip_and_adamw_match_torch_per_adapter():
    """The vectorised update equals torch's clip_grad_norm_ + AdamW run per adapter (one adapter frozen)."""
    K, r = 3, 2
    mods = [
        _Module("m0", torch.nn.Module(), "x", torch.nn.Identity(), 5, 7),
        _Module("m1", torch.nn.Module(), "x", torch.nn.Identity(), 7, 3),
    ]
    stack = LoRAStack(mods, K, r, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for W in stack.W:
            W.copy_(torch.randn(W.shape, generator=gen))
    lrs, wd, active = [1e-2, 3e-2, 5e-2], 0.1, (0, 2)
    ref = {
        k: [p[k].detach().clone().requires_grad_(True) for m in mods for p in stack.params[m.path]] for k in range(K)
    }
    opts = {k: torch.optim.AdamW(ref[k], lr=lrs[k], weight_decay=wd) for k in active}
    lr_on = torch.tensor([lrs[k] if k in active else 0.0 for k in range(K)]).view(1, K, 1, 1)
    decay = torch.tensor([1 - lrs[k] * wd if k in active else 1.0 for k in range(K)]).view(1, K, 1, 1)
    for step in range(1, 4):
        stack.zero_grad()
        for m in mods:
            for p in stack.params[m.path]:
                p.grad.copy_(torch.randn(p.shape, generator=gen) * 3)
        for k in active:
            for p, g in zip(ref[k], [p.grad[k] for m in mods for p in stack.params[m.path]], strict=True):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(ref[k], 1.0)
            opts[k].step()
        stack.clip(1.0)
        stack.adamw(step, lr_on, decay)
    for k in range(K):
        got = [p[k] for m in mods for p in stack.params[m.path]]
        for g, want in zip(got, ref[k], strict=True):
            torch.testing.assert_close(g, want.detach(), rtol=1e-6, atol=1e-6)  # frozen adapter 1: unchanged


def test_bad_input_and_an_interrupted_run_leave_the_base_clean(tiny_base, setup):
    data, specs = setup
    with pytest.raises(ValueError, match="unique"):
        train_many(tiny_base, [specs[0], specs[0]], CFG, data)
    with pytest.raises(ValueError, match="no prepared data.*nope"):
        train_many(tiny_base, [AdapterSpec("z", ["nope"])], CFG, data)
    with pytest.raises(ValueError, match="unknown training method"):
        train_many(tiny_base, specs, CFG, data, method="parallel")
    with pytest.raises(ValueError, match="unknown mode"):
        train_many(tiny_base, specs, CFG, data, mode="loop")
    assert train_many(tiny_base, [], CFG, data) == []
    rng_before = torch.random.get_rng_state()

    def cancel(stage, done, total, message=""):
        if done >= 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_many(tiny_base, specs, {**CFG, "epochs": 1}, data, progress=cancel)
    assert _plain(tiny_base)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not tiny_base.model.training
