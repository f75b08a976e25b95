"""The layout rules of docs/architecture.md, checked on the source: the engine imports nothing of the
layers above it, no module imports another module's private names or assigns to another module's
attributes, and no function is longer than 80 lines. Also the pipelines' shared guidance keywords."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import gen, quiet

import attnguide
from attnguide.pipelines.options import GuidanceOptions
from attnguide.tiny_models import tiny_sd_components

SRC = Path(attnguide.__file__).parent
MODULES = sorted(SRC.rglob("*.py"))


def _package(path: Path) -> list[str]:
    return ["attnguide", *path.relative_to(SRC).parent.parts]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every ``from ... import`` in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(path)[: len(_package(path)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
    return out


def test_the_engine_imports_nothing_of_the_layers_above():
    for path in (SRC / "engine").rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("attnguide.pipelines", "attnguide.apps", "attnguide.tiny")), (
                f"{path.name} imports {module}"
            )


def test_no_private_name_is_imported_from_another_module():
    for path in MODULES:
        for module, names in _imports(path):
            if module.startswith("attnguide"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(SRC)} imports {private} from {module}"


def test_no_module_assigns_to_another_modules_attribute():
    for path in MODULES:
        tree = ast.parse(path.read_text())
        imported = {
            a.asname or a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        imported |= {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    value = t.value.id
                    is_module = value in imported and value[:1].islower() and value not in ("torch",)
                    assert not (is_module and value != "self"), (
                        f"{path.name}:{node.lineno} assigns {value}.{t.attr}"
                    )


def test_no_function_is_longer_than_80_lines():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path.relative_to(SRC)}:{node.lineno} {node.name} has {length} lines"


@pytest.mark.parametrize(
    "cls",
    [
        attnguide.StableDiffusionSAGPipeline,
        attnguide.StableDiffusionPAGPipeline,
        attnguide.StableDiffusionXLSAGPipeline,
        attnguide.StableDiffusionXLPAGPipeline,
        attnguide.DDPMSAGPipeline,
        attnguide.DiTSAGPipeline,
    ],
)
def test_every_pipeline_declares_every_guidance_option(cls):
    params = inspect.signature(cls.__call__).parameters
    assert set(GuidanceOptions.names()) <= set(params)
    assert params["sag_scale"].default == (0.0 if "PAG" in cls.__name__ else 0.75)


def test_unknown_keyword_is_refused_before_any_model_call():
    comps = tiny_sd_components(0)
    pipe = quiet(attnguide.StableDiffusionSAGPipeline(**comps))
    calls = []
    h = comps["unet"].conv_in.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(TypeError, match="sag_scael"):
            pipe("a cat", num_inference_steps=2, generator=gen(0), sag_scael=0.5)
    finally:
        h.remove()
    assert calls == []


def test_pag_pipeline_constructor_takes_layers_by_position_and_keyword():
    comps = tiny_sd_components(0)
    order = list(inspect.signature(attnguide.StableDiffusionPAGPipeline.__init__).parameters)[1:]
    args = [comps.get(k) for k in order[:-2]] + [False, ["down", "mid"]]
    by_position = attnguide.StableDiffusionPAGPipeline(*args)
    by_keyword = attnguide.StableDiffusionPAGPipeline(**comps, pag_applied_layers=["down", "mid"])
    assert by_position.pag_applied_layers == by_keyword.pag_applied_layers == ["down", "mid"]
    assert torch.equal(next(by_position.unet.parameters()), next(by_keyword.unet.parameters()))
