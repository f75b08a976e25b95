"""The evaluation's paper settings (scale sweep and masking at blur sigma 3), the random token-block mask in
the guided step, and the compute-matched arms of the "cfg" experiment: CFG at SAG's guidance strength
(measured, checked against a hand computation) and the unguided sampler at twice the steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import attnguide.apps.eval as evaluate
from attnguide.apps.arms import Arm
from attnguide.apps.eval import Sampler, build_experiments
from attnguide.apps.eval.experiments import (
    DEFAULT_SAG_SIGMAS,
    DEFAULT_SCALES,
    best_sigma,
    blur_kernel_for,
    matched_sag_arms,
    unique_arms,
    with_matched_cfg,
)
from attnguide.apps.eval.matching import matched_cfg_weight, measure_update_norms, update_norms
from attnguide.engine.degrade import gaussian_blur_2d
from attnguide.engine.guidance import SAG
from attnguide.engine.step import Guider, sample_loop
from attnguide.pipelines.schedulers import scheduler_from_name

NULL = 10  # the tiny model's null label (11 class embeddings)


def _build(names, *, conditional_model=True, **kw):
    base = dict(sag_scale=0.75, cfg_scale=1.5, pag_scale=1.0, scales=DEFAULT_SCALES, sigmas=(1.0, 3.0))
    return build_experiments(names, image_size=28, conditional_model=conditional_model, **{**base, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the evaluation tests run (the tiny UNet gains nothing from more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_unet():
    """A tiny random class-conditional 28x28 UNet (mid-block attention on a 7x7 grid) and its scheduler."""
    from attnguide.apps.train import make_mnist_scheduler, make_mnist_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = make_mnist_unet(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4)
    return unet.eval(), make_mnist_scheduler()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_unet) -> Path:
    """The tiny UNet as a bundled-layout model folder, with an untrained digit classifier."""
    from safetensors.torch import save_file

    from attnguide.apps.train import make_digit_classifier

    unet, scheduler = tiny_unet
    out = tmp_path_factory.mktemp("tiny-mnist-matching")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = make_digit_classifier(width=8, feature_dim=16)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": ["attnguide", "DDPMSAGPipeline"],
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index))
    (out / "classifier").mkdir()
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file(state, str(out / "classifier" / "model.safetensors"))
    (out / "classifier" / "config.json").write_text(json.dumps({"architecture": clf.config}))
    return out


# ------------------------------------------------------------------ paper settings of the experiments
def test_scale_sweep_runs_at_the_paper_sigma_by_default():
    rows = _build(["scale"])["scale"]
    assert DEFAULT_SAG_SIGMAS == (3.0,)
    assert [r.x for r in rows] == [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    assert [r.label for r in rows] == ["s=0", "s=0.05", "s=0.1", "s=0.2", "s=0.3", "s=0.5"]
    assert rows[0].arm == Arm() and rows[0].baseline is None
    k = blur_kernel_for(3.0, 28)
    assert k == 19  # odd, covering +-3 sigma
    for r in rows[1:]:
        assert (r.arm.sag_scale, r.arm.sag_sigma, r.arm.sag_kernel) == (r.x, 3.0, k)
        assert r.arm.sag_mask == "attention" and r.baseline == "s=0"


def test_scale_sweep_and_masking_at_two_sigmas():
    exps = _build(["scale", "masking"], scales=(-0.1, 0.0, 0.2), sag_sigmas=(3, 9, 3))
    scale = exps["scale"]
    assert [r.label for r in scale] == [
        "s=-0.1, sigma=3",
        "s=0",
        "s=0.2, sigma=3",
        "s=-0.1, sigma=9",
        "s=0.2, sigma=9",
    ]
    assert [r.arm.sag_kernel for r in scale if r.arm.uses_sag] == [19, 19, 55, 55]  # 55: capped at 28 px
    assert all(r.baseline == "s=0" for r in scale if r.label != "s=0")
    masking = exps["masking"]
    labels = [r.label for r in masking]
    assert labels[0] == "baseline" and len(labels) == 1 + 2 * 6 == len(set(labels))
    sigma3 = masking[1:7]
    assert [r.label for r in sigma3] == [
        "global (blur guidance), sigma=3",
        "high-frequency, sigma=3",
        "random, sigma=3",
        "random (token blocks), sigma=3",
        "square, sigma=3",
        "self-attention (SAG), sigma=3",
    ]
    assert [r.arm.sag_mask for r in sigma3] == [
        "global",
        "highfreq",
        "random",
        "random_tokens",
        "square",
        "attention",
    ]
    assert all(r.arm.sag_sigma == 9.0 and r.arm.sag_kernel == 55 for r in masking[7:])
    assert all(r.baseline == "baseline" and r.arm.sag_scale == 0.75 for r in masking[1:])


def test_masking_default_labels_and_calibrated_masks():
    rows = _build(["masking"])["masking"]
    assert [r.label for r in rows] == [
        "baseline",
        "global (blur guidance)",
        "high-frequency",
        "random",
        "random (token blocks)",
        "square",
        "self-attention (SAG)",
    ]
    assert all(r.arm.sag_sigma == 3.0 and r.arm.sag_kernel == 19 for r in rows[1:])
    needs = [r.label for r in rows if r.arm.needs_calibration]
    assert needs == ["high-frequency", "random", "random (token blocks)", "square"]


@pytest.mark.parametrize("bad", [(), (0.0,), (-3.0,), (math.inf,), (3.0, math.nan)])
def test_sag_sigmas_are_checked(bad):
    with pytest.raises(ValueError, match="`sag_sigmas`"):
        _build(["scale"], sag_sigmas=bad)


def test_best_sigma_reads_the_sigma_experiment():
    def row(sigma, fid, uses_sag=True, average=False):
        return {
            "uses_sag": uses_sag,
            "spec": {"sag_sigma": sigma, "sag_average": average},
            "metrics": {"fid": fid},
        }

    rows = [
        row(1.0, 9.0, uses_sag=False),
        row(1.0, 5.0),
        row(3.0, 4.0),
        row(9.0, 4.5),
        row(1.0, 1.0, average=True),
    ]
    assert best_sigma({"experiments": {"sigma": {"rows": rows}}}) == 3.0
    rows.append(row(27.0, math.nan))
    assert best_sigma({"experiments": {"sigma": {"rows": rows}}}) == 3.0
    with pytest.raises(ValueError, match="`results`"):
        best_sigma({"experiments": {"table1": {"rows": rows}}})
    for broken in ([], {"experiments": {"sigma": {"rows": [{"uses_sag": True, "metrics": {"fid": 1.0}}]}}}):
        with pytest.raises(ValueError, match="`results`"):
            best_sigma(broken)


# ------------------------------------------------------------------ compute-matched entries
def test_cfg_experiment_lists_the_compute_matched_arms():
    rows = _build(["cfg"])["cfg"]
    by = {r.label: r for r in rows}
    assert len(by) == len(rows)
    u_sag, c_sag = Arm(sag_scale=0.75), Arm(conditional=True, sag_scale=0.75)
    cfg_sag = Arm(conditional=True, cfg_scale=1.5, sag_scale=0.75)
    want = {
        "uncond, 2x steps": (Arm(steps_multiplier=2), "uncond"),
        "SAG vs uncond, 2x steps": (u_sag, "uncond, 2x steps"),
        "cond + SAG": (c_sag, "cond"),
        "cond, 2x steps": (Arm(conditional=True, steps_multiplier=2), "cond"),
        "cond + SAG vs cond, 2x steps": (c_sag, "cond, 2x steps"),
        "cond + SAG vs matched CFG": (c_sag, "CFG matched to cond + SAG"),
        "CFG + SAG vs matched CFG": (cfg_sag, "CFG matched to CFG + SAG"),
    }
    for label, (arm, baseline) in want.items():
        assert (by[label].arm, by[label].baseline) == (arm, baseline), label
    assert by["CFG + SAG"].arm == cfg_sag  # the same samples as the existing row
    assert (
        by["CFG matched to cond + SAG"].match_sag == c_sag
        and by["CFG matched to cond + SAG"].baseline == "cond"
    )
    assert (
        by["CFG matched to CFG + SAG"].match_sag == cfg_sag
        and by["CFG matched to CFG + SAG"].baseline == "CFG"
    )
    assert (
        Arm(steps_multiplier=2).key == "u-2xsteps"
        and Arm(steps_multiplier=2).canonical().steps_multiplier == 2
    )
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`steps_multiplier`"):
            Arm(steps_multiplier=bad)

    # The matched weights are measured first; then each matched arm is CFG at its own weight.
    exps = {"cfg": rows}
    with pytest.raises(ValueError, match="not measured yet"):
        unique_arms(exps)
    assert list(matched_sag_arms(exps)) == [c_sag.key, cfg_sag.key]
    with pytest.raises(ValueError, match="`weights`"):
        with_matched_cfg(exps, {c_sag.key: 1.3})
    filled = with_matched_cfg(exps, {c_sag.key: 1.3, cfg_sag.key: 1.9})["cfg"]
    by = {r.label: r for r in filled}
    assert by["CFG matched to cond + SAG"].arm == Arm(conditional=True, cfg_scale=1.3)
    assert by["CFG matched to CFG + SAG"].arm == Arm(conditional=True, cfg_scale=1.9)
    arms = unique_arms({"cfg": filled})
    assert {"c-cfg1.3", "c-cfg1.9", "u-2xsteps", "c-2xsteps", "c-sag0.75"} <= set(arms)


def test_unconditional_model_keeps_only_the_steps_matched_rows():
    rows = _build(["cfg"], conditional_model=False)["cfg"]
    assert not any(r.arm.conditional or r.match_sag is not None for r in rows)
    assert [r.label for r in rows][-2:] == ["uncond, 2x steps", "SAG vs uncond, 2x steps"]
    assert unique_arms({"cfg": rows})  # nothing to measure


# ------------------------------------------------------------------ the matched CFG weight
def test_matched_cfg_weight_by_hand():
    sag = np.array([[1.0, 2.0], [3.0, 4.0]])  # ||d_sag|| per sample and step
    cfg = np.array([[1.0, 4.0], [2.0, 2.0]])  # ||c - u||
    r = matched_cfg_weight(sag, cfg)
    assert r["ratio"] == pytest.approx(2.5 / 2.25)
    assert r["weight"] == 2.111  # 1 + 1.111..., 4 significant digits
    assert r["mean_of_ratios"] == pytest.approx((1 + 0.5 + 1.5 + 2) / 4)
    assert (r["sag_update_norm"], r["cfg_difference_norm"]) == (2.5, 2.25)
    assert matched_cfg_weight(sag, cfg, base_weight=1.5)["weight"] == 2.611  # on top of the arm's own CFG
    with pytest.raises(ValueError, match="`cfg_norms`"):
        matched_cfg_weight(sag, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="`sag_norms`"):
        matched_cfg_weight(sag, cfg[:1])
    x = torch.tensor([[[3.0, 4.0]], [[0.0, -2.0]]])
    np.testing.assert_allclose(update_norms(x), [5.0, 2.0])


def _one_step_by_hand(unet, scheduler, indices, s, cfg_w):
    """||d_sag|| and ||c - u|| of one DDIM step of blur guidance (global mask, sigma 1, kernel 9), by hand:
    x0 = (x - b eps) / a, x_deg = a blur(x0) + b eps, with eps the SAG reference (u with CFG, else c)."""
    sched = scheduler_from_name("ddim", scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    x = torch.cat([torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(i)) for i in indices])
    cond = torch.tensor([i % 10 for i in indices])
    null = torch.full_like(cond, NULL)
    c, u = unet(x, t, class_labels=cond).sample, unet(x, t, class_labels=null).sample
    ref, ref_labels = (u, null) if cfg_w is not None else (c, cond)
    abar = sched.alphas_cumprod[int(t)]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x0 = (x - b * ref) / a
    x_deg = a * gaussian_blur_2d(x0, 9, 1.0) + b * ref
    d = s * (ref - unet(x_deg, t, class_labels=ref_labels).sample)
    return update_norms(d), update_norms(c - u)


@pytest.mark.parametrize("cfg_w", [None, 2.0])
@torch.no_grad()
def test_update_norms_of_one_step_equal_the_hand_computation(tiny_unet, cfg_w):
    unet, scheduler = tiny_unet
    sampler = Sampler(unet, scheduler.config, "ddim", 1, 0, "cpu", 11)
    arm = Arm(conditional=True, cfg_scale=cfg_w, sag_scale=0.5, sag_mask="global")
    sag, cfg = measure_update_norms(sampler, arm, [3, 4, 5], 0)
    assert sag.shape == cfg.shape == (3, 1)
    want_sag, want_cfg = _one_step_by_hand(unet, scheduler, [3, 4, 5], 0.5, cfg_w)
    np.testing.assert_allclose(sag[:, 0], want_sag, rtol=1e-4)
    np.testing.assert_allclose(cfg[:, 0], want_cfg, rtol=1e-4)
    assert (sag > 0).all() and (cfg > 0).all()
    with pytest.raises(ValueError, match="`sag_arm`"):
        measure_update_norms(sampler, Arm(sag_scale=0.5), [0], 0)


@torch.no_grad()
def test_update_norms_over_a_trajectory_follow_the_sampler(tiny_unet):
    """Over 3 steps the measurement samples the SAG arm's own trajectory: the extra unconditional pass does
    not change it, so the last step's reference equals that of the sampler's images."""
    unet, scheduler = tiny_unet
    sampler = Sampler(unet, scheduler.config, "ddim", 3, 0, "cpu", 11)
    arm = Arm(conditional=True, sag_scale=0.75)
    sag, cfg = measure_update_norms(sampler, arm, [0, 1], 0)
    assert sag.shape == (2, 3) and np.isfinite(sag).all() and (cfg > 0).all()
    again, _ = measure_update_norms(sampler, arm, [1], 0)
    np.testing.assert_allclose(again[0], sag[1], rtol=1e-4)  # a sample's norms do not depend on its batch


# ------------------------------------------------------------------ the token-block mask in the step
def _token_masks(unet, scheduler, seed: int) -> torch.Tensor:
    """The SAG masks (steps, B, 1, 28, 28) of a 2-step unconditional run with mask="random_tokens"."""
    sched = scheduler_from_name("ddim", scheduler.config)
    sched.set_timesteps(2)
    sag = SAG(scale=0.5, mask="random_tokens", mask_fraction=0.3)
    guider = Guider(unet, sched, sag=sag, record_masks=True, generator=torch.Generator().manual_seed(seed))
    seen = []
    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    labels = torch.full((2,), NULL)

    def model_fn(x, t, branches):
        return unet(x, t, class_labels=labels).sample

    sample_loop(guider, model_fn, x, callback=lambda i, t, lat: seen.append(guider.last_mask.clone()))
    assert guider.capture["sag"] == ["mid_block.attentions.0"]
    return torch.stack(seen)


@torch.no_grad()
def test_random_token_mask_follows_the_sag_layer_grid(tiny_unet):
    """Guider with mask="random_tokens": the mask is constant on the 4x4 pixel blocks of the mid block's
    7x7 token grid, covers round(f * 49) tokens per image at every step, and is drawn from the generator."""
    m = _token_masks(*tiny_unet, seed=0)
    assert m.shape == (2, 2, 1, 28, 28) and set(m.unique().tolist()) == {0.0, 1.0}
    blocks = m.reshape(2, 2, 7, 4, 7, 4)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()  # one value per token block
    assert (blocks[:, :, :, 0, :, 0].sum(dim=(-2, -1)) == round(0.3 * 49)).all()
    assert not torch.equal(m[0], m[1])  # a new draw at every step
    assert torch.equal(m, _token_masks(*tiny_unet, seed=0))
    assert not torch.equal(m, _token_masks(*tiny_unet, seed=1))


# ------------------------------------------------------------------ the evaluation's calibration
def _evaluation(model: Path, out: Path, names: list[str]):
    from attnguide.apps.eval.cli import build_parser
    from attnguide.apps.eval.distributed import Dist

    argv = [",".join(names), "--out", str(out), "--model", str(model), "--device", "cpu"]
    argv += ["--num-samples", "8", "--batch-size", "4", "--steps", "2", "--calibration-samples", "6"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    logged: list[str] = []
    ev = evaluate.Evaluation(args, names, (), (), "cpu", Dist(), logged.append)
    ev.prepare_folders()
    return ev, ev.load(), logged


def test_calibration_measures_the_matched_weights_and_the_mask_fraction(tiny_model, tmp_path, capsys):
    """Evaluation.calibrate: each matched CFG arm gets w0 + ratio measured on the calibration samples
    (6: one full shard and part of the next), kept in matching.json and reused by a resumed run; the
    token-block mask gets the attention mask's fraction of the masking experiment's SAG arm (sigma 3)."""
    ev, exps, logged = _evaluation(tiny_model, tmp_path / "e", ["masking", "cfg"])
    calibrated, cal = ev.calibrate(exps)
    matched = cal["matched_cfg"]
    assert set(matched) == {"c-sag0.75", "c-cfg1.5-sag0.75"}
    for key, base in (("c-sag0.75", 1.0), ("c-cfg1.5-sag0.75", 1.5)):
        rec = matched[key]
        assert (rec["samples"], rec["steps"], rec["base_weight"]) == (6, 2, base)
        assert rec["ratio"] == pytest.approx(rec["sag_update_norm"] / rec["cfg_difference_norm"])
        assert rec["weight"] == float(f"{base + rec['ratio']:.4g}") and rec["ratio"] > 0
        assert any(f"CFG matched to {key}" in line for line in logged)
    # The measurement is the one of matching.py on the same samples and shards.
    c_sag = Arm(conditional=True, sag_scale=0.75)
    parts = [
        measure_update_norms(ev.sampler, c_sag, range(4), 0),
        measure_update_norms(ev.sampler, c_sag, range(4, 6), 1),
    ]
    want = matched_cfg_weight(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert matched["c-sag0.75"]["ratio"] == pytest.approx(want["ratio"], rel=1e-6)

    rows = {r.label: r for r in calibrated["cfg"]}
    assert rows["CFG matched to cond + SAG"].arm == Arm(
        conditional=True, cfg_scale=matched["c-sag0.75"]["weight"]
    )
    assert rows["CFG matched to CFG + SAG"].arm.cfg_scale == matched["c-cfg1.5-sag0.75"]["weight"]
    assert cal["arm"] == "u-sag0.75-sigma3-k19" and cal["mask_fractions"] == {
        cal["arm"]: cal["attention_mask_fraction"]
    }
    token = next(r for r in calibrated["masking"] if r.label == "random (token blocks)")
    assert token.arm.sag_fraction == cal["attention_mask_fraction"] and 0 < token.arm.sag_fraction < 1
    unique_arms(calibrated)  # every arm can be sampled now
    saved = ev.shard_dir / "matching.json"
    assert json.loads(saved.read_text())["arms"] == matched
    assert json.loads((ev.shard_dir / "calibration.json").read_text()) == cal

    # Resumed: the weights come from matching.json (nothing measured); a file of another run is redone.
    ev2, exps2, logged2 = _evaluation(tiny_model, tmp_path / "e", ["masking", "cfg"])
    assert ev2.calibrate(exps2)[1] == cal and not any("CFG matched" in line for line in logged2)
    record = json.loads(saved.read_text())
    saved.write_text(json.dumps({**record, "config_digest": "another"}))
    ev3, exps3, logged3 = _evaluation(tiny_model, tmp_path / "e", ["masking", "cfg"])
    assert ev3.calibrate(exps3)[1]["matched_cfg"] == matched
    assert "records another run" in capsys.readouterr().err and any("CFG matched" in line for line in logged3)
