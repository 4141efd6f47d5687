"""Iterative nullspace projection: planted directions, the classifier against scikit-learn, batching over
components, the projection onto the intersection of nullspaces, and per-prompt activations on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refusal import format_prompts, post_instruction_ids
from refusal.data import builtin
from refusal.directions.diff_means import mean_activations
from refusal.directions.inlp import (
    InlpResult,
    _fit_centred,
    _orthonormal_rows,
    collect_activations,
    extract_inlp,
    fit_linear,
    inlp,
    plot_accuracy,
)
from refusal.models.parts import find_parts

HARMFUL = [r["instruction"] for r in builtin("harmful")[:7]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:6]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fits here are small: on a shared 2-core machine, two torch threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted(n: int, d: int, seed: int, a: float = 1.2, rho: float = 0.7):
    """Two classes of ``n`` each in ``d`` dims, with orthonormal planted ``u1``, ``u2``: unit Gaussian noise,
    correlated ``rho`` between ``u1`` and ``u2``, and class means ``+-a (u1 + rho u2)``. Then ``Sigma^-1 (mu_h -
    mu_b)`` is along ``u1``, so the best linear classifier (logistic regression is exact for Gaussians with a shared
    covariance) is ``u1``, not the difference in means; once ``u1`` is projected out, the means still differ by
    ``2 a rho`` along ``u2`` (unit noise there), so the second classifier is ``u2``; once both are out, no linear
    trace of the class is left (given enough prompts per dimension: an estimate of ``u1`` off by an angle ``t``
    leaves a separation of ``2 a t`` behind, which later rounds pick up)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T  # orthonormal u1, u2
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    z1, z2 = z @ u[0], z @ u[1]
    noise = z + (rho * z1 + math.sqrt(1 - rho**2) * z2 - z2)[:, None] * u[1]
    sign = torch.cat([torch.ones(n), -torch.ones(n)]).double()[:, None]
    x = noise + sign * a * (u[0] + rho * u[1]) + 0.7  # an offset: the intercept must absorb it
    return x[:n].float(), x[n:].float(), u.float()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


# ---- planted directions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_recovers_the_planted_directions_then_reaches_chance(classifier):
    h, b, u = planted(2000, 8, seed=1)
    res = inlp(h[None], b[None], n_iterations=6, classifier=classifier, seed=0)
    k = int(res.rank[0])
    assert k == 2, res.to_json()
    basis = res.subspace(-1, 0)
    assert cos(basis[0], u[0]) > 0.95 and cos(basis[1], u[1]) > 0.95  # oriented: harmful projects higher
    assert cos(res.first_direction(-1, 0), u[0]) > 0.95
    he = res.heldout_accuracy[0]
    assert he[0] > 0.8 and he[1] > 0.7  # u1 separates; after it is removed, u2 still does
    assert abs(float(he[2]) - 0.5) < 0.05  # after both are removed: chance, so INLP stopped
    assert torch.isnan(he[3:]).all() and torch.isnan(res.train_accuracy[0, 3:]).all()
    # the basis is orthonormal, and P annihilates W (the classifiers' weight vectors)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    w = res.weights[0, :k]
    assert float((res.projection(-1, 0) @ w.T).abs().max()) < 1e-5
    # what is left carries no linear trace of the class: a fresh classifier is at chance on prompts it did not see
    x = torch.cat([h, b]) @ res.projection(-1, 0)
    y = torch.cat([torch.ones(2000), torch.zeros(2000)]).bool()
    wf, bf = fit_linear(x[::2], y[::2], l2=1e-3)
    acc = ((x[1::2] @ wf + bf > 0) == y[1::2]).float().mean()
    assert abs(float(acc) - 0.5) < 0.05


def test_projection_is_the_intersection_of_nullspaces_not_a_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 20, generator=g, dtype=torch.float64)  # rows far from orthogonal
    q = _orthonormal_rows(w)
    torch.testing.assert_close(q @ q.mT, torch.eye(5, dtype=torch.float64).expand(3, 5, 5), atol=1e-12, rtol=0)
    for c in range(3):
        explicit = torch.eye(20, dtype=torch.float64) - torch.linalg.pinv(w[c]) @ w[c]  # I - W^+ W
        p = torch.eye(20, dtype=torch.float64) - q[c].T @ q[c]
        torch.testing.assert_close(p, explicit, atol=1e-10, rtol=0)
        assert float((p @ w[c].T).abs().max()) < 1e-10
        product = torch.eye(20, dtype=torch.float64)  # per-step projections: not the same for non-orthogonal rows
        for row in w[c]:
            v = row / row.norm()
            product = product @ (torch.eye(20, dtype=torch.float64) - torch.outer(v, v))
        assert float((product - explicit).abs().max()) > 1e-2
    # row j of the basis spans what row j of W adds, with the same sign (the first row is w_1 normalised)
    torch.testing.assert_close(q[:, 0], w[:, 0] / w[:, 0].norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)


def test_result_projection_equals_explicit_pseudoinverse_form():
    h, b, _ = planted(400, 16, seed=3)
    res = inlp(h[None], b[None], n_iterations=4, min_accuracy=0.0, margin=-1.0)  # accept every round
    assert int(res.rank[0]) == 4
    w = res.weights[0].double()
    explicit = torch.eye(16, dtype=torch.float64) - torch.linalg.pinv(w) @ w
    torch.testing.assert_close(res.projection(-1, 0).double(), explicit, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.basis[0] @ res.basis[0].T, torch.eye(4), atol=1e-5, rtol=0)


# ---- the classifier against scikit-learn ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(400, 24), (120, 300)])  # d < N (features) and d > N (the span of the data)
def test_classifier_matches_sklearn_logistic_regression(n, d):
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(n + d)
    y = torch.rand(n, generator=g) < 0.35  # unbalanced: the class weights matter
    u = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.6 * torch.where(y, 1.0, -1.0).double()[:, None] * (
        u / u.norm()) + 0.4
    l2 = 1e-2
    w, b = fit_linear(x, y, l2=l2)
    # ours: (1/N) sum_i s_i loss_i + (l2/2)|w|^2; scikit-learn's: C sum_i s_i loss_i + (1/2)|w|^2, the same
    # objective times 1/(C N) when C = 1/(l2 N), with the same balanced weights s_i = N / (2 N_class) and neither
    # penalising the intercept (lbfgs), so the minimisers coincide
    clf = sklearn.LogisticRegression(C=1 / (l2 * n), class_weight="balanced", tol=1e-10, max_iter=10_000)
    clf.fit(x.numpy(), y.numpy())
    ws = torch.from_numpy(clf.coef_[0])
    assert cos(w, ws) > 0.98
    ours = ((x @ w + b > 0) == y).double().mean()
    theirs = torch.tensor(clf.score(x.numpy(), y.numpy()))
    assert abs(float(ours - theirs)) <= 0.02
    assert abs(float(b) - float(clf.intercept_[0])) < 1e-3  # in fact equal to the solvers' tolerance


def test_svm_matches_sklearn_linear_svc():
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(5)
    n, d = 300, 16
    y = torch.rand(n, generator=g) < 0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5 * torch.where(y, 1.0, -1.0).double()[:, None]
    l2 = 1e-2
    w, b = fit_linear(x, y, classifier="svm", l2=l2)
    # liblinear penalises the intercept as a feature of value intercept_scaling: a large one makes that negligible
    clf = svm.LinearSVC(C=1 / (l2 * n), class_weight="balanced", loss="squared_hinge", dual=False, tol=1e-10,
                        intercept_scaling=100.0, max_iter=100_000).fit(x.numpy(), y.numpy())
    assert cos(w, torch.from_numpy(clf.coef_[0])) > 0.98


def test_feature_and_span_solvers_agree():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 50, 40, generator=g, dtype=torch.float64)
    y = torch.arange(50) % 3 == 0
    x[:, y] += 0.3
    x = x - x.mean(1, keepdim=True)
    for classifier in ("logistic", "svm"):
        w1, b1, s1 = _fit_centred(x, y, classifier, 1e-2, dual=True)
        w2, b2, s2 = _fit_centred(x, y, classifier, 1e-2, dual=False)
        torch.testing.assert_close(w1, w2, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(b1, b2, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(s1, s2, atol=1e-8, rtol=1e-6)


# ---- batching over components ----------------------------------------------------------------------------------------


def components(d: int):
    """Four components of different difficulty: they stop after different numbers of rounds."""
    hs, bs = [], []
    for seed, (a, rho) in enumerate([(1.2, 0.7), (1.5, 0.0), (0.02, 0.0), (2.0, 0.5)]):
        h, b, _ = planted(150, d, seed=10 + seed, a=a, rho=rho)
        hs.append(h)
        bs.append(b[:130])  # unequal classes
    return torch.stack(hs), torch.stack(bs)


@pytest.mark.parametrize("d", [12, 400])  # the feature solver and the span solver
def test_batched_over_components_equals_one_at_a_time(d):
    h, b = components(d)
    kw = dict(n_iterations=5, seed=3)
    together = inlp(h, b, positions=[-2, -1], layers=[4, 7], **kw)
    assert together.rank.tolist() != [together.rank[0].item()] * 4  # the components really differ
    chunked = inlp(h, b, positions=[-2, -1], layers=[4, 7], component_batch=3, **kw)
    for c, (pos, layer) in enumerate([(-2, 4), (-2, 7), (-1, 4), (-1, 7)]):
        alone = inlp(h[c:c + 1], b[c:c + 1], **kw)
        assert together.index(pos, layer) == c
        assert int(together.rank[c]) == int(alone.rank[0]) == int(chunked.rank[c])
        k = int(alone.rank[0])
        torch.testing.assert_close(together.subspace(pos, layer), alone.basis[0, :k], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked.subspace(pos, layer), alone.basis[0, :k], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.first_direction(pos, layer), alone.first[0], atol=1e-5, rtol=0)
        for name in ("train_accuracy", "heldout_accuracy"):
            torch.testing.assert_close(getattr(together, name)[c], getattr(alone, name)[0], equal_nan=True)
            torch.testing.assert_close(getattr(chunked, name)[c], getattr(alone, name)[0], equal_nan=True)
        if k < together.basis.shape[1]:
            assert not together.basis[c, k:].any()  # zero rows past the rank


def test_deterministic_given_seed_and_four_d_input(tmp_path):
    h, b = components(10)
    h4, b4 = h.reshape(2, 2, *h.shape[1:]), b.reshape(2, 2, *b.shape[1:])
    r1 = inlp(h4, b4, n_iterations=4, seed=7)
    r2 = inlp(h, b, n_iterations=4, seed=7, positions=[-2, -1], layers=[0, 1])
    assert r1.positions == [-2, -1] and r1.layers == [0, 1]
    assert torch.equal(r1.basis, r2.basis) and torch.equal(r1.rank, r2.rank)
    r3 = inlp(h, b, n_iterations=4, seed=8, positions=[-2, -1], layers=[0, 1])
    assert not torch.equal(r1.heldout_accuracy.nan_to_num(), r3.heldout_accuracy.nan_to_num())  # another split
    # persistence, JSON curves and the plot
    r1.save(tmp_path / "inlp.safetensors")
    back = InlpResult.load(tmp_path / "inlp.safetensors")
    assert torch.equal(back.basis, r1.basis) and back.layers == r1.layers and back.config == r1.config
    doc = json.loads(json.dumps(r1.to_json()))
    comp = doc["components"][r1.index(-1, 1)]
    assert comp["rank"] == int(r1.rank[3]) and len(comp["heldout_accuracy"]) == 4
    assert all(v is None for v in comp["heldout_accuracy"][comp["rank"] + 1:])
    plot_accuracy(r1, -1, 1, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        r1.subspace(-3, 0)
    c = int(r1.rank.argmax())
    pos, layer = r1.positions[c // 2], r1.layers[c % 2]
    direction = r1.direction(pos, layer)
    assert direction.method == "inlp" and (direction.layer, direction.pos) == (layer, pos)
    torch.testing.assert_close(direction.vectors, r1.subspace(pos, layer))


# ---- activations on tiny models --------------------------------------------------------------------------------------


def test_collect_activations_mean_equals_mean_activations(model, tokenizer):
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS)
    n_pos = len(post_instruction_ids(tokenizer))
    acts = collect_activations(model, tokenizer, prompts, n_pos, batch_size=4)  # uneven batches
    n_layers = find_parts(model).n_layers
    assert acts.shape == (n_pos, n_layers, len(prompts), find_parts(model).hidden_size)
    assert acts.dtype == torch.float32
    want = mean_activations(model, tokenizer, prompts, n_pos, batch_size=4)
    torch.testing.assert_close(acts.mean(2), want, atol=1e-5, rtol=1e-5)
    some = collect_activations(model, tokenizer, prompts, n_pos, layers=[2, 0], batch_size=4)
    torch.testing.assert_close(some, acts[:, [2, 0]], atol=1e-6, rtol=1e-6)


def test_collect_activations_stores_a_chunk_once_after_out_of_memory(tokenizer):
    from conftest import build_model

    llama = build_model("llama", len(tokenizer))
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS)
    # after the first chunk of 8 runs out of memory, the retry goes on in chunks of 4: the same padding as this
    want = collect_activations(llama, tokenizer, prompts, 3, batch_size=4)
    state = {"raised": 0}

    def fail_once(_m, _args, _kwargs):  # layers 0..2 have been caught for this chunk when layer 3 runs out
        if not state["raised"]:
            state["raised"] += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    h = find_parts(llama).layers[3].register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        got = collect_activations(llama, tokenizer, prompts, 3, batch_size=8)
    finally:
        h.remove()
    assert state["raised"] == 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_extract_inlp_on_a_tiny_model(tokenizer):
    from conftest import build_model

    qwen = build_model("qwen2", len(tokenizer), n_layers=3)
    n_pos = len(post_instruction_ids(tokenizer))
    hp, bp = format_prompts(tokenizer, HARMFUL), format_prompts(tokenizer, HARMLESS)
    res = extract_inlp(qwen, tokenizer, hp, bp, n_pos, layers=[1, 2], batch_size=4, n_iterations=3,
                       heldout_fraction=0.3, model_name="tiny")
    assert res.positions == list(range(-n_pos, 0)) and res.layers == [1, 2] and res.model == "tiny"
    assert res.basis.shape[0] == n_pos * 2 and res.basis.shape[-1] == 64
    assert res.train_accuracy.shape == (n_pos * 2, 3)
    assert res.config["n_train"] == [5, 4] and res.config["n_heldout"] == [2, 2]
    d = res.first_direction(-1, 2)
    assert math.isclose(float(d.norm()), 1.0, rel_tol=1e-5)
    # the first direction is oriented: harmful activations project higher on average
    acts_h = collect_activations(qwen, tokenizer, hp, n_pos, layers=[2])[-1, 0]
    acts_b = collect_activations(qwen, tokenizer, bp, n_pos, layers=[2])[-1, 0]
    assert float((acts_h @ d).mean()) > float((acts_b @ d).mean())
