"""Smoke test of the tiny pipeline families of tests/tiny_families.py, with plain diffusers only: every
family runs with classifier-free guidance off and on, diffusers' PAG pipeline (where there is one) runs
on the same components, and every build is deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from tiny_families import FAMILIES, NO_PAG, build, instantiate

SPEC_KEYS = {
    "components",
    "pipeline",
    "pag_pipeline",
    "call",
    "cfg_arg",
    "cfg_scale",
    "cfg_off",
    "pag_without_cfg",
    "separate_cfg",
}


def _output(result) -> torch.Tensor:
    out = result.frames if hasattr(result, "frames") else result.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def _run(pipe, spec, guidance_scale, **kw) -> torch.Tensor:
    if guidance_scale is not None:
        kw[spec["cfg_arg"]] = guidance_scale
    out = _output(pipe(generator=gen(0), **spec["call"], **kw))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    return out


class _Cache:
    """Specs, plain pipelines and their outputs, built when first needed and shared by the tests."""

    def __init__(self):
        self._specs: dict[str, dict] = {}
        self._pipes: dict[str, object] = {}
        self._outs: dict[tuple[str, float | None], torch.Tensor] = {}

    def spec(self, name: str) -> dict:
        if name not in self._specs:
            self._specs[name] = FAMILIES[name]()
        return self._specs[name]

    def plain(self, name: str, guidance_scale: float | None) -> torch.Tensor:
        key = (name, guidance_scale)
        if key not in self._outs:
            if name not in self._pipes:
                self._pipes[name] = instantiate(self.spec(name))
            self._outs[key] = _run(self._pipes[name], self.spec(name), guidance_scale)
        return self._outs[key]


@pytest.fixture(scope="module")
def cache():
    return _Cache()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plain_pipeline_cfg_off_and_on(name, cache):
    spec = cache.spec(name)
    assert set(spec) == SPEC_KEYS
    assert (spec["pag_pipeline"] is None) == (name in NO_PAG)
    off = cache.plain(name, spec["cfg_off"])
    assert torch.equal(off, _run(instantiate(spec), spec, spec["cfg_off"]))  # deterministic
    if spec["cfg_scale"] is None:  # no guidance argument (DDPM)
        return
    assert spec["cfg_scale"] > 1
    on = cache.plain(name, spec["cfg_scale"])
    assert on.shape == off.shape
    assert (on - off).abs().max() > 1e-4


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in NO_PAG])
def test_diffusers_pag_pipeline(name, cache):
    spec = cache.spec(name)
    pag = instantiate(spec, pag=True)
    denoiser = pag.transformer if hasattr(pag, "transformer") else pag.unet
    processors = {k: id(v) for k, v in denoiser.attn_processors.items()}
    scales = [spec["cfg_scale"]]
    if spec["pag_without_cfg"]:
        scales.insert(0, spec["cfg_off"])
    for gs in scales:
        want = cache.plain(name, gs)
        assert torch.equal(_run(pag, spec, gs, pag_scale=0.0), want)  # PAG off is the plain pipeline
        guided = _run(pag, spec, gs, pag_scale=1.0)
        assert guided.shape == want.shape
        assert (guided - want).abs().max() > 1e-4
        assert {k: id(v) for k, v in denoiser.attn_processors.items()} == processors  # restored


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builds_are_deterministic(name, cache):
    a, b = cache.spec(name), FAMILIES[name]()
    assert a["components"].keys() == b["components"].keys()
    for key, module in a["components"].items():
        if isinstance(module, torch.nn.Module):
            sa, sb = module.state_dict(), b["components"][key].state_dict()
            assert sa.keys() == sb.keys(), key
            assert all(torch.equal(sa[k], sb[k]) for k in sa), key
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters()), key
    for key, value in a["call"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["call"][key]), key


def test_build_helper():
    pipe = build("sd_img2img", pag=True, pag_applied_layers=["mid"])
    assert type(pipe).__name__ == "StableDiffusionPAGImg2ImgPipeline"
    assert pipe._progress_bar_config == {"disable": True}
    assert pipe.pag_applied_layers == ["mid"]
    assert type(build("animatediff").unet).__name__ == "UNetMotionModel"
    with pytest.raises(ValueError, match="no PAG pipeline"):
        build("ddpm", pag=True)
    with pytest.raises(KeyError, match="unknown family"):
        build("nope")
