"""attnguide.guide() on every diffusers pipeline family of tests/tiny_families.py (tiny, offline), CFG off
and on, SAG and PAG: the output differs from the unguided run, a term at scale 1e-6 reproduces it
(within 1e-4: the processors and the guided forward never change the model), everything is restored
afterwards, and PAG equals diffusers' own PAG pipeline where diffusers has one."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import in_threads
from tiny_families import FAMILIES, NO_PAG, cfg_kwargs, instantiate

import attnguide
from attnguide import APG, FDG, NAG, PAG, PLADIS, SAG, TCFG, CFGZeroStar, GuidanceInterval
from attnguide.engine.guidance import SEG, SLG, TPG
from attnguide.engine.layers import cross_attention_layers

TINY = 1e-6
TERMS = {
    "sag": lambda s: {"sag": SAG(scale=s)},
    "pag": lambda s: {"pag": PAG(scale=s)},
    "seg": lambda s: {"seg": SEG(scale=5 * s)},  # a weak term on tiny models: a larger scale shows it
    "tpg": lambda s: {"tpg": TPG(scale=s)},
    "slg": lambda s: {"slg": SLG(scale=s, window=(0.0, 1.0))},
    "pladis": lambda s: {"pladis": PLADIS(scale=s)},
    # the CFG rules: each needs CFG; the interval's window makes the later steps unguided
    "apg": lambda s: {"apg": APG(scale=s)},
    "zerostar": lambda s: {"zerostar": CFGZeroStar(scale=s)},
    "tcfg": lambda s: {"tcfg": TCFG(scale=s)},
    "fdg": lambda s: {"fdg": FDG(scale=s)},
    "interval": lambda s: {"interval": GuidanceInterval(scale=s, sigmas=(0.0, 1e9), window=(0.5, 1.0))},
    # NAG with CFG's negative prompt (tests/test_nag.py gives explicit ones and checks the authors' code)
    "nag": lambda s: {"nag": NAG(scale=s)},
}
RULES = {name for name, make in TERMS.items() if next(iter(make(1.0).values())).rule}
#: Families whose guidance weight is an embedding, not a CFG batch (a CFG rule has nothing to work on).
EMBEDDED_GUIDANCE = {"lcm"}
#: Families whose default layer holds text and image tokens in one sequence, in an order attnguide does
#: not read yet (Lumina2's trunk, AuraFlow's single-stream blocks): SAG and SEG are refused there.
MIXED_SEQUENCE = {"lumina2", "auraflow"}
PAG_SCALE = 2.0


@functools.cache
def _family(name: str):
    """(spec, plain pipeline) of a family, built once per test session."""
    spec = FAMILIES[name]()
    return spec, instantiate(spec)


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _processors(module: torch.nn.Module) -> dict[str, int]:
    from attnguide.engine.layers import self_attention_layers

    return {name: id(m.processor) for name, m in module.named_modules() if hasattr(m, "processor")} | {
        "n_self": len(self_attention_layers(module))
    }


def _output(result) -> torch.Tensor:
    for field in ("images", "frames"):
        value = getattr(result, field, None)
        if value is not None:
            return torch.as_tensor(value).float()
    return torch.as_tensor(result[0]).float()


def _call(pipe, spec, cfg: bool, **extra) -> torch.Tensor:
    kw = dict(spec["call"], generator=torch.Generator().manual_seed(0), **cfg_kwargs(spec, cfg), **extra)
    return _output(pipe(**kw))


def _guided(pipe, spec, cfg: bool, **terms) -> torch.Tensor:
    with attnguide.guide(pipe, **terms):
        return _call(pipe, spec, cfg)


def _has_text(den) -> bool:
    """Whether the image attends to a text input in ``den`` (cross-attention or joint attention)."""
    import inspect

    from attnguide.engine.layers import self_attention_layers

    takes = "encoder_hidden_states" in inspect.signature(type(den).forward).parameters
    joint = any(getattr(m, "add_k_proj", None) is not None for m in self_attention_layers(den).values())
    return takes and (bool(cross_attention_layers(den)) or joint)


CASES = [(name, cfg) for name in FAMILIES for cfg in (False, True)]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[f"{n}-cfg{int(c)}" for n, c in CASES])
def test_guided_family(name, cfg):
    spec, pipe = _family(name)
    if cfg and spec["cfg_scale"] is None:
        pytest.skip("this pipeline has no classifier-free guidance")
    den = _denoiser(pipe)
    before = _processors(den)
    unguided = _call(pipe, spec, cfg)
    for term, make in TERMS.items():
        if term == "sag" and name == "sd_latent_upscale":
            with pytest.raises(ValueError, match="SAG cannot guide"):  # before any model call
                _guided(pipe, spec, cfg, **make(0.75))
            continue
        if term in ("sag", "seg") and name in MIXED_SEQUENCE:
            with pytest.raises(ValueError, match="cannot place"):
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        if term == "seg" and name == "sana":
            with pytest.raises(ValueError, match="linear attention"):  # before any model call
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        if term in RULES and (not cfg or spec["separate_cfg"] or name in EMBEDDED_GUIDANCE):
            why = "is a CFG rule"  # without CFG; with CFG in two calls (Flux even without it: known ahead)
            if spec["separate_cfg"]:
                why = "separate denoiser calls" if cfg else "separate denoiser calls|is a CFG rule"
            with pytest.raises(ValueError, match=why):
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        if term == "nag" and not _has_text(den):
            with pytest.raises(ValueError, match="NAG needs a text-conditioned model"):
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        if term == "nag" and (not cfg or spec["separate_cfg"] or name in EMBEDDED_GUIDANCE):
            with pytest.raises(ValueError, match="NAG needs a negative prompt"):  # no CFG negative here
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        if term == "pladis" and not cross_attention_layers(den):  # joint attention, class embeddings
            with pytest.raises(ValueError, match="no cross-attention layer"):  # before any model call
                _guided(pipe, spec, cfg, **make(1.0))
            continue
        guided = _guided(pipe, spec, cfg, **make(1.0))
        assert torch.isfinite(guided).all(), term
        assert (guided - unguided).abs().max() > 1e-3, f"{term} changed nothing"
        tiny = _guided(pipe, spec, cfg, **make(TINY))
        torch.testing.assert_close(tiny, unguided, rtol=0, atol=1e-4, msg=f"{term} at scale 1e-6")
        assert _processors(den) == before and "forward" not in den.__dict__
        assert "encode_prompt" not in pipe.__dict__
    zero = {name: make(0.0)[name] for name, make in TERMS.items() if name != "sag"}  # scale 0: the identity
    torch.testing.assert_close(_guided(pipe, spec, cfg, **zero), unguided, rtol=0, atol=0, msg="scale 0")
    torch.testing.assert_close(_call(pipe, spec, cfg), unguided, rtol=0, atol=0)  # nothing left behind


PAG_CASES = [(name, cfg) for name, build in FAMILIES.items() for cfg in (False, True) if name not in NO_PAG]


@pytest.mark.parametrize(("name", "cfg"), PAG_CASES, ids=[f"{n}-cfg{int(c)}" for n, c in PAG_CASES])
def test_guided_pag_equals_diffusers_pag_pipeline(name, cfg):
    """guide(plain pipeline, pag=PAG(layers=L)) gives diffusers' own PAG pipeline's output for layers L."""
    spec, pipe = _family(name)
    if not cfg and not spec["pag_without_cfg"]:
        pytest.skip("diffusers' PAG pipeline of this family needs CFG on")
    reference = instantiate(spec, pag=True)  # the same modules
    want = _call(reference, spec, cfg, pag_scale=PAG_SCALE)
    got = _guided(pipe, spec, cfg, pag=PAG(scale=PAG_SCALE, layers=reference.pag_applied_layers))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _counting(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_unknown_cfg_layout_and_bare_denoisers_need_cfg_layout():
    """Where the CFG branches sit cannot be known (a pipeline of one's own with a guidance_scale but no
    encode_prompt; a bare denoiser): ValueError naming cfg_layout, before any model call."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from attnguide.tiny_models import tiny_unet_2d

    class MyPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        def __call__(self, guidance_scale: float = 3.0):
            raise AssertionError("not reached")

    unet = tiny_unet_2d(0).eval()
    calls = _counting(unet)
    for target, kw in ((MyPipeline(unet, DDIMScheduler()), {}), (unet, {"scheduler": DDIMScheduler()})):
        with pytest.raises(ValueError, match="cfg_layout"), attnguide.guide(target, sag=SAG(), **kw):
            pass
    with attnguide.guide(MyPipeline(unet, DDIMScheduler()), sag=SAG(), cfg_layout="none"):
        pass
    assert calls == []


def test_unplaceable_layouts_raise_before_any_model_call():
    """A denoiser whose output channels cannot be placed against its input (here 4 in, 5 out), and one
    without self-attention: ValueError naming what was found, before the first model call."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    def unet(**kw):
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=8,
            block_out_channels=(8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            **kw,
        ).eval()

    odd = unet(in_channels=4, out_channels=5, add_attention=True)
    calls = _counting(odd)
    odd_pipe = DDPMPipeline(odd, DDIMScheduler())
    with pytest.raises(ValueError, match="5 channels for an input"), attnguide.guide(odd_pipe, pag=PAG()):
        pass
    plain = unet(in_channels=3, out_channels=3, add_attention=False)
    plain_pipe = DDPMPipeline(plain, DDIMScheduler())
    with pytest.raises(ValueError, match="no self-attention"), attnguide.guide(plain_pipe, sag=SAG()):
        pass
    assert calls == []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_two_threads_on_one_pipeline_of_each_family_give_the_sequential_results(name):
    """Two threads, each guiding its own call of one pipeline (its own guide() block; the blocks take
    turns on the model): each result equals the same call made alone (SAG, PAG and, with CFG, APG's
    momentum), and nothing stays installed."""
    spec, pipe = _family(name)
    terms = {"pag": PAG(scale=1.0)}
    if name != "sd_latent_upscale" and name not in MIXED_SEQUENCE:  # SAG cannot guide that one (tested above)
        terms["sag"] = SAG(scale=1.0)
    if spec["cfg_scale"] is not None and not spec["separate_cfg"] and name not in EMBEDDED_GUIDANCE:
        terms["apg"] = APG()  # a CFG rule with state across the steps (its momentum), per thread and call
        if _has_text(_denoiser(pipe)):
            terms["nag"] = NAG()  # a branch of its own (CFG's negative prompt) mixed into the cond rows

    def call(seed: int) -> torch.Tensor:
        kw = dict(spec["call"], generator=torch.Generator().manual_seed(seed), **cfg_kwargs(spec, True))
        with attnguide.guide(pipe, **terms):
            return _output(pipe(**kw))

    sequential = [call(0), call(1)]
    results = [r[0] for r in in_threads(call, [[(0,)], [(1,)]])]
    for got, want in zip(results, sequential, strict=True):
        assert torch.equal(got, want)
    den = _denoiser(pipe)
    assert "forward" not in den.__dict__ and "encode_prompt" not in pipe.__dict__
    assert not any("Guided" in type(m.processor).__name__ for m in den.modules() if hasattr(m, "processor"))
