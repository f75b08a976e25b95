"""Forward hooks on whole blocks, for the terms that act around a block rather than inside one attention
call (TPG shuffles the tokens entering its blocks, SLG skips its blocks): each term's
:meth:`~attnguide.engine.terms.Term.before_block` or :meth:`~attnguide.engine.terms.Term.after_block` on
the rows of its own branch in a batched model call (``GuidanceState.groups``). :class:`BlockHooks`
registers the hooks for a guided run and always removes them. Which blocks:
:func:`attnguide.engine.layers.resolve_blocks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .attention import GuidanceState
from .terms.base import Term

__all__ = ["BlockHooks"]


def _input(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class BlockHooks:
    """Forward hooks on blocks for the terms that act on whole blocks, each on the rows of its own branch
    only; a context manager that always removes them. ``generator``: the run's randomness (TPG's
    permutations, one per block and pass)."""

    def __init__(self, model: nn.Module, state: GuidanceState, generator: torch.Generator):
        self.model, self.state, self.generator = model, state, generator
        self._modules = dict(model.named_modules())
        self._handles: list[Any] = []

    def install(self, acting: Mapping[str, tuple[Term, Iterable[str]]]) -> None:
        """Hook each term's blocks (``acting``: term name -> (term, block paths))."""
        for name, (term, blocks) in acting.items():
            for block in blocks:
                module = self._modules[block]
                if term.block_hook == "before":
                    hook = lambda m, a, kw, name=name, term=term: self._before(name, term, a, kw)  # noqa: E731
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = lambda m, a, kw, out, name=name, term=term: self._after(name, term, m, a, kw, out)  # noqa: E731
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> BlockHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _rows(self, name: str, batch: int) -> slice | None:
        st = self.state
        if name in st.everywhere:
            return slice(0, batch) if st.this_thread() else None
        span = st.groups.get(name)
        if span is None or not st.this_thread():
            return None
        return slice(st.layer_rows(span[0], batch), st.layer_rows(span[1], batch))

    def _before(self, name: str, term: Term, args: tuple, kwargs: dict):
        x = _input(args, kwargs, "hidden_states", 0)
        rows = self._rows(name, x.shape[0]) if isinstance(x, Tensor) and x.ndim in (3, 4) else None
        if rows is None:
            return None
        tokens = x if x.ndim == 3 else x.flatten(2).transpose(1, 2)  # a feature map's pixels are its tokens
        changed = tokens.clone()
        changed[rows] = term.before_block(tokens[rows], self.generator)
        if x.ndim == 4:
            changed = changed.transpose(1, 2).reshape(x.shape)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": changed}
        return (changed, *args[1:]), kwargs

    def _after(self, name: str, term: Term, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        x = _input(args, kwargs, "hidden_states", 0)
        rows = self._rows(name, x.shape[0]) if isinstance(x, Tensor) else None
        if rows is None:
            return None
        if isinstance(output, Tensor):
            out = output.clone()
            out[rows] = term.after_block(x[rows], output[rows])
            return out
        return self._after_streams(
            name, term, x, _input(args, kwargs, "encoder_hidden_states", 1), rows, output
        )

    @staticmethod
    def _after_streams(name: str, term: Term, x: Tensor, enc_in: Any, rows: slice, output: Any):
        """A block returning several streams (joint blocks: (text, image) as SD3, Flux, AuraFlow, or
        (image, text) as CogView4): each output placed by its shape against the block's inputs, the
        image stream and the text stream each continuing its own input. ValueError where the order
        cannot be read (no output of the image's shape, or text and image of the same shape)."""
        inputs = [v for v in (x, enc_in) if isinstance(v, Tensor)]
        if not isinstance(output, (tuple, list)) or not any(
            isinstance(p, Tensor) and p.shape == x.shape for p in output
        ):
            raise ValueError(f"`{term.name}_layers`: block {name!r} returns no output of its input's shape")
        if len(inputs) == 2 and inputs[0].shape == inputs[1].shape:
            raise ValueError(
                f"`{term.name}_layers`: block {name!r} takes text and image streams of the same shape "
                f"{tuple(x.shape)}, so which output continues which cannot be read; choose another layer"
            )
        parts = list(output)
        for i, part in enumerate(parts):
            source = next((v for v in inputs if isinstance(part, Tensor) and v.shape == part.shape), None)
            if source is not None:
                parts[i] = part.clone()
                parts[i][rows] = term.after_block(source[rows], part[rows])
        return type(output)(parts)
