"""The evaluation's paired statistics (attnguide.apps.eval.scoring / results / report): shared bootstrap
resamples and seed blocks, every pairwise comparison with its Bonferroni-corrected interval, verdicts
that need the corrected interval AND the seed blocks, the second extractor's agreement; and a tiny
model run end to end with a second classifier, re-scored with other statistics without resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnguide.apps.eval as evaluate
from attnguide.apps.arms import Arm
from attnguide.apps.eval.cli import build_parser
from attnguide.apps.eval.config import SAMPLE_KEYS
from attnguide.apps.eval.experiments import Entry
from attnguide.apps.eval.metrics import FrechetToReference, bonferroni_z, fid_from_features, gaussian_stats
from attnguide.apps.eval.report import did_not_help, findings, judgement, render_report
from attnguide.apps.eval.results import (
    correct_comparisons,
    experiment_comparisons,
    experiment_pairs,
    experiment_rows,
    extractor_agreement,
)
from attnguide.apps.eval.scoring import (
    STAT_METRICS,
    ArmResampler,
    arm_statistics,
    bootstrap_indices,
    compute_metrics,
    seed_blocks,
)

N, BOOT = 60, 200


def test_bootstrap_indices_and_seed_blocks():
    a, b = bootstrap_indices(10, 5, seed=3), bootstrap_indices(10, 5, seed=3)
    np.testing.assert_array_equal(a, b)  # every arm gets the same rows: paired
    assert a.shape == (5, 10) and a.min() >= 0 and a.max() < 10
    assert not np.array_equal(a, bootstrap_indices(10, 5, seed=4))
    blocks = seed_blocks(8, 3)
    assert [b.tolist() for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7]]  # disjoint, contiguous seeds
    with pytest.raises(ValueError, match="seed_blocks"):
        seed_blocks(5, 3)


@pytest.fixture(scope="module")
def synthetic():
    """A reference set and three arms of N paired samples: ``base``, ``same`` (identical features) and
    ``shift`` (pooled and spatial features moved by 0.8, predictions made less confident)."""
    rng = np.random.default_rng(0)
    ref = {
        "pool": rng.normal(size=(300, 6)),
        "spatial": rng.normal(size=(300, 10)),
        "logits": rng.normal(size=(300, 5)) * 3,
    }
    base = {k: rng.normal(size=(N, v.shape[1])) * (3 if k == "logits" else 1) for k, v in ref.items()}
    shift = {"pool": base["pool"] + 0.8, "spatial": base["spatial"] + 0.8, "logits": base["logits"] * 0.3}
    arms = {"base": Arm(), "same": Arm(sag_scale=0.1), "shift": Arm(sag_scale=0.2)}
    feats = {arms["base"].key: base, arms["same"].key: {k: v.copy() for k, v in base.items()}}
    feats[arms["shift"].key] = shift
    ref_stats = {k: gaussian_stats(ref[k]) for k in ("pool", "spatial")}
    scores = {key: {"metrics": compute_metrics(f, ref, ref_stats, None)} for key, f in feats.items()}
    stats = arm_statistics(feats, ref, bootstrap=BOOT, blocks=3, seed=0)
    rows = [
        Entry("base", arms["base"]),
        Entry("same", arms["same"], baseline="base"),
        Entry("shift", arms["shift"], baseline="base"),
    ]
    comparisons = experiment_comparisons(rows, scores, stats, {})
    results = {
        "config": {"bootstrap": BOOT, "seed_blocks": 3},
        "experiments": {
            "toy": {
                "rows": experiment_rows(rows, scores, comparisons, num_samples=N),
                "comparisons": comparisons,
                "notes": [],
            }
        },
    }
    statistics = correct_comparisons(results)
    out = {"ref": ref, "feats": feats, "arms": arms, "scores": scores, "stats": stats}
    return {**out, "results": results, "statistics": statistics}


def _cmp(results: dict, a: str, b: str) -> dict:
    (c,) = [c for c in results["experiments"]["toy"]["comparisons"] if (c["a"], c["b"]) == (a, b)]
    return c["metrics"]


def test_resampler_on_all_samples_equals_the_metrics(synthetic):
    key = synthetic["arms"]["shift"].key
    values = ArmResampler(synthetic["ref"]).evaluate(synthetic["feats"][key], np.arange(N)[None])
    for m in STAT_METRICS:
        assert values[m][0] == pytest.approx(synthetic["scores"][key]["metrics"][m], rel=1e-9, abs=1e-12)


def test_every_pair_is_compared_not_only_the_baseline(synthetic):
    pairs = [(c["a"], c["b"]) for c in synthetic["results"]["experiments"]["toy"]["comparisons"]]
    assert pairs == [("same", "base"), ("shift", "base"), ("shift", "same")]
    rows = [Entry("a", Arm()), Entry("b", Arm(sag_scale=1.0), baseline="a"), Entry("c", Arm(), baseline="a")]
    assert [(a.label, b.label) for a, b in experiment_pairs(rows)] == [("b", "a")]  # c's arm is a's


def test_identical_arms_give_intervals_covering_zero(synthetic):
    for m, c in _cmp(synthetic["results"], "same", "base").items():
        assert c["delta"] == 0 and c["se"] == 0, m
        assert c["ci95"][0] <= 0 <= c["ci95"][1] and c["ci_corrected"][0] <= 0 <= c["ci_corrected"][1]
        assert c["blocks"] == [0.0, 0.0, 0.0] and not c["blocks_agree"]
        assert c["verdict"] == "not resolved" and c["p"] == 1.0


def test_shifted_arm_is_worse_in_every_block(synthetic):
    res = synthetic["results"]
    for a, b in (("shift", "base"), ("shift", "same")):
        c = _cmp(res, a, b)
        assert set(c) == set(STAT_METRICS)  # intervals for sFID, IS, precision, recall too
        for m in ("fid", "sfid"):
            assert c[m]["delta"] > 0 and all(d > 0 for d in c[m]["blocks"]) and c[m]["blocks_agree"]
            assert c[m]["ci_corrected"][0] > 0 and c[m]["verdict"] == "worse"
        assert c["is"]["delta"] < 0 and c["is"]["verdict"] == "worse"  # less confident predictions


def test_intervals_and_blocks_by_hand(synthetic):
    """se and blocks of the FID delta recomputed from the shared resamples and the seed blocks."""
    ref, feats, arms = synthetic["ref"], synthetic["feats"], synthetic["arms"]
    a, b = feats[arms["shift"].key]["pool"], feats[arms["base"].key]["pool"]
    fid = FrechetToReference(gaussian_stats(ref["pool"]))
    deltas = [fid(a[i]) - fid(b[i]) for i in bootstrap_indices(N, BOOT, 0)]
    c = _cmp(synthetic["results"], "shift", "base")["fid"]
    assert c["se"] == pytest.approx(np.std(deltas, ddof=1), rel=1e-9)
    assert c["ci95"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), rel=1e-9)
    blocks = [
        fid_from_features(a[s], ref["pool"]) - fid_from_features(b[s], ref["pool"]) for s in seed_blocks(N, 3)
    ]
    assert c["blocks"] == pytest.approx(blocks, rel=1e-6)
    assert c["block_mean"] == pytest.approx(np.mean(blocks))
    assert c["block_sd"] == pytest.approx(np.std(blocks, ddof=1))
    # Bonferroni over the 3 pairs x 5 metrics that have a bootstrap se
    st = synthetic["statistics"]
    assert st["comparisons"] == 15 and st["z"] == pytest.approx(bonferroni_z(0.05, 15))
    half = st["z"] * c["se"]
    assert c["ci_corrected"] == pytest.approx([c["delta"] - half, c["delta"] + half])
    assert c["p_adjusted"] == pytest.approx(min(1.0, 15 * c["p"]))


def test_verdicts_need_the_corrected_interval_and_the_blocks(synthetic):
    res = json.loads(json.dumps(synthetic["results"]))  # as written to metrics.json
    rows = {r["label"]: r for r in res["experiments"]["toy"]["rows"]}
    assert judgement(rows["shift"]).startswith("worse (corrected CI excludes 0, 3/3 blocks agree)")
    assert judgement(rows["same"]) == "not resolved (corrected CI spans 0)"
    assert judgement(rows["base"]) == ""
    fid = rows["shift"]["vs_baseline"]["fid"]
    fid["blocks"][0] = -fid["blocks"][0]  # one block with the other sign: no longer a finding
    fid["blocks_agree"] = False
    fid["verdict"] = "not resolved"
    assert judgement(rows["shift"]) == "not resolved (seed blocks disagree: 2/3 blocks)"
    same, shift = did_not_help(res)  # neither SAG arm is a resolved FID improvement
    assert same.startswith("toy: 'same' vs 'base'") and same.endswith("no metric resolved worse")
    assert shift.startswith("toy: 'shift' vs 'base'") and "resolved worse on sFID" in shift
    assert "not resolved (seed blocks disagree" in shift
    stated = findings(res)
    assert any(s.startswith("toy: 'shift' is worse than 'same' on FID") for s in stated)
    assert not any("'same' is" in s and "'base'" in s for s in stated)


def test_second_extractor_agreement(synthetic):
    res = json.loads(json.dumps(synthetic["results"]))
    scores = synthetic["scores"]
    ag = extractor_agreement(res, scores, "same-features")
    assert ag["all_arms"]["kendall_tau"]["fid"] == pytest.approx(1.0)
    assert ag["deltas"]["stated"] == 15 and ag["findings_with_other_sign"] == []
    flipped = {k: {"metrics": {m: -v for m, v in s["metrics"].items()}} for k, s in scores.items()}
    ag = extractor_agreement(res, flipped, "negated")
    assert ag["all_arms"]["kendall_tau"]["fid"] == pytest.approx(-1.0)
    assert ag["deltas"]["findings"] > 0 and ag["deltas"]["findings_same_sign"] == 0
    assert len(ag["findings_with_other_sign"]) == ag["deltas"]["findings"]


def test_metric_options_are_not_sample_keys_and_are_checked():
    args = build_parser().parse_args(["table1", "--out", "x"])
    assert (args.bootstrap, args.seed_blocks, args.reference_part) == (1000, 3, "held-out")
    for key in ("bootstrap", "seed_blocks", "num_reference", "reference_part", "second_classifier"):
        assert key not in SAMPLE_KEYS
    with pytest.raises(SystemExit, match="seed-blocks"):
        evaluate.run(["table1", "--out", "x", "--num-samples", "8", "--seed-blocks", "5"])
    with pytest.raises(SystemExit, match="bootstrap"):
        evaluate.run(["table1", "--out", "x", "--bootstrap", "-1"])


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_model_two(tmp_path_factory) -> Path:
    """A tiny bundled-layout model (as tests/test_eval.py's) with a second classifier of another width."""
    from safetensors.torch import save_file

    from attnguide.apps.train import make_digit_classifier, make_mnist_scheduler, make_mnist_unet

    out = tmp_path_factory.mktemp("tiny-two")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = make_mnist_unet(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4)
        classifiers = {"classifier": make_digit_classifier(width=8, feature_dim=16)}
        classifiers["classifier-2"] = make_digit_classifier(width=6, feature_dim=12)
    unet.save_pretrained(out / "unet")
    make_mnist_scheduler().save_pretrained(out / "scheduler")
    index = {"_class_name": ["attnguide", "DDPMSAGPipeline"], "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDPMScheduler"]}))
    for name, clf in classifiers.items():
        (out / name).mkdir()
        save_file(
            {k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / name / "model.safetensors")
        )
        (out / name / "config.json").write_text(json.dumps({"architecture": clf.config}))
    return out


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    sizes = ["--num-samples", "8", "--batch-size", "8", "--steps", "2", "--num-reference", "40"]
    return ["table1", "--out", str(out), "--model", str(model), *sizes, "--device", "cpu", "--quiet", *extra]


def test_end_to_end_two_extractors_and_rescoring(tiny_model_two, tmp_path):
    from attnguide.apps.eval.scoring import mnist_split

    out = tmp_path / "eval"
    first = evaluate.run(_args(tiny_model_two, out, "--bootstrap", "20", "--seed-blocks", "2"))
    assert first["shards_written"] == 4 and first["statistics"]["block_sizes"] == [4, 4]
    assert first["second_extractor"]["identity"] != first["extractor"]["identity"]
    comparisons = first["experiments"]["table1"]["comparisons"]
    assert len(comparisons) == 6  # every two of the 4 arms
    assert first["agreement"]["deltas"]["stated"] == sum(len(c["metrics"]) for c in comparisons)
    assert first["reference"]["part"] == "held-out" and first["reference"]["count"] == 40
    assert first["reference"]["held_out_for_model"]["held_out"] is False  # no training.json
    report = (out / "report.md").read_text()
    assert "Reference held out for THIS model: **NO**" in report and "## Second feature extractor" in report
    assert "## Findings (resolved differences)" in report and "Bonferroni over the" in report
    assert (out / "comparisons.csv").read_text().startswith("experiment,a,b,arm_a,arm_b,metric,delta")
    for r in first["experiments"]["table1"]["rows"]:
        assert r["metrics"]["is_std"] is None  # 8 samples: one IS split of 5000
    # a training record naming the train part of the split: the same shards scored again, held out now,
    # with other statistics (metric options are not sample keys)
    record = {"steps": 1, "final_loss": 0.1, "num_images": 4000, "data_split": mnist_split().record("train")}
    (tiny_model_two / "training.json").write_text(json.dumps(record))
    try:
        again = evaluate.run(
            _args(
                tiny_model_two, out, "--bootstrap", "30", "--seed-blocks", "3", "--second-classifier", "none"
            )
        )
    finally:
        (tiny_model_two / "training.json").unlink()
    assert again["shards_written"] == 0 and again["statistics"]["bootstrap"] == 30
    assert again["second_extractor"] is None and "agreement" not in again
    assert again["statistics"]["block_sizes"] == [3, 3, 2]
    assert again["reference"]["held_out_for_model"]["held_out"] is True
    assert "Reference held out for THIS model: YES" in (out / "report.md").read_text()
    rows1, rows2 = first["experiments"]["table1"]["rows"], again["experiments"]["table1"]["rows"]
    for r1, r2 in zip(rows1, rows2, strict=True):
        assert r1["metrics"] == r2["metrics"]  # same samples, same reference: same point values
    assert "| cond + SAG | uncond + SAG |" in render_report(again, [])
