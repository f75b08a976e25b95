"""CUDA-graph replay of the model passes of a sampling run (a speed-up only: same kernels, same results)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .attention import GuidanceState

ModelFn = Callable[[Tensor, Tensor, Sequence[str]], Tensor]


def graph_safe(model: nn.Module) -> bool:
    """False where replaying a captured graph would skip work the model does in Python at each call:
    forward hooks (user hooks, accelerate's offloading hooks that move weights)."""
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return False
    from torch.nn.modules import module as _module

    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks)


class CudaGraphPasses:
    """Replays the model passes of a sampling run from CUDA graphs.

    At batch sizes where the device waits on the host (Stable Diffusion at batch 1: a UNet call is about
    five thousand operator launches), launching is most of a step's time. Each distinct pass (branches,
    shapes, and the processors' state: map capture, perturbed rows) runs eagerly once, is captured into a
    CUDA graph the second time, and is replayed from then on. The model function's own tensors (prompt
    embeddings, labels) must stay the same while graphs live: a pipeline that changes them calls
    :meth:`reset`. The graphs and their memory are dropped when the run ends. A pass that cannot be
    captured falls back to eager for the rest of the run, with a warning.
    """

    def __init__(self, state: GuidanceState):
        self.state = state
        self.enabled = True
        self._graphs: dict[tuple, tuple] = {}
        self._seen: set[tuple] = set()

    def reset(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __call__(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str], inputs_key: tuple = ()
    ) -> Tensor:
        """``model_fn(x, t, branches)``, replayed from a graph after its first two calls with the same
        branches, shapes, processor state and ``inputs_key`` (the model function's other inputs)."""
        if not (self.enabled and x.is_cuda):
            return model_fn(x, t, branches)
        if not isinstance(t, Tensor) or t.device != x.device:
            t = torch.as_tensor(t).to(x.device)
        st = self.state
        key = (tuple(branches), tuple(x.shape), x.dtype, tuple(t.shape), t.dtype)
        key += (
            st.capture,
            st.capture_rows,
            tuple(sorted(st.groups.items())),
            tuple(sorted(st.everywhere)),
            st.batch_rows,
        )
        key += (inputs_key,)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first time: eager (also the warm-up the capture needs)
                self._seen.add(key)
                return model_fn(x, t, branches)
            entry = self._capture(key, model_fn, x, t, branches)
            if entry is None:
                return model_fn(x, t, branches)
        graph, static_x, static_t, static_out, maps = entry
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        if maps:
            st.maps.update({name: (agg.clone(), grid) for name, (agg, grid) in maps.items()})
        return static_out.clone()

    def _capture(self, key, model_fn: ModelFn, x: Tensor, t: Tensor, branches: Sequence[str]):
        static_x, static_t = x.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        # The maps a capture records are the graph's output buffers (filled at each replay); the maps
        # recorded earlier in this step stay as they were.
        maps = self.state.maps
        earlier = dict(maps)
        maps.clear()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = model_fn(static_x, static_t, branches)
        except Exception as err:
            self.enabled = False
            self.reset()
            warnings.warn(
                f"attnguide: CUDA graph capture failed ({type(err).__name__}: {err}); "
                "running the model eagerly for the rest of this run",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        finally:
            recorded = dict(maps)
            maps.clear()
            maps.update(earlier)
        entry = (graph, static_x, static_t, static_out, recorded)
        self._graphs[key] = entry
        return entry
