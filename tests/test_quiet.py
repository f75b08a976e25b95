"""What reaches a newcomer's terminal: `import attnguide` imports nothing heavy and prints nothing;
`attnguide --help` and `attnguide sample --help` print nothing on stderr; loading the bundled model from
Python prints no notice the user did not ask for (transformers' torchvision fallback, diffusers' advice
to install accelerate); `sample_loop` keeps no autograd graph (its memory stays small)."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_import_is_lazy_and_silent():
    done = _python(
        "import sys, attnguide; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]" and done.stderr == ""


def test_help_prints_nothing_on_stderr():
    for args in (["--help"], ["sample", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "attnguide", *args], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0 and done.stderr == "" and "usage: attnguide" in done.stdout


def test_loading_the_bundled_model_prints_no_unasked_notice():
    code = (
        "import attnguide\n"
        "from attnguide.apps.loading import BUNDLED_MODEL\n"
        "attnguide.DDPMSAGPipeline.from_pretrained(str(BUNDLED_MODEL)).set_progress_bar_config(disable=True)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    for noise in ("accelerate", "torchvision"):
        assert noise not in done.stderr and noise not in done.stdout


def test_the_public_bundled_model_loads_silently_from_anywhere(tmp_path):
    """``attnguide.bundled_pipeline()`` and ``bundled_classifier()`` need no path and no working folder
    (the README's classifier-guidance example runs from any folder), and print nothing."""
    code = (
        "import attnguide, torch\n"
        "pipe = attnguide.bundled_pipeline(scheduler='dpm')\n"
        "clf = attnguide.bundled_classifier()\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(2, class_labels=[3, 7], num_inference_steps=2, classifier=clf, classifier_scale=0.5,\n"
        "           sag_scale=0.3, output_type='np', generator=torch.Generator().manual_seed(0))\n"
        "print(type(pipe.scheduler).__name__, out.images.shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("DPMSolverMultistepScheduler (2, 28, 28, ")


def test_sample_loop_keeps_no_autograd_graph():
    """Eight 28x28 images, 50 steps, SAG and PAG with the bundled model: the process's peak memory grows
    by less than 1 GiB while sampling (an autograd graph kept across the steps took 10.8 GB; the loaded
    process itself takes about 0.5 GB, more in a loaded test run)."""
    code = (
        "import resource, torch\n"
        "torch.set_num_threads(1)\n"
        "from attnguide import Guider, SAG, PAG, sample_loop\n"
        "from attnguide.apps.loading import BUNDLED_MODEL, load_pipeline\n"
        "pipe = load_pipeline(BUNDLED_MODEL, 'cpu')\n"
        "unet, sched = pipe.unet, pipe.scheduler\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sched.set_timesteps(50)\n"
        "y = torch.arange(8) % 10\n"
        "null = torch.full_like(y, 10)\n"
        "def model_fn(x, t, branches):\n"
        "    labels = torch.cat([y if b == 'cond' else null for b in branches])\n"
        "    return unet(x, t, class_labels=labels).sample\n"
        "guider = Guider(unet, sched, guidance_scale=2.0, sag=SAG(scale=0.5), pag=PAG(scale=1.0))\n"
        "x = sample_loop(guider, model_fn, torch.randn(8, 1, 28, 28, requires_grad=True))\n"
        "assert not x.requires_grad\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    loaded_kib, peak_kib = (int(v) for v in done.stdout.split()[-2:])
    assert peak_kib - loaded_kib < 2**20, (
        f"sampling raised the peak RSS by {(peak_kib - loaded_kib) / 2**20:.2f} GiB"
    )
