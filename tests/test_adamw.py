"""AdamW, the learning-rate schedule and gradient clipping, against torch's numbers and on paper.

The torch trajectory (tests/fixtures/adamw_trajectory.npz, written by make_adamw_fixture.py) runs on
the device under test. Measured on the CPU: the first step agrees bit for bit; the worst parameter error
over all 25 steps is 3.6e-8 of max |p| plain and 6.5e-8 with clipping (torch fuses two multiply-adds
that NumPy rounds separately); the clipping norms agree to 9e-8 relative.
"""
import math
import os

import numpy as np
import pytest

from npllama import adamw, backend
from npllama.adamw import AdamW, clip_grad_norm, learning_rate

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adamw_trajectory.npz")
TRAJECTORY_TOLERANCE = 1e-6  # of max |p|, per parameter and step; measured 3.6e-8 (6.5e-8 clipped)


@pytest.fixture(scope="module")
def torch_run():
    with np.load(FIXTURE) as fixture:
        return {key: fixture[key] for key in fixture.files}


def initial_params(run, xp):
    return {name: xp.array(run[f"param/{name}"]) for name in run["names"]}


def step_grads(run, step, xp):
    return {name: xp.array(run[f"grad/{name}"][step]) for name in run["names"]}


def fixture_optimizer(run):
    beta1, beta2, eps, weight_decay, _ = run["hyper"]
    return AdamW(lr=float(run["lrs"][0]), betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def relative_error(actual, expected):
    return float(np.abs(backend.to_host(actual) - expected).max() / np.abs(expected).max())


# ---- AdamW against torch -------------------------------------------------------------------------
@pytest.mark.parametrize("clipped", [False, True], ids=["plain", "clipped"])
def test_trajectory_matches_torch(torch_run, xp, clipped):
    run = torch_run
    params = initial_params(run, xp)
    optimizer = fixture_optimizer(run)
    max_norm = float(run["hyper"][4])
    trajectory = "clip_traj" if clipped else "traj"
    worst, norms = 0.0, []
    for step, lr in enumerate(run["lrs"]):
        grads = step_grads(run, step, xp)
        if clipped:
            norms.append(clip_grad_norm(grads, max_norm))
        optimizer.step(params, grads, lr=float(lr))
        for name in run["names"]:
            assert params[name].dtype == xp.float32
            worst = max(worst, relative_error(params[name], run[f"{trajectory}/{name}"][step]))
            if step == 0 and not clipped:  # m = 0 and v = 0 before: torch's fused multiply-adds round as
                # ours do, so the first step, every operation in torch's order, is exact
                np.testing.assert_array_equal(backend.to_host(params[name]), run[f"traj/{name}"][0])
    assert worst <= TRAJECTORY_TOLERANCE, f"worst relative error {worst:.3g}"
    if clipped:
        assert (run["clip_norms"] > max_norm).sum() >= 5 and (run["clip_norms"] < max_norm).sum() >= 5
        np.testing.assert_allclose(norms, run["clip_norms"], rtol=1e-6)
    else:
        for name in run["names"]:  # the moments, which the trajectory only sees through their ratio
            state = optimizer.state_dict()
            assert relative_error(state["m"][name], run[f"exp_avg/{name}"]) <= TRAJECTORY_TOLERANCE
            assert relative_error(state["v"][name], run[f"exp_avg_sq/{name}"]) <= TRAJECTORY_TOLERANCE


def test_fixture_schedule_is_learning_rate(torch_run):
    max_lr, min_lr, warmup, decay_iters = torch_run["schedule"]
    lrs = [learning_rate(step, max_lr, min_lr, int(warmup), int(decay_iters))
           for step in range(len(torch_run["lrs"]))]
    np.testing.assert_array_equal(lrs, torch_run["lrs"])


def reference_adamw(params, grads_per_step, lrs, betas, eps, weight_decay):
    """The update written as the textbook equations, in float64, one step at a time."""
    params = {name: value.astype(np.float64) for name, value in params.items()}
    m = {name: np.zeros_like(value) for name, value in params.items()}
    v = {name: np.zeros_like(value) for name, value in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for name, p in params.items():
            g = grads[name]
            if p.ndim >= 2:
                p *= 1 - lr * weight_decay
            m[name] = betas[0] * m[name] + (1 - betas[0]) * g
            v[name] = betas[1] * v[name] + (1 - betas[1]) * g * g
            m_hat = m[name] / (1 - betas[0] ** t)
            v_hat = v[name] / (1 - betas[1] ** t)
            p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def test_float64_matches_textbook_equations(torch_run, xp):
    run = torch_run
    params = {name: xp.array(value, dtype=xp.float64) for name, value in initial_params(run, np).items()}
    optimizer = fixture_optimizer(run)
    grads_per_step = [step_grads(run, step, np) for step in range(len(run["lrs"]))]
    for step, lr in enumerate(run["lrs"]):
        grads = {name: xp.array(g, dtype=xp.float64) for name, g in grads_per_step[step].items()}
        optimizer.step(params, grads, lr=float(lr))
    beta1, beta2, eps, weight_decay, _ = run["hyper"]
    expected = reference_adamw(initial_params(run, np), grads_per_step, run["lrs"], (beta1, beta2), eps,
                               weight_decay)
    for name, value in params.items():
        assert value.dtype == xp.float64
        assert optimizer.state_dict()["m"][name].dtype == xp.float64
        assert relative_error(value, expected[name]) < 1e-13


def test_first_step_moves_each_weight_by_lr_against_its_gradient_sign(rng):
    # t = 1: m̂ = g, v̂ = g², so the step is −lr·g/(|g| + ε) ≈ −lr·sign(g), whatever g's scale
    params = {"w": rng.standard_normal((5, 7)).astype(np.float32)}
    before = params["w"].copy()
    grads = {"w": (rng.standard_normal((5, 7)) * 10.0 ** rng.uniform(-4, 4, (5, 7))).astype(np.float32)}
    AdamW(lr=0.01, eps=1e-12).step(params, grads)
    np.testing.assert_allclose(params["w"] - before, -0.01 * np.sign(grads["w"]), rtol=1e-4)


# ---- weight decay --------------------------------------------------------------------------------
def test_zero_grads_decay_only_matrices(xp, rng):
    # with g = 0, m and v stay 0 and the Adam step is 0: only the decay p ← p·(1 − lr·λ) moves p
    names_shapes = {"embed": (6, 4), "proj": (4, 6), "norm": (4,)}
    host = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in names_shapes.items()}
    params = {name: xp.array(value) for name, value in host.items()}
    optimizer = AdamW(lr=0.05, weight_decay=0.3)
    expected = {name: value.copy() for name, value in host.items()}
    for lr in (None, 0.02, 0.1):
        optimizer.step(params, {name: xp.zeros_like(value) for name, value in params.items()}, lr=lr)
        factor = np.float32(1 - (0.05 if lr is None else lr) * 0.3)
        expected["embed"] *= factor
        expected["proj"] *= factor
    for name, value in params.items():
        np.testing.assert_array_equal(backend.to_host(value), expected[name])
    np.testing.assert_array_equal(backend.to_host(params["norm"]), host["norm"])  # 1-D: never decayed
    assert not np.array_equal(expected["proj"], host["proj"])


def test_no_weight_decay_by_default(rng):
    params = {"proj": rng.standard_normal((4, 6)).astype(np.float32)}
    before = params["proj"].copy()
    AdamW(lr=0.1).step(params, {"proj": np.zeros((4, 6), np.float32)})
    np.testing.assert_array_equal(params["proj"], before)


# ---- the step's interface ------------------------------------------------------------------------
def test_lr_argument_overrides_the_default_for_one_step(rng):
    host = {"a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{name: rng.standard_normal(value.shape).astype(np.float32) for name, value in host.items()}
             for _ in range(3)]
    overridden, fixed = ({name: value.copy() for name, value in host.items()} for _ in range(2))
    optimizer = AdamW(lr=0.5, weight_decay=0.1)
    reference = AdamW(lr=0.003, weight_decay=0.1)
    for g in grads:
        optimizer.step(overridden, g, lr=0.003)
        reference.step(fixed, g)
    assert optimizer.lr == 0.5
    for name in host:
        np.testing.assert_array_equal(overridden[name], fixed[name])
    with pytest.raises(ValueError, match="learning rate"):
        optimizer.step(overridden, grads[0], lr=float("nan"))


def test_updates_in_place_and_creates_moments_like_the_params(xp, rng):
    base = xp.array(rng.standard_normal((adamw.CHUNK // 8 + 3, 24)).astype(np.float32))  # more than a chunk
    params = {"big": base, "transposed": xp.array(rng.standard_normal((6, 5)).astype(np.float32)).T,
              "norm": xp.ones(5, dtype=xp.float32)}
    views = dict(params)
    before = {name: backend.to_host(value).copy() for name, value in params.items()}
    grads = {name: xp.array(rng.standard_normal(value.shape).astype(np.float32))
             for name, value in params.items()}
    optimizer = AdamW(lr=0.01, weight_decay=0.1)
    optimizer.step(params, grads)
    for name, value in params.items():
        assert value is views[name]
        assert not np.array_equal(backend.to_host(value), before[name])  # every element moved by ≈ lr
        assert np.abs(backend.to_host(value) - before[name]).min() > 1e-3
    state = optimizer.state_dict()
    assert state["step"] == 1
    for name, value in params.items():
        for moment in (state["m"][name], state["v"][name]):
            assert backend.array_module(moment) is xp
            assert moment.dtype == value.dtype and moment.shape == value.shape


def test_sliced_cpu_update_equals_whole_array_update(rng):
    # a C-contiguous parameter over several CHUNKs is updated slice by slice; a Fortran-ordered copy
    # of it goes through the whole-array path: elementwise, the two must agree bit for bit
    shape = (3 * adamw.CHUNK // 40 + 7, 40)
    sliced = {"w": rng.standard_normal(shape).astype(np.float32)}
    whole = {"w": np.asfortranarray(sliced["w"])}
    assert sliced["w"].size > 3 * adamw.CHUNK and not whole["w"].flags.c_contiguous
    optimizers = AdamW(lr=0.01, weight_decay=0.1), AdamW(lr=0.01, weight_decay=0.1)
    for _ in range(3):
        grads = {"w": rng.standard_normal(shape).astype(np.float32)}
        optimizers[0].step(sliced, grads)
        optimizers[1].step(whole, {"w": np.asfortranarray(grads["w"])})
    np.testing.assert_array_equal(sliced["w"], whole["w"])
    for key in ("m", "v"):
        np.testing.assert_array_equal(optimizers[0].state_dict()[key]["w"],
                                      optimizers[1].state_dict()[key]["w"])


def test_parameters_without_grads_are_left_alone(rng):
    params = {"a": rng.standard_normal((3, 3)).astype(np.float32),
              "b": rng.standard_normal((3, 3)).astype(np.float32)}
    frozen = params["b"].copy()
    optimizer = AdamW(lr=0.1, weight_decay=0.5)
    optimizer.step(params, {"a": np.ones((3, 3), np.float32), "b": None})
    optimizer.step(params, {"a": np.ones((3, 3), np.float32)})
    np.testing.assert_array_equal(params["b"], frozen)
    assert set(optimizer.state_dict()["m"]) == {"a"}


def test_bad_grads_change_nothing(rng):
    params = {"a": rng.standard_normal((3, 3)).astype(np.float32),
              "b": rng.standard_normal((3,)).astype(np.float32)}
    before = {name: value.copy() for name, value in params.items()}
    optimizer = AdamW(lr=0.1)
    with pytest.raises(KeyError, match="nope"):
        optimizer.step(params, {"a": np.ones((3, 3), np.float32), "nope": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        optimizer.step(params, {"a": np.ones((3, 3), np.float32), "b": np.ones(4, np.float32)})
    assert optimizer.state_dict()["step"] == 0 and not optimizer.state_dict()["m"]
    for name, value in params.items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("arguments", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                                       dict(eps=-1e-8), dict(weight_decay=-0.1), dict(lr=float("inf"))])
def test_rejects_bad_hyperparameters(arguments):
    with pytest.raises(ValueError):
        AdamW(**arguments)


# ---- state_dict ----------------------------------------------------------------------------------
def test_resume_from_state_dict_is_bit_identical(torch_run, xp):
    run, split = torch_run, 9
    lrs = [float(lr) for lr in run["lrs"]]
    uninterrupted = initial_params(run, xp)
    optimizer = fixture_optimizer(run)
    for step, lr in enumerate(lrs):
        optimizer.step(uninterrupted, step_grads(run, step, xp), lr=lr)

    params = initial_params(run, xp)
    first = fixture_optimizer(run)
    for step in range(split):
        first.step(params, step_grads(run, step, xp), lr=lrs[step])
    state = first.state_dict()
    saved = {name: backend.to_host(value).copy() for name, value in params.items()}
    first.step(params, step_grads(run, split, xp), lr=lrs[split])  # the snapshot must not follow this step
    state_on_host = {**state, "m": {name: backend.to_host(m) for name, m in state["m"].items()},
                     "v": {name: backend.to_host(v) for name, v in state["v"].items()}}

    resumed = AdamW(lr=123.0)  # hyperparameters come from the state too
    resumed.load_state_dict(state_on_host)
    assert resumed.state_dict()["step"] == split
    assert (resumed.lr, resumed.betas, resumed.eps, resumed.weight_decay) == \
        (first.lr, first.betas, first.eps, first.weight_decay)
    params = {name: xp.array(value) for name, value in saved.items()}  # fresh copies, as from a checkpoint
    for step in range(split, len(lrs)):
        resumed.step(params, step_grads(run, step, xp), lr=lrs[step])
    for name in run["names"]:
        np.testing.assert_array_equal(backend.to_host(params[name]), backend.to_host(uninterrupted[name]))
        assert backend.array_module(resumed.state_dict()["m"][name]) is xp


def test_loaded_state_takes_the_params_dtype_and_checks_shapes(rng):
    # a state stored wider (float64) than the float32 params: cast back exactly on the next step
    params = {"w": rng.standard_normal((40, 3)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((40, 3)).astype(np.float32)} for _ in range(4)]
    optimizer = AdamW(lr=0.01, weight_decay=0.1)
    for g in grads[:2]:
        optimizer.step(params, g)
    state = optimizer.state_dict()
    resumed_params = {"w": params["w"].copy()}
    resumed = AdamW()
    resumed.load_state_dict({**state, "m": {"w": state["m"]["w"].astype(np.float64)},
                             "v": {"w": state["v"]["w"].astype(np.float64)}})
    for g in grads[2:]:
        optimizer.step(params, g)
        resumed.step(resumed_params, g)
    np.testing.assert_array_equal(resumed_params["w"], params["w"])
    assert resumed.state_dict()["m"]["w"].dtype == np.float32 == resumed.state_dict()["v"]["w"].dtype
    wrong = AdamW()
    transposed = np.zeros((3, 40), np.float32)
    wrong.load_state_dict({**state, "m": {"w": transposed}, "v": {"w": transposed}})
    before = params["w"].copy()
    with pytest.raises(ValueError, match="shape"):
        wrong.step(params, grads[0])
    assert wrong.state_dict()["step"] == 2
    np.testing.assert_array_equal(params["w"], before)


def test_load_state_dict_copies_its_arrays(rng):
    params = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
    grads = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
    optimizer = AdamW(lr=0.01)
    optimizer.step(params, grads)
    state = optimizer.state_dict()
    other = AdamW()
    other.load_state_dict(state)
    state["m"]["w"][:] = 7.0
    assert not np.any(other.state_dict()["m"]["w"] == 7.0)
    assert other.state_dict()["step"] == 1


def test_load_state_dict_rejects_inconsistent_state():
    optimizer = AdamW()
    state = optimizer.state_dict()
    with pytest.raises(KeyError, match="betas"):
        optimizer.load_state_dict({key: value for key, value in state.items() if key != "betas"})
    with pytest.raises(ValueError, match="different parameters"):
        optimizer.load_state_dict({**state, "step": 1, "m": {"w": np.zeros(3)}})
    with pytest.raises(ValueError, match="betas"):
        optimizer.load_state_dict({**state, "betas": (0.9, 1.5)})


# ---- learning_rate -------------------------------------------------------------------------------
def test_learning_rate_warmup_peak_and_cosine():
    max_lr, min_lr, warmup, decay = 6e-4, 6e-5, 10, 110
    lrs = [learning_rate(step, max_lr, min_lr, warmup, decay) for step in range(130)]
    for step in range(warmup):  # linear warmup, never reaching max_lr before step `warmup`
        assert lrs[step] == pytest.approx(max_lr * (step + 1) / (warmup + 1), rel=1e-15)
    assert lrs[warmup - 1] < max_lr
    assert lrs[warmup] == max_lr  # the peak
    assert lrs[(warmup + decay) // 2] == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)  # cosine midpoint
    quarter = min_lr + 0.5 * (1 + math.cos(math.pi / 4)) * (max_lr - min_lr)  # a quarter of the way
    assert lrs[warmup + 25] == pytest.approx(quarter, rel=1e-12)
    assert lrs[decay] == pytest.approx(min_lr, abs=1e-18)
    assert all(lr == min_lr for lr in lrs[decay + 1:])
    assert all(later < earlier for earlier, later in zip(lrs[warmup:decay + 1], lrs[warmup + 1:decay + 1]))
    assert all(later > earlier for earlier, later in zip(lrs[:warmup + 1], lrs[1:warmup + 1]))


def test_learning_rate_edge_cases():
    assert learning_rate(0, 1e-3, 1e-4, 0, 100) == 1e-3  # no warmup: the peak at step 0
    assert learning_rate(100, 1e-3, 1e-4, 0, 100) == pytest.approx(1e-4, abs=1e-19)
    assert learning_rate(0, 1e-3, 1e-4, 0, 0) == 1e-4  # no warmup, no decay span: min_lr throughout
    assert learning_rate(5, 1e-3, 1e-4, 0, 0) == 1e-4
    # warmup == decay_iters: warmup, then min_lr (no 0/0)
    assert learning_rate(4, 1e-3, 1e-4, 5, 5) == pytest.approx(1e-3 * 5 / 6, rel=1e-15)
    assert learning_rate(5, 1e-3, 1e-4, 5, 5) == 1e-4
    assert learning_rate(9, 1e-3, 1e-4, 5, 5) == 1e-4
    # decay_iters before the warmup ends: warmup, then min_lr
    assert learning_rate(7, 1e-3, 1e-4, 10, 3) == pytest.approx(1e-3 * 8 / 11, rel=1e-15)
    assert learning_rate(10, 1e-3, 1e-4, 10, 3) == 1e-4
    assert learning_rate(50, 1e-3, 1e-3, 10, 100) == 1e-3  # min_lr == max_lr: constant after warmup
    with pytest.raises(ValueError):
        learning_rate(0, 1e-3, 1e-4, -1, 10)


# ---- clip_grad_norm ------------------------------------------------------------------------------
def random_grads(xp, rng, scale):
    shapes = {"embed": (adamw.CHUNK // 16 + 5, 16), "proj": (8, 12), "norm": (12,)}  # embed spans chunks
    host = {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in shapes.items()}
    exact = math.sqrt(sum(float(np.sum(value.astype(np.float64) ** 2)) for value in host.values()))
    return {name: xp.array(value) for name, value in host.items()}, host, exact


def test_clip_grad_norm_scales_to_max_norm_when_above(xp, rng):
    grads, host, exact = random_grads(xp, rng, scale=0.1)
    assert exact > 2.0
    norm = clip_grad_norm(grads, 1.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(exact, rel=1e-7)
    scale = 1.0 / (exact + 1e-6)
    for name, value in grads.items():
        np.testing.assert_allclose(backend.to_host(value), host[name] * scale, rtol=1e-6)
    clipped = math.sqrt(sum(float(np.sum(backend.to_host(value).astype(np.float64) ** 2))
                            for value in grads.values()))
    assert clipped == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("max_norm", [10.0, None, 0.0, 0])
def test_clip_grad_norm_leaves_grads_when_below_or_disabled(xp, rng, max_norm):
    grads, host, exact = random_grads(xp, rng, scale=0.01)
    assert exact < 10.0 and exact > 0.5  # above max_norm 0 but no clipping asked for
    assert clip_grad_norm(grads, max_norm) == pytest.approx(exact, rel=1e-7)
    for name, value in grads.items():
        np.testing.assert_array_equal(backend.to_host(value), host[name])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_grad_norm_returns_non_finite_norm_and_leaves_grads(xp, rng, bad):
    grads, host, _ = random_grads(xp, rng, scale=1.0)
    host["proj"][3, 4] = bad
    grads["proj"] = xp.array(host["proj"])
    norm = clip_grad_norm(grads, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) if math.isnan(bad) else norm == math.inf)
    for name, value in grads.items():
        np.testing.assert_array_equal(backend.to_host(value), host[name])


def test_clip_grad_norm_edge_cases(rng):
    assert clip_grad_norm({}, 1.0) == 0.0
    assert clip_grad_norm({"w": np.zeros((3, 3), np.float32), "none": None}, 1.0) == 0.0
    assert clip_grad_norm({"w": np.array([3.0, 4.0])}, None) == 5.0
    with pytest.raises(ValueError):
        clip_grad_norm({"w": np.ones(3)}, -1.0)
