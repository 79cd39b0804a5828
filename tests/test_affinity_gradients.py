"""Stage 1a on tiny-llama: hook-based per-example B gradients vs autograd, f0, and the sketch."""

from __future__ import annotations

import math

import pytest
import torch

from shared.ml.affinity.gradients import (
    LoraGradCapture,
    choice_log_odds,
    log_odds,
    lora_grad_only,
    output_f,
    project_batch,
    spec_for,
)
from shared.ml.affinity.projection import (
    _GOLDEN,
    _MASK32,
    ProjectionSpec,
    Projector,
    mix32,
    mix32_int,
    rademacher_block,
    seed_key,
)
from shared.ml.encoding import bind, collate, encode_examples
from shared.ml.models import answer_logits, attach_lora, load_model, lora_state


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = load_model("tiny-llama", device="cpu")
    peft = attach_lora(model, rank=4, seed=0)
    peft.eval()
    from shared.ml.tasks.registry import get_task

    items = []
    for name in ("cb", "rte", "sst2"):
        task = get_task(name)
        items += encode_examples(bind(task, tok), task.split("train")[:3], tok, max_length=96)
    batch = collate(items, tok.pad_token_id)
    assert len(set(batch.last_index.tolist())) > 1  # rows of different lengths: padding is exercised
    return peft, tok, batch


def _autograd_per_example(model, batch, output="vocab"):
    b_params = [p for n, p in model.named_parameters() if "lora_B.default." in n]
    names = [n for n, p in model.named_parameters() if "lora_B.default." in n]
    with lora_grad_only(model), torch.enable_grad():
        f = output_f(answer_logits(model, batch), batch, output)
        out = []
        for i in range(len(batch)):  # the loop the production code never does
            grads = torch.autograd.grad(f[i], b_params, retain_graph=True)
            out.append({n: g.detach().clone() for n, g in zip(names, grads, strict=False)})
    return f.detach(), out


@pytest.mark.parametrize("output", ["vocab", "choice"])
def test_hook_gradients_equal_per_example_autograd(tiny, output):
    model, _, batch = tiny
    with lora_grad_only(model), LoraGradCapture(model, output=output) as cap:
        f_hook, grads = cap.run(model, batch)
    f_ref, ref = _autograd_per_example(model, batch, output)
    assert torch.allclose(f_hook, f_ref, atol=1e-6)
    assert set(grads) == set(ref[0])
    for i in range(len(batch)):
        hook_i = torch.cat([grads[n][i].flatten() for n in ref[i]])
        ref_i = torch.cat([g.flatten() for g in ref[i].values()])
        rel = float((hook_i - ref_i).norm() / ref_i.norm())
        assert ref_i.norm() > 0
        assert rel < 1e-5, f"example {i}: relative error {rel:.2e}"


def test_hook_gradients_equal_autograd_away_from_b0(tiny):
    """A meta-initialised theta0 has B != 0: the hooks still give each example's exact B gradient."""
    model, _, batch = tiny
    b = {n: p for n, p in model.named_parameters() if "lora_B.default." in n}
    saved = {n: p.detach().clone() for n, p in b.items()}
    gen = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            for p in b.values():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        with lora_grad_only(model), LoraGradCapture(model, output="choice") as cap:
            f_hook, grads = cap.run(model, batch)
        f_ref, ref = _autograd_per_example(model, batch, "choice")
        assert torch.allclose(f_hook, f_ref, atol=1e-6)
        for i in range(len(batch)):
            hook_i = torch.cat([grads[n][i].flatten() for n in ref[i]])
            ref_i = torch.cat([g.flatten() for g in ref[i].values()])
            assert float((hook_i - ref_i).norm() / ref_i.norm()) < 1e-5
    finally:
        with torch.no_grad():
            for n, p in b.items():
                p.copy_(saved[n])


def test_a_and_b_gradients_equal_per_example_autograd_away_from_b0(tiny):
    """factors="AB": from B0 != 0 the A gradients are non-zero, and the hooks give each example's exact A and B
    gradients (the same batched matmul at the lora_A modules, where delta is B^T s delta_B)."""
    model, _, batch = tiny
    b = {n: p for n, p in model.named_parameters() if "lora_B.default." in n}
    saved = {n: p.detach().clone() for n, p in b.items()}
    gen = torch.Generator().manual_seed(4)
    names = [n for n, _ in model.named_parameters() if "lora_A.default." in n or "lora_B.default." in n]
    try:
        with torch.no_grad():
            for p in b.values():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        with lora_grad_only(model, factors="AB"), LoraGradCapture(model, output="choice", factors="AB") as cap:
            f_hook, grads = cap.run(model, batch)
        assert set(grads) == set(names)
        assert [p.param_name for p in cap.params] == names  # the spec's order: named_parameters order
        params = dict(model.named_parameters())
        with lora_grad_only(model, factors="AB"), torch.enable_grad():
            f = output_f(answer_logits(model, batch), batch, "choice")
            for i in range(len(batch)):
                ref = torch.autograd.grad(f[i], [params[n] for n in names], retain_graph=True)
                for n, g in zip(names, ref, strict=True):
                    if "lora_A" in n:
                        assert float(g.norm()) > 0  # the A directions exist away from B0
                    rel = float((grads[n][i] - g).norm() / g.norm().clamp(min=1e-30))
                    assert rel < 1e-5, f"example {i}, {n}: relative error {rel:.2e}"
        spec_ab, spec_b = spec_for(model, 1, 16, factors="AB"), spec_for(model, 1, 16)
        assert spec_ab.total == sum(params[n].numel() for n in names) > spec_b.total
    finally:
        with torch.no_grad():
            for n, p in b.items():
                p.copy_(saved[n])


def test_a_gradients_are_zero_at_b0(tiny):
    model, _, batch = tiny
    a_params = [p for n, p in model.named_parameters() if "lora_A.default." in n]
    for p in a_params:
        p.requires_grad_(True)
    with torch.enable_grad():
        f = log_odds(answer_logits(model, batch), batch.answer_tokens)
        grads = torch.autograd.grad(f.sum(), a_params)
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_f0_is_the_full_vocabulary_log_odds_without_clipping(tiny):
    model, _, batch = tiny
    with torch.no_grad():
        z = answer_logits(model, batch).double()
    p = torch.softmax(z, -1).gather(1, batch.answer_tokens[:, None])[:, 0]
    expected = torch.log(p) - torch.log1p(-p)
    got = log_odds(z.float(), batch.answer_tokens).double()
    assert torch.allclose(got, expected, atol=1e-4)
    # stable at extreme logits where p rounds to 1 or 0 in float32
    zz = torch.zeros(2, 50)
    zz[0, 3] = 200.0
    zz[1, 3] = -200.0
    f = log_odds(zz, torch.tensor([3, 3]))
    assert torch.isfinite(f).all() and f[0] > 150 and f[1] < -150


def test_choice_f_is_the_log_odds_over_the_task_choices(tiny):
    model, _, batch = tiny
    assert batch.choice_tokens is not None and set((batch.choice_tokens >= 0).sum(1).tolist()) == {2, 3}  # cb has 3
    with torch.no_grad():
        z = answer_logits(model, batch).double()
    for i in range(len(batch)):
        ids = batch.choice_tokens[i][batch.choice_tokens[i] >= 0]
        p = torch.softmax(z[i, ids], -1)[int(batch.labels[i])]
        f = choice_log_odds(z[i : i + 1].float(), batch.answer_tokens[i : i + 1], batch.choice_tokens[i : i + 1])
        assert abs(float(f) - float(torch.log(p) - torch.log1p(-p))) < 1e-4
    # f > 0 exactly when the gold choice has the largest choice logit (for two choices)
    f = output_f(z.float(), batch, "choice")
    two = (batch.choice_tokens >= 0).sum(1) == 2
    wins = (
        z.gather(1, batch.choice_tokens.clamp(min=0)).masked_fill(batch.choice_tokens < 0, -1e9).argmax(1)
        == batch.labels
    )
    assert torch.equal((f > 0)[two], wins[two])


def test_padding_does_not_change_a_rows_gradient(tiny):
    from shared.ml.encoding import Batch

    model, _, batch = tiny
    i = int(batch.last_index.argmin())  # the shortest row carries the most padding in the batch
    ids = batch.input_ids[i : i + 1, : int(batch.last_index[i]) + 1]
    one = Batch(
        ids,
        torch.ones_like(ids),
        batch.last_index[i : i + 1],
        batch.labels[i : i + 1],
        batch.answer_tokens[i : i + 1],
        batch.example_ids[i : i + 1],
        batch.tasks[i : i + 1],
    )
    with lora_grad_only(model), LoraGradCapture(model) as cap:
        _, full = cap.run(model, batch)
        _, alone = cap.run(model, one)
    for name in alone:
        a, b = alone[name][0], full[name][i]
        assert float((a - b).norm() / b.norm()) < 1e-4


# ------------------------------------------------------------------------------------------ projection


def _explicit_P(seed: int, D: int, d: int) -> torch.Tensor:
    """P built entry by entry with plain Python integers (independent of the torch implementation)."""
    key = seed_key(seed)
    P = torch.empty(D, d, dtype=torch.float64)
    for r in range(D):
        rk = mix32_int(r ^ key)
        for w in range((d + 31) // 32):
            h = mix32_int((rk + w * _GOLDEN) & _MASK32)
            for bit in range(32):
                c = w * 32 + bit
                if c < d:
                    P[r, c] = 1.0 if (h >> bit) & 1 else -1.0
    return P / math.sqrt(d)


def test_mix32_tensor_matches_python_reference():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [mix32_int(x) for x in xs]


def test_block_generator_equals_explicit_P_and_is_block_size_independent():
    seed, D, d = 3, 70, 45
    P = _explicit_P(seed, D, d)
    whole = rademacher_block(seed, d, 0, D, dtype=torch.float64)
    assert torch.equal(whole, P)
    parts = torch.cat([rademacher_block(seed, d, a, min(D, a + 13), dtype=torch.float64) for a in range(0, D, 13)])
    assert torch.equal(parts, P)
    other = rademacher_block(seed + 1, d, 0, D, dtype=torch.float64)
    assert not torch.equal(other, P)
    assert abs(float((P * math.sqrt(d)).mean())) < 0.1  # balanced signs


def test_projected_features_equal_explicit_P(tiny):
    model, _, batch = tiny
    d = 40
    spec = spec_for(model, seed=5, dim=d)
    spec.block_elems = 977  # force many small blocks (and blocks straddling parameter boundaries)
    projector = Projector(spec, "cpu")
    with lora_grad_only(model), LoraGradCapture(model) as cap:
        f0, proj = project_batch(model, cap, projector, batch)
        _, grads = cap.run(model, batch)
    flat = torch.cat([grads[p.name].reshape(len(batch), -1) for p in spec.params], dim=1).double()
    assert flat.shape[1] == spec.total == sum(math.prod(v.shape) for n, v in lora_state(model).items() if "lora_B" in n)
    P = _explicit_P(5, spec.total, d)
    expected = flat @ P
    assert torch.allclose(proj.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # back-map with the same generator: Delta = P w
    w = torch.randn(3, d, dtype=torch.float64)
    back = projector.backmap(w.float())
    delta = torch.cat([back[p.name].reshape(3, -1) for p in spec.params], dim=1).double()
    assert torch.allclose(delta, w @ P.T, atol=1e-5)
    # and the first-order identity g . (P w) = (P^T g) . w
    assert torch.allclose(flat @ delta.T, proj.double() @ w.T, rtol=1e-4, atol=1e-6)


def test_projection_spec_round_trip(tmp_path, tiny):
    model, _, _ = tiny
    spec = spec_for(model, seed=9, dim=32)
    spec.save(tmp_path / "spec.json")
    again = ProjectionSpec.load(tmp_path / "spec.json")
    assert again == spec and again.total == spec.total
    assert [p.name for p in again.params] == [n for n in lora_state(model) if "lora_B" in n]


def test_projection_memory_is_one_block():
    spec = ProjectionSpec.from_shapes(0, 400, [("a", (5000, 4)), ("b", (3000, 4))])
    spec.block_elems = 400 * 100
    proj = Projector(spec)
    seen = []
    orig = proj._blocks

    def spy(a, b):
        for r0, r1, blk in orig(a, b):
            seen.append(blk.numel())
            yield r0, r1, blk

    proj._blocks = spy
    proj.project_flat(torch.randn(2, spec.total))
    assert max(seen) <= spec.block_elems < spec.total * spec.dim
