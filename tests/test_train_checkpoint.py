"""``attnguide train`` checkpoints: read with ``weights_only=True`` (a crafted pickle in ``--out`` does
not run and gives a clear message), and an interrupted run resumes to the same weights as one that was
not interrupted (also from a checkpoint in the format older versions wrote)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from attnguide.apps.train import CHECKPOINT_NAME, datasets, diffusion

TINY_UNET = {"block_out_channels": (8, 16, 16), "attention_head_dim": 8, "norm_num_groups": 4}


class _Payload:
    """Unpickling this writes ``marker`` (what a crafted checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _crafted(path: Path, marker: Path, *, torch_format: bool) -> None:
    payload = {"model": _Payload(marker), "step": 1}
    if torch_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def test_crafted_payload_would_run_code(tmp_path):
    """The payload is live: an unrestricted unpickler runs it (so the next test means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("torch_format", [False, True], ids=["pickle", "torch.save"])
def test_crafted_checkpoint_is_not_run(tmp_path, capsys, torch_format):
    from attnguide.apps.cli import main

    out, marker = tmp_path / "model", tmp_path / "ran"
    out.mkdir()
    _crafted(out / CHECKPOINT_NAME, marker, torch_format=torch_format)
    argv = [
        "train",
        "--out",
        str(out),
        "--dataset",
        "mnist",
        "--skip-classifier",
        "--steps",
        "2",
        "--batch-size",
        "2",
    ]
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    assert message.startswith(f"error: cannot resume from {out / CHECKPOINT_NAME}: ")
    assert "not a checkpoint that loads safely" in message and "nothing in it ran" in message
    assert "Move or delete it to train from scratch" in message
    assert not marker.exists()
    assert not (out / "unet").exists()  # stopped before training


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(32, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g)


def _train(out: Path, **kw) -> dict:
    opts = {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 100, "device": "cpu"}
    return diffusion.train_diffusion(out, unet_kwargs=TINY_UNET, **{**opts, **kw})


def _unet_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_mnist", _data)
    straight = tmp_path / "straight"
    _train(straight)

    out = tmp_path / "resumed"
    real_step = diffusion._optimisation_step
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the checkpoint at step 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(diffusion, "_optimisation_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(out)
    monkeypatch.setattr(diffusion, "_optimisation_step", real_step)
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["format"].startswith("attnguide-train-checkpoint")
    del ckpt["format"]  # the format older versions wrote
    torch.save(ckpt, ckpt_path)

    with pytest.raises(SystemExit, match=r"written by a run with --seed 0, not 1"):
        _train(out, seed=1)
    record = _train(out)
    assert record["steps"] == 4 and not ckpt_path.exists()
    a, b = _unet_weights(straight), _unet_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
