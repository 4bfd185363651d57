"""Tests of the lab's framework and of the small-batch, non-iid and domain-shift experiments: the
statistics and verdicts, the runner (serial and pooled give the same numbers), the experiments at tiny
size end to end, their claim checks on synthetic numbers, data, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mnist1d")
pytest.importorskip("tqdm")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from normlab.lab import require  # noqa: E402
from normlab.lab.cli import main  # noqa: E402
from normlab.lab.data import class_batches, digits, iid_batches, mnist1d, standardize, subset  # noqa: E402
from normlab.lab.experiments import EXPERIMENTS, get, run_experiments  # noqa: E402
from normlab.lab.experiments.common import grid_optimum  # noqa: E402
from normlab.lab.models import cnn, with_norm  # noqa: E402
from normlab.lab.report import INCONCLUSIVE, NOT_CHECKED, NOT_REPRODUCED, REPRODUCED, VERDICTS, Claim, format_table  # noqa: E402
from normlab.lab.stats import Interval, mean_interval, paired_interval  # noqa: E402
from normlab.lab.train import Context, TrainConfig, fit, replicate  # noqa: E402

# The experiments the module's tiny run trains (the others' claim logic: tests/test_lab_claims.py).
TINY_RUN = ("small-batch", "non-iid", "domain-shift")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("lab")
    torch.set_num_threads(1)
    summary = run_experiments(Context("tiny", seed=3, out=out, progress=False), TINY_RUN, jobs=1)
    return out, summary


# ------------------------------------------------------------------------------ statistics
def test_student_t_interval_by_hand() -> None:
    # d = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.18245 (tables): half width 2.05426.
    iv = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert iv.mean == pytest.approx(2.5)
    assert (iv.low, iv.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-6)
    assert iv.n == 4 and iv.level == 0.95
    # 90 %: t(0.95, 3) = 2.353363
    iv90 = mean_interval([1.0, 2.0, 3.0, 4.0], level=0.9)
    assert iv90.high - iv90.mean == pytest.approx(2.353363 * math.sqrt(5 / 3) / 2, rel=1e-6)


def test_paired_interval_is_the_interval_of_the_differences() -> None:
    a, b = [90.0, 92.0, 95.0, 91.0], [89.0, 90.0, 92.0, 87.0]
    assert paired_interval(a, b) == mean_interval([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="paired_interval"):
        paired_interval([1.0, 2.0], [1.0])


def test_interval_edge_cases() -> None:
    one = mean_interval([3.0])
    assert one.mean == 3.0 and one.low == -math.inf and one.high == math.inf
    assert math.isnan(mean_interval([]).mean)
    same = mean_interval([2.0, 2.0, 2.0])
    assert same.low == same.high == 2.0
    assert math.isnan(mean_interval([1.0, float("nan")]).low)
    assert Interval(3.1, 1.2, 5.0, 8).text("points") == "+3.1 [+1.2, +5] points (n=8)"


# ------------------------------------------------------------------------------ verdicts
@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (1.01, 3.0, REPRODUCED),  # clears the minimum effect
        (1.0, 3.0, INCONCLUSIVE),  # touches it: not cleared
        (0.5, 1.5, INCONCLUSIVE),  # straddles it
        (-2.0, 0.99, NOT_REPRODUCED),  # excludes it
        (-2.0, 1.0, INCONCLUSIVE),
        (float("nan"), float("nan"), INCONCLUSIVE),
    ],
)
def test_greater_verdict(low: float, high: float, verdict: str) -> None:
    c = Claim("x", "x")
    c.greater("d", Interval((low + high) / 2, low, high, 8), 1.0)
    assert c.effects[0].verdict == verdict and c.verdict == verdict


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (-0.9, 0.9, REPRODUCED),  # inside the margin
        (-1.0, 0.5, INCONCLUSIVE),  # touches the margin
        (-1.5, 0.5, INCONCLUSIVE),  # straddles -margin
        (0.5, 1.5, INCONCLUSIVE),  # straddles +margin
        (-3.0, 3.0, INCONCLUSIVE),  # too wide to tell
        (1.01, 2.0, NOT_REPRODUCED),  # entirely beyond +margin
        (-2.0, -1.01, NOT_REPRODUCED),  # entirely beyond -margin
    ],
)
def test_equivalent_verdict(low: float, high: float, verdict: str) -> None:
    c = Claim("x", "x")
    c.equivalent("d", Interval((low + high) / 2, low, high, 8), 1.0)
    assert c.effects[0].verdict == verdict


def test_claim_verdict_combines_effects() -> None:
    yes, no, maybe = Interval(3, 2, 4, 8), Interval(-3, -4, -2, 8), Interval(1, -1, 3, 8)
    c = Claim("x", "x")
    assert c.verdict == NOT_CHECKED
    c.greater("a", yes, 1.0)
    assert c.verdict == REPRODUCED
    c.greater("b", maybe, 1.0)
    assert c.verdict == INCONCLUSIVE
    c.greater("c", no, 1.0)
    assert c.verdict == NOT_REPRODUCED
    with pytest.raises(ValueError, match="min_effect"):
        c.greater("d", yes, -1.0)
    with pytest.raises(ValueError, match="margin"):
        c.equivalent("d", yes, 0.0)
    d = c.to_dict()
    assert d["verdict"] == NOT_REPRODUCED and [e["verdict"] for e in d["effects"]] == [
        REPRODUCED,
        INCONCLUSIVE,
        NOT_REPRODUCED,
    ]


def test_grid_optimum_flags_the_edge() -> None:
    assert grid_optimum({0.1: 0.5, 0.2: 0.3, 0.4: 0.6}) == (0.2, None)
    best, note = grid_optimum({0.1: 0.5, 0.2: 0.3, 0.4: 0.1})
    assert best == 0.4 and note is not None and "largest" in note
    assert grid_optimum({0.1: float("nan"), 0.2: 0.3})[0] == 0.2
    assert grid_optimum({0.1: 1.0}) == (0.1, None)
    with pytest.raises(ValueError, match="grid_optimum"):
        grid_optimum({0.1: float("nan")})


# ------------------------------------------------------------------------------ emulated devices
def test_replicas_share_weights_and_keep_their_own_statistics() -> None:
    torch.manual_seed(0)
    model = cnn(1, 4, 10)
    a, b = replicate(model, 2)
    assert a is model and all(p is q for p, q in zip(a.parameters(), b.parameters()))
    assert all(x is not y for x, y in zip(a.buffers(), b.buffers()))
    with pytest.raises(ValueError, match="devices"):
        replicate(model, 0)


@pytest.mark.slow
def test_devices_train_as_ghost_batches() -> None:
    # BN on 4 emulated devices of 2 computes what GhostBatchNorm with ghost batches of 2 computes on one
    # device (the per-device statistics), and the same gradients: the same losses step by step.
    split = subset(standardize(digits()), 96, 16)
    losses = []
    for kind, options, devices in (("bn", {}, 4), ("ghost", {"virtual_batch_size": 2}, 1)):
        torch.manual_seed(0)
        model = with_norm(cnn(1, 4, 10), kind, **options)
        cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, devices=devices, max_steps=5)
        losses.append(fit(model, split, cfg, Context("tiny", progress=False), seed=1).losses)
    assert len(losses[0]) == 5
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    # ... and not what BN over the whole batch computes.
    torch.manual_seed(0)
    whole = fit(
        cnn(1, 4, 10), split, TrainConfig(1, 8, 0.1, max_steps=5), Context("tiny", progress=False), seed=1
    ).losses
    assert whole[0] != pytest.approx(losses[0][0], rel=1e-3)


def test_devices_must_divide_the_batch() -> None:
    split = subset(standardize(digits()), 32, 8)
    with pytest.raises(ValueError, match="devices=3"):
        fit(cnn(1, 4, 10), split, TrainConfig(1, 8, 0.1, devices=3), Context("tiny", progress=False), seed=0)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUN)
def test_experiment_outputs_exist_and_parse(tiny_run: tuple[Path, list[dict]], name: str) -> None:
    out, _ = tiny_run
    folder = out / name
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == name and results["preset"] == "tiny" and results["seed"] == 3
    assert results["seeds"] == 2 and results["job_seconds"] > 0
    assert {"python", "torch", "normlab"} <= set(results["versions"])
    assert results["claims"] and all(c["verdict"] in VERDICTS for c in results["claims"])
    assert all(len(c["name"]) <= 30 for c in results["claims"])
    with (folder / "results.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == results["table"]["headers"]
    assert len(rows) == len(results["table"]["rows"]) + 1 >= 2
    report = (folder / "report.md").read_text()
    assert all(c["statement"] in report for c in results["claims"])
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert images, "the report embeds at least one plot"
    for image in images:
        assert (folder / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUN)
def test_claims_are_recomputed_from_saved_numbers(tiny_run: tuple[Path, list[dict]], name: str) -> None:
    out, _ = tiny_run
    results = json.loads((out / name / "results.json").read_text())
    claims = get(name).claims(results)
    assert [c.to_dict() for c in claims] == results["claims"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUN)
def test_plots_are_redrawn_from_saved_numbers(tiny_run: tuple[Path, list[dict]], name: str, tmp_path: Path) -> None:
    out, _ = tiny_run
    results = json.loads((out / name / "results.json").read_text())  # non-finite numbers saved as null
    names = get(name).plot(results, tmp_path)
    assert names and all((tmp_path / n).stat().st_size > 0 for n in names)


@pytest.mark.slow
def test_summary_and_index(tiny_run: tuple[Path, list[dict]]) -> None:
    out, summary = tiny_run
    assert list(dict.fromkeys(s["experiment"] for s in summary)) == list(TINY_RUN)
    saved = json.loads((out / "summary.json").read_text())
    assert [s["verdict"] for s in saved["claims"]] == [s["verdict"] for s in summary]
    index = (out / "index.md").read_text()
    for name in TINY_RUN:
        assert f"({name}/report.md)" in index
    for s in summary:
        assert s["statement"] in index and len(s["claim"]) <= 30


@pytest.mark.slow
def test_pooled_run_gives_the_serial_numbers(tiny_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, _ = tiny_run
    # Two of the three experiments (the pool's start-up dominates; small-batch's jobs are the costliest).
    pooled_names = ("non-iid", "domain-shift")
    run_experiments(Context("tiny", seed=3, out=tmp_path, progress=False), pooled_names, jobs=2)
    for name in pooled_names:
        serial = json.loads((out / name / "results.json").read_text())
        pooled = json.loads((tmp_path / name / "results.json").read_text())
        for key in ("job_seconds", "versions"):
            serial.pop(key), pooled.pop(key)
        assert pooled == serial, name


@pytest.mark.slow
def test_another_base_seed_gives_other_numbers(tiny_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, _ = tiny_run
    run_experiments(Context("tiny", seed=4, out=tmp_path, progress=False), ["non-iid"], jobs=1)
    first = json.loads((out / "non-iid" / "results.json").read_text())
    other = json.loads((tmp_path / "non-iid" / "results.json").read_text())
    assert other["curves"] != first["curves"]


def test_every_registered_experiment_is_known() -> None:
    assert set(TINY_RUN) <= set(EXPERIMENTS) and "batch-norm" in EXPERIMENTS


# ------------------------------------------------------------------------------ claim checks follow the numbers
def _small_batch(
    bn: float, others: float, brn_full: float = 97.0, ghost: float | None = None, bkn: float = 97.0
) -> dict:
    from normlab.lab.experiments import small_batch as sb

    jitter = [0.0, 0.5, -0.5, 0.2, -0.2, 0.4, -0.4, 0.1] * 2  # the same per-seed jitter for every row
    level = {label: others for label, _, _ in sb.rows()}
    level |= {"BN": bn, sb.FULL_BN: 97.0, sb.FULL_BRN: brn_full, sb.NAIVE_CBN: bn}
    level["ghost"] = bn if ghost is None else ghost
    level[sb.LABELS["bkn"]] = bkn  # BKN: beside BN at small batch and BN over the full batch
    cells = {k: {"accuracy": [v + j for j in jitter], "final_train_loss": [0.1] * 16} for k, v in level.items()}
    return {"cells": cells}


def _verdicts(name: str, results: dict) -> dict[str, str]:
    return {c.name: c.verdict for c in get(name).claims(results)}


def test_small_batch_claims_follow_the_numbers() -> None:
    good = _verdicts("small-batch", _small_batch(bn=93.0, others=96.0))
    assert set(good.values()) == {REPRODUCED}
    bad = _verdicts("small-batch", _small_batch(bn=96.5, others=96.5, brn_full=95.0, ghost=99.0, bkn=95.0))
    assert bad["BKN = BN full batch"] == NOT_REPRODUCED  # 2 points below, clear of the 1-point margin
    assert bad["BN: small-batch drop"] == NOT_REPRODUCED  # a 0.5-point drop, clear of the 1-point minimum
    assert bad["CBN: beats BN at small batch"] == NOT_REPRODUCED
    assert bad["GN: beats BN at small batch"] == NOT_REPRODUCED
    assert bad["BRN = BN at full batch"] == NOT_REPRODUCED and bad["ghost = per-device BN"] == NOT_REPRODUCED
    # A noisy drop whose interval straddles the minimum effect is inconclusive.
    noisy = _small_batch(bn=95.5, others=96.0)
    noisy["cells"]["BN"]["accuracy"] = [95.5, 97.0, 94.0, 96.5, 94.5, 96.0, 95.0, 95.5]
    assert _verdicts("small-batch", noisy)["BN: small-batch drop"] == INCONCLUSIVE


def test_small_batch_pairs_rows_over_their_common_seeds() -> None:
    results = _small_batch(bn=93.0, others=96.0)
    for label in ("CBN", "naive CBN"):  # 8 seeds: too few for the compensation effect
        results["cells"][label]["accuracy"] = results["cells"][label]["accuracy"][:8]
    claims = {c.name: c for c in get("small-batch").claims(results)}
    assert claims["CBN: compensation matters"].verdict == NOT_CHECKED
    assert "16" in claims["CBN: compensation matters"].missing[0]
    cbn = claims["CBN: beats BN at small batch"].effects[0]
    assert cbn.n == 8 and cbn.verdict == REPRODUCED  # CBN's 8 seeds against BN's first 8


def test_small_batch_reports_what_was_not_run() -> None:
    results = _small_batch(bn=93.0, others=96.0)
    del results["cells"]["naive CBN"]
    claims = {c.name: c for c in get("small-batch").claims(results)}
    assert claims["CBN: compensation matters"].verdict == NOT_CHECKED
    assert claims["CBN: compensation matters"].missing


def _non_iid(bn_non_iid: float, brn_non_iid: float) -> dict:
    jitter = [0.0, 0.3, -0.3, 0.2, -0.2, 0.1, -0.1, 0.0]
    acc = {"bn": {"iid": 97.0, "non-iid": bn_non_iid}, "brn": {"iid": 97.0, "non-iid": brn_non_iid}}
    return {"accuracy": {k: {o: [v + j for j in jitter] for o, v in d.items()} for k, d in acc.items()}}


def test_non_iid_claims_follow_the_numbers() -> None:
    assert set(_verdicts("non-iid", _non_iid(90.0, 96.0)).values()) == {REPRODUCED}
    at_convergence = _verdicts("non-iid", _non_iid(97.0, 97.0))  # no drop, nothing to recover
    assert set(at_convergence.values()) == {NOT_REPRODUCED}
    noisy = _non_iid(96.0, 96.0)
    noisy["accuracy"]["bn"]["non-iid"] = [96.0, 94.0, 97.5, 95.0, 97.0, 95.5, 96.5, 96.5]
    assert _verdicts("non-iid", noisy)["BN: non-i.i.d. drop"] == INCONCLUSIVE


def _domain_shift(gains: dict[str, float]) -> dict:
    jitter = [0.0, 1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.0]
    return {
        "accuracy": {
            n: {"source-only": [50.0 + j for j in jitter], "AdaBN": [50.0 + g + 2 * j for j in jitter]}
            for n, g in gains.items()
        }
    }


def test_domain_shift_judges_each_shift_on_its_own() -> None:
    verdicts = _verdicts("domain-shift", _domain_shift({"contrast": 20.0, "noise": 0.0, "inversion": 0.2}))
    assert verdicts == {
        "AdaBN: contrast": REPRODUCED,
        "AdaBN: noise": NOT_REPRODUCED,
        "AdaBN: inversion (control)": REPRODUCED,  # unchanged, as a control should be
    }
    # A control that AdaBN moves (up or down) beyond the margin fails.
    for gain in (10.0, -30.0):
        assert (
            _verdicts("domain-shift", _domain_shift({"inversion": gain}))["AdaBN: inversion (control)"]
            == NOT_REPRODUCED
        )
    empty = get("domain-shift").claims({"accuracy": {"contrast": {"source-only": [], "AdaBN": []}}})
    assert empty[0].verdict == NOT_CHECKED


# ------------------------------------------------------------------------------ data
@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=2, max_size=6),
    k=st.integers(1, 3),
    per=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_batches_draw_few_classes_without_repeats(counts: list[int], k: int, per: int, seed: int) -> None:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]) if sum(counts) else torch.zeros(0)
    labels = labels.long()
    if labels.numel() == 0:
        return
    batches = list(class_batches(labels, k * per, k, torch.Generator().manual_seed(seed)))
    seen: set[int] = set()
    for b in batches:
        assert len(b) == k * per
        classes = labels[b]
        assert len(set(classes.tolist())) == k
        assert all(int((classes == c).sum()) == per for c in set(classes.tolist()))
        assert seen.isdisjoint(b.tolist())
        seen |= set(b.tolist())
    # The epoch ends only when fewer than k classes can still fill a share.
    left = [sum(1 for i in range(len(labels)) if labels[i] == c and i not in seen) for c in range(len(counts))]
    assert sum(n >= per for n in left) < k


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), b=st.integers(1, 50), seed=st.integers(0, 1000))
def test_iid_batches_fixed_size_no_repeats(n: int, b: int, seed: int) -> None:
    if b > n:
        with pytest.raises(ValueError, match="iid_batches"):
            list(iid_batches(n, b, torch.Generator().manual_seed(seed)))
        return
    batches = list(iid_batches(n, b, torch.Generator().manual_seed(seed)))
    assert len(batches) == n // b and all(len(x) == b for x in batches)
    flat = torch.cat(batches).tolist() if batches else []
    assert len(set(flat)) == len(flat)


def test_class_batches_rejects_bad_split() -> None:
    with pytest.raises(ValueError, match="classes_per_batch"):
        list(class_batches(torch.arange(10) % 2, 5, 2, torch.Generator()))


def test_mnist1d_is_built_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lab must not download")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.chdir(tmp_path)
    mnist1d.cache_clear()
    split = mnist1d(num_samples=200, seed=1)
    assert split.x_train.shape == (160, 1, 40) and split.x_test.shape == (40, 1, 40)
    assert split.num_classes == 10
    assert list(tmp_path.iterdir()) == []  # no pickle written either


def test_digits_split_is_fixed_and_stratified() -> None:
    a, b = digits(), digits()
    assert torch.equal(a.x_train, b.x_train)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert a.x_train.shape[1:] == (1, 8, 8) and 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    assert set(a.y_test.tolist()) == set(range(10))


def test_require_names_the_install_command() -> None:
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lab\]"'):
        require("a_package_that_is_not_installed")


# ------------------------------------------------------------------------------ command line
def test_cli_list_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    helptext = capsys.readouterr().out
    assert "examples:" in helptext and "--full" in helptext and "--seed" in helptext


def test_cli_rejects_unknown_experiment_and_missing_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "no-such-experiment"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["run", "non-iid", "--device", "cuda"])
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_one_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "domain-shift", "--tiny", "--out", str(tmp_path), "--no-progress", "--seed", "1", "--jobs", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "target domain" in printed and "== summary" in printed
    assert re.search(r"AdaBN: contrast +(NOT REPRODUCED|REPRODUCED|INCONCLUSIVE)", printed)
    saved = json.loads((tmp_path / "domain-shift" / "results.json").read_text())
    assert saved["seed"] == 1 and saved["versions"]["worker_processes"] == "1"


def test_cli_rejects_zero_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "non-iid", "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err


def test_format_table_aligns() -> None:
    text = format_table(["a", "bb"], [[1.23456, "x"], ["long", 2]])
    lines = text.splitlines()
    assert lines[0].startswith("a") and set(lines[1]) <= {"-", " "}
    assert "1.235" in lines[2]


def test_experiments_left_out_under_torchrun_say_why() -> None:
    from normlab.lab.experiments import EXPERIMENTS, for_processes, get

    assert for_processes(EXPERIMENTS, False) == (list(EXPERIMENTS), [])
    runs, left_out = for_processes(EXPERIMENTS, True)
    assert left_out == ["small-batch"] and runs == [n for n in EXPERIMENTS if n != "small-batch"]
    assert "emulates its devices" in get("small-batch").single_process
    assert for_processes(["small-batch"], True) == ([], ["small-batch"])
