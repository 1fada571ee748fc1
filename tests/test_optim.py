"""LARS against hand-computed steps and a naive loop of the official SimCLR rule; groups, lr scaling, schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.optim import LARS, OptimConfig, build_optimizer, lr_at, scaled_lr, warmup_steps_for

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 0.1, 0.01


def lars_step(optimizer, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=p.dtype)
    optimizer.step()


def assert_values(param, expected):
    torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=param.dtype), rtol=0, atol=1e-6)


def test_lars_two_hand_computed_steps():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([w, b], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)

    # Step 1, w: g = G + 0.1 w = [[.6, 0], [0, .8]], |g| = 1, trust = .01 * 5 / 1 = .05,
    # v = .5 * .05 * g = [[.015, 0], [0, .02]].  b: no decay, no trust: v = .5 * [.5, .25].
    lars_step(opt, [w, b], [[[0.3, 0.0], [0.0, 0.4]], [0.5, 0.25]])
    assert_values(w, [[2.985, 0.0], [0.0, 3.98]])
    assert_values(b, [0.75, -2.125])

    # Step 2, w = .995 * w0 so |w| = 4.975; G chosen so g = G + .1 w = [[0, .3], [.4, 0]], |g| = .5,
    # trust = .01 * 4.975 / .5 = .0995, v = .9 v + .5 * .0995 * g = [[.0135, .014925], [.0199, .018]].
    # b: v = .9 * [.25, .125] + .5 * [-1, .5] = [-.275, .3625].
    lars_step(opt, [w, b], [[[-0.2985, 0.3], [0.4, -0.398]], [-1.0, 0.5]])
    assert_values(w, [[2.9715, -0.014925], [-0.0199, 3.962]])
    assert_values(b, [1.025, -2.4875])
    assert_values(opt.state[w]["momentum_buffer"], [[0.0135, 0.014925], [0.0199, 0.018]])


def test_lars_zero_weight_norm_gives_trust_one():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    lars_step(opt, [w], [[[1.0, 2.0], [3.0, 4.0]]])  # decay adds 0; trust 1: w = -lr * G
    assert_values(w, [[-0.5, -1.0], [-1.5, -2.0]])


def test_lars_zero_gradient_gives_trust_one_and_momentum_still_moves():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    opt = LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=0.0, trust_coefficient=ETA)
    # Step 1: g = [[.6, 0], [0, .8]] (|g| = 1), trust = .05, v = [[.015, 0], [0, .02]].
    lars_step(opt, [w], [[[0.6, 0.0], [0.0, 0.8]]])
    # Step 2: g = 0, so |g| = 0 -> trust 1 (not inf * 0 = nan); v = .9 v = [[.0135, 0], [0, .018]].
    lars_step(opt, [w], [[[0.0, 0.0], [0.0, 0.0]]])
    assert_values(w, [[3.0 - 0.015 - 0.0135, 0.0], [0.0, 4.0 - 0.02 - 0.018]])


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_exclude_1d_switch(exclude_1d):
    b = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # |b| = 5
    opt = LARS([b], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA, exclude_1d=exclude_1d)
    lars_step(opt, [b], [[0.3, 0.4]])
    if exclude_1d:  # plain momentum SGD: b - .5 * G
        assert_values(b, [2.85, 3.8])
    else:  # g = [.6, .8], |g| = 1, trust .05: b - .025 * g
        assert_values(b, [2.985, 3.98])


def test_lars_exclude_1d_as_a_param_group_option():
    b1 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b2 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([{"params": [b1]}, {"params": [b2], "exclude_1d": False}], lr=LR, weight_decay=WD, trust_coefficient=ETA)
    lars_step(opt, [b1, b2], [[0.3, 0.4], [0.3, 0.4]])
    assert_values(b1, [2.85, 3.8])
    assert_values(b2, [2.985, 3.98])


SHAPES = [(4, 3), (3,), (2, 3, 2, 2), (2,)]


def naive_lars(params, grads_per_step, *, lr, momentum, weight_decay, eta):
    """The official SimCLR rule on flat Python lists, one parameter and one element at a time."""
    params = [list(p) for p in params]
    velocities = [[0.0] * len(p) for p in params]
    is_1d = [len(shape) == 1 for shape in SHAPES]
    for grads in grads_per_step:
        for w, v, grad, excluded in zip(params, velocities, grads, is_1d):
            g = list(grad) if excluded else [gi + weight_decay * wi for gi, wi in zip(grad, w)]
            trust = 1.0
            if not excluded:
                w_norm, g_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in g))
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
            for k in range(len(w)):
                v[k] = momentum * v[k] + lr * trust * g[k]
                w[k] -= v[k]
    return params


def test_lars_matches_naive_loop_over_random_steps():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    grads_per_step = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(6)]
    expected = naive_lars(
        [p.detach().flatten().tolist() for p in params],
        [[gr.flatten().tolist() for gr in grads] for grads in grads_per_step],
        lr=0.3, momentum=0.8, weight_decay=1e-2, eta=0.001,
    )
    opt = LARS(params, lr=0.3, momentum=0.8, weight_decay=1e-2, trust_coefficient=0.001)
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lars_works_in_any_float_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    results = []
    for d in (torch.float64, dtype):
        w = nn.Parameter(start.to(d, copy=True))
        opt = LARS([w], lr=0.5, weight_decay=1e-2, trust_coefficient=1.0)  # large steps, visible in 8-bit mantissas
        w.grad = grad.to(d)
        opt.step()
        assert w.dtype == d and opt.state[w]["momentum_buffer"].dtype == d
        results.append(w.detach())
    assert not torch.equal(results[1], start.to(dtype))
    torch.testing.assert_close(results[1].double(), results[0], rtol=0, atol=2e-2)


def test_lars_step_with_closure_returns_the_loss():
    model = nn.Linear(3, 2)
    opt = LARS(model.parameters(), lr=0.1)
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def train_steps(model, optimizer, batches):
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_lars_state_dict_round_trip_continues_identically():
    batches = [torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    config = OptimConfig(weight_decay=1e-4).resolved(image_size=224)
    uninterrupted = small_model()
    train_steps(uninterrupted, build_optimizer(uninterrupted, config, lr=0.5), batches)

    first = small_model()
    opt = build_optimizer(first, config, lr=0.5)
    train_steps(first, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    assert all("momentum_buffer" in s for s in saved_opt["state"].values())

    resumed = small_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, config, lr=0.5)
    resumed_opt.load_state_dict(saved_opt)
    train_steps(resumed, resumed_opt, batches[3:])
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -0.1},
        {"lr": 0.1, "momentum": 1.0},
        {"lr": 0.1, "momentum": -0.1},
        {"lr": 0.1, "weight_decay": -1e-6},
        {"lr": 0.1, "trust_coefficient": 0.0},
        {"lr": 0.1, "trust_coefficient": -0.001},
    ],
)
def test_lars_rejects_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError, match="LARS"):
        LARS([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_lars_rejects_bad_hyper_parameters_in_a_param_group():
    with pytest.raises(ValueError, match="momentum"):
        LARS([{"params": [nn.Parameter(torch.zeros(2, 2))], "momentum": 1.5}], lr=0.1)


@pytest.mark.parametrize(
    "name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer_groups_every_parameter_once_and_1d_without_decay(name, cls):
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-4).resolved(image_size=224), lr=0.2)
    assert isinstance(optimizer, cls)
    grouped = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(id(p) for p, _ in grouped) == sorted(id(p) for p in model.parameters())
    for p, group in grouped:
        assert group["lr"] == 0.2
        assert group["weight_decay"] == (0.0 if p.ndim == 1 else 1e-4)
    if name == "sgd":
        assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in optimizer.param_groups)
    if name == "lars":
        assert all(g["exclude_1d"] and g["trust_coefficient"] == 0.001 for g in optimizer.param_groups)


def test_build_optimizer_leaves_out_frozen_parameters():
    model = small_model()
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim\.name 'adam' .*lars, sgd, adamw"):
        OptimConfig(name="adam").validate()
    with pytest.raises(ConfigError):
        build_optimizer(small_model(), OptimConfig(name="adam"), lr=0.1)


@pytest.mark.parametrize(
    "field,value",
    [("lr", 0.0), ("lr", float("nan")), ("lr_scaling", "log"), ("momentum", 1.0), ("weight_decay", -1.0),
     ("warmup_epochs", -1.0), ("trust_coefficient", 0.0)],
)
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(ConfigError, match=rf"optim\.{field} '?{value}") as info:
        OptimConfig(**{field: value}).validate()
    assert "\n" not in str(info.value)


def test_default_config_is_valid():
    OptimConfig().validate()


def resolved_recipe(size: int, **given) -> tuple:
    cfg = OptimConfig(**given).resolved(image_size=size)
    return cfg.name, cfg.lr, cfg.weight_decay, cfg.warmup_epochs


def test_auto_optimizer_is_sgd_at_small_images_and_the_paper_s_lars_above():
    assert resolved_recipe(32) == resolved_recipe(64) == ("sgd", 0.3, 5e-4, 0.0)
    assert resolved_recipe(65) == resolved_recipe(224) == ("lars", 0.3, 1e-6, 10.0)  # §3 "Default setting"
    # LARS asked for at a small size is the CIFAR recipe (app. B.9), as before
    assert resolved_recipe(32, name="lars") == ("lars", 1.0, 1e-6, 10.0)
    assert resolved_recipe(224, name="sgd") == ("sgd", 0.3, 1e-6, 10.0)  # SGD's small-image values stop at 64 px
    assert resolved_recipe(32, name="adamw") == ("adamw", 1.0, 1e-6, 10.0)
    # each value given wins, and the others still follow the optimizer and the size
    assert resolved_recipe(32, weight_decay=1e-4) == ("sgd", 0.3, 1e-4, 0.0)
    assert resolved_recipe(32, lr=0.1, warmup_epochs=2) == ("sgd", 0.1, 5e-4, 2)
    assert resolved_recipe(32, lr_scaling="sqrt") == ("sgd", 0.075, 5e-4, 0.0)
    resolved = OptimConfig().resolved(image_size=32)
    assert resolved.resolved(image_size=224) == resolved  # resolving twice changes nothing


def test_build_optimizer_refuses_a_config_with_auto_values_left():
    with pytest.raises(ValueError, match="resolved"):
        build_optimizer(small_model(), OptimConfig(), lr=0.1)


def test_scaled_lr_at_4096_matches_the_paper():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.3, 256, "linear") == pytest.approx(0.3)
    with pytest.raises(ValueError):
        scaled_lr(0.3, 256, "log")


def test_warmup_steps_for():
    assert warmup_steps_for(warmup_epochs=10, steps_per_epoch=100, total_steps=100 * 100) == 1000
    assert warmup_steps_for(warmup_epochs=2.5, steps_per_epoch=10, total_steps=1000) == 25
    # Short run: 10 epochs of 100 steps would exceed the whole 20-epoch run's 10% (200 steps).
    assert warmup_steps_for(warmup_epochs=10, steps_per_epoch=100, total_steps=2000) == 200
    assert warmup_steps_for(warmup_epochs=10, steps_per_epoch=1, total_steps=15) == 1  # floor of 1.5
    assert warmup_steps_for(warmup_epochs=0, steps_per_epoch=100, total_steps=2000) == 0
    with pytest.raises(ValueError):
        warmup_steps_for(warmup_epochs=1, steps_per_epoch=10, total_steps=0)


def test_lr_at_end_points_and_shape():
    peak, warmup, total = 2.0, 10, 100
    lrs = [lr_at(s, peak_lr=peak, warmup_steps=warmup, total_steps=total) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)  # the last warm-up step reaches the peak
    assert lrs[warmup] == pytest.approx(peak)  # cosine starts at the peak
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    assert lrs[total] == 0.0
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(peak / 2)


def test_lr_at_without_warmup_and_with_all_warmup():
    assert lr_at(0, peak_lr=1.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
    assert lr_at(10, peak_lr=1.0, warmup_steps=0, total_steps=10) == 0.0
    assert lr_at(9, peak_lr=1.0, warmup_steps=10, total_steps=10) == pytest.approx(1.0)
    assert lr_at(10, peak_lr=1.0, warmup_steps=10, total_steps=10) == 0.0


@pytest.mark.parametrize(
    "step,warmup,total", [(0, 0, 0), (0, 1, -5), (0, 11, 10), (0, -1, 10), (-1, 2, 10), (11, 2, 10)]
)
def test_lr_at_rejects_bad_schedules(step, warmup, total):
    with pytest.raises(ValueError):
        lr_at(step, peak_lr=1.0, warmup_steps=warmup, total_steps=total)
