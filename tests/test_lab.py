"""Tests of the lab: every experiment at tiny size end to end, the claim checks, data, CLI, determinism."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import normlab

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mnist1d")
pytest.importorskip("tqdm")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from normlab.lab import require  # noqa: E402
from normlab.lab.cli import main  # noqa: E402
from normlab.lab.data import class_batches, digits, iid_batches, mnist1d  # noqa: E402
from normlab.lab.experiments import EXPERIMENTS, get, run_all, run_experiment  # noqa: E402
from normlab.lab.report import Claim, format_table  # noqa: E402
from normlab.lab.train import Context  # noqa: E402

VERDICTS = {"REPRODUCED", "NOT REPRODUCED", "NOT CHECKED"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("lab")
    torch.set_num_threads(1)
    summary = run_all(Context("tiny", seed=3, out=out, progress=False))
    return out, summary


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_outputs_exist_and_parse(tiny_run: tuple[Path, list[dict]], name: str) -> None:
    out, _ = tiny_run
    folder = out / name
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == name and results["preset"] == "tiny" and results["seed"] == 3
    assert results["wall_seconds"] > 0
    assert {"python", "torch", "normlab"} <= set(results["versions"])
    assert results["claim"]["verdict"] in VERDICTS
    with (folder / "results.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == results["table"]["headers"]
    assert len(rows) == len(results["table"]["rows"]) + 1 >= 2
    report = (folder / "report.md").read_text()
    assert results["claim"]["verdict"] in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert images, "the report embeds at least one plot"
    for image in images:
        assert (folder / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_claim_is_recomputed_from_saved_numbers(tiny_run: tuple[Path, list[dict]], name: str) -> None:
    out, _ = tiny_run
    results = json.loads((out / name / "results.json").read_text())
    claim = get(name).claim(results)
    assert claim.verdict == results["claim"]["verdict"]
    assert [c.value for c in claim.criteria] == pytest.approx([c["value"] for c in results["claim"]["criteria"]])


def test_summary_and_index(tiny_run: tuple[Path, list[dict]]) -> None:
    out, summary = tiny_run
    assert [s["experiment"] for s in summary] == list(EXPERIMENTS)
    saved = json.loads((out / "summary.json").read_text())
    assert [s["verdict"] for s in saved["experiments"]] == [s["verdict"] for s in summary]
    index = (out / "index.md").read_text()
    for name in EXPERIMENTS:
        assert f"({name}/report.md)" in index


def test_same_seed_same_results(tiny_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, _ = tiny_run
    run_experiment("non-iid", Context("tiny", seed=3, out=tmp_path, progress=False))
    first = json.loads((out / "non-iid" / "results.json").read_text())
    second = json.loads((tmp_path / "non-iid" / "results.json").read_text())
    assert first["accuracy"] == second["accuracy"] and first["curves"] == second["curves"]
    run_experiment("non-iid", Context("tiny", seed=4, out=tmp_path / "other", progress=False))
    third = json.loads((tmp_path / "other" / "non-iid" / "results.json").read_text())
    assert third["curves"] != first["curves"]


# ------------------------------------------------------------------------------ claim checks flip
def _small_batch(bn_small: float, cbn_small: float) -> dict:
    big = {"bn": 95.0, "brn": 95.0, "cbn": 95.0, "gn": 94.0}
    small = {"bn": bn_small, "brn": 90.0, "cbn": cbn_small, "gn": 92.0}
    return {"accuracy": {k: {"32": [big[k], big[k]], "2": [small[k], small[k]]} for k in big}}


def _non_iid(bn_non_iid: float, brn_non_iid: float = 95.0) -> dict:
    return {
        "accuracy": {"bn": {"iid": [96.0], "non-iid": [bn_non_iid]}, "brn": {"iid": [96.0], "non-iid": [brn_non_iid]}}
    }


def _whitening(zca_loss: float) -> dict:
    curves = {"BN": [[1.0, 0.8]], "DBN-zca": [[zca_loss, zca_loss]], "DBN-pca": [[2.0, 2.0]]}
    cond = {"BN": [2.5], "DBN-zca": [0.5], "DBN-pca": [5.0]}
    return {"loss_curves": curves, "final_log10_condition": cond}


def _domain_shift(adabn: float) -> dict:
    return {
        "accuracy": {"contrast": {"source-only": [40.0], "AdaBN": [adabn]}},
        "shift": {"contrast": {"before": [5.0], "after": [0.5]}},
    }


def _weight_norm(init_loss: float) -> dict:
    curves = {"plain": [[1.0, 1.0]], "WN + init": [[init_loss]], "WN + mean-only BN": [[0.5]], "BN": [[0.4]]}
    return {"curves": curves, "accuracy": {"WN + mean-only BN": [96.5], "BN": [96.0]}}


def _weight_norm_accuracy(mobn_acc: float) -> dict:
    out = _weight_norm(0.6)
    out["accuracy"]["WN + mean-only BN"] = [mobn_acc]
    return out


def _normprop(np_mean: float, np_wobble: float = 0.01) -> dict:
    def rec(m: float, w: float) -> dict:
        # Two recorded steps, two layers of two units each: unit means +-m, moving by w between the steps.
        return {"step": [0, 10], "unit_mean": [[[m, -m], [m, -m]], [[m + w, -m - w], [m, m]]], "var": [[1, 1], [1, 1]]}

    return {
        "moments": {"NormProp": [rec(np_mean, np_wobble)], "BN": [rec(0.2, 0.1)]},
        "batch1": {"NormProp": {"test_accuracy": 90.0}},
    }


@pytest.mark.parametrize(
    ("name", "make", "good", "bad"),
    [
        ("small-batch", _small_batch, (80.0, 92.0), (92.0, 92.0)),  # BN falls / BN holds
        ("small-batch", _small_batch, (80.0, 92.0), (80.0, 85.0)),  # CBN holds / CBN falls
        ("non-iid", _non_iid, (80.0,), (96.0,)),  # BN drops / BN holds
        ("non-iid", _non_iid, (80.0, 95.0), (80.0, 85.0)),  # BRN recovers 94 % / 31 % of the drop
        ("whitening", _whitening, (0.7,), (1.2,)),
        ("domain-shift", _domain_shift, (90.0,), (41.0,)),
        ("weight-norm", _weight_norm, (0.6,), (1.5,)),
        ("weight-norm", _weight_norm_accuracy, (96.5,), (95.5,)),  # WN + mean-only BN at / below BN
        ("normprop", _normprop, (0.05,), (0.5,)),  # closer to / farther from zero mean than BN
        ("normprop", _normprop, (0.05, 0.01), (0.05, 0.5)),  # steadier / less steady than BN
    ],
)
def test_claim_verdict_follows_the_numbers(name: str, make, good: tuple, bad: tuple) -> None:  # noqa: ANN001
    check = get(name).claim
    assert check(make(*good)).verdict == "REPRODUCED"
    failed = check(make(*bad))
    assert failed.verdict == "NOT REPRODUCED"
    assert any(not c.passed for c in failed.criteria)


def test_non_iid_drop_within_seed_noise_is_not_an_effect() -> None:
    from normlab.lab.experiments.common import paired_difference

    m, se = paired_difference([96.0, 96.0, 96.0], [95.0, 90.0, 97.0])  # drops 1, 6, -1
    assert m == pytest.approx(2.0) and se == pytest.approx(((1 + 16 + 9) / 2) ** 0.5 / 3**0.5)
    noisy = {"accuracy": {"bn": {"iid": [96.0] * 3, "non-iid": [95.0, 90.0, 97.0]}, "brn": {"non-iid": [96.0] * 3}}}
    effect = get("non-iid").claim(noisy).criteria[0]
    assert not effect.passed and effect.threshold == pytest.approx(2 * se)
    clear = {"accuracy": {"bn": {"iid": [96.0] * 3, "non-iid": [90.0, 91.0, 89.0]}, "brn": {"non-iid": [95.0] * 3}}}
    assert get("non-iid").claim(clear).verdict == "REPRODUCED"


def test_normprop_measures_the_normalized_input_before_the_affine() -> None:
    from normlab.lab.experiments.normprop import normalized_input
    from normlab.normprop import NormPropLinear

    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    layer = NormPropLinear(6, 4, factor=1.21).double()
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
        layer.bias.normal_()
    w = layer.weight.detach()
    expected = x @ w.T / (1.21 * torch.sqrt((w * w).sum(1)))  # W_i . x / (c ||W_i||), no gamma, no beta
    assert torch.allclose(normalized_input(layer, x), expected)
    bn = torch.nn.BatchNorm1d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    t = torch.randn(50, 4, dtype=torch.float64)
    assert torch.allclose(normalized_input(bn, t), (t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


def test_weight_norm_mean_only_variant_is_initialized_and_scale_free() -> None:
    from normlab.lab.experiments.weight_norm import _build

    torch.manual_seed(0)
    batch = torch.randn(64, 1, 8, 8)
    model = _build("WN + mean-only BN", 4, batch)
    norms = [m for m in model.modules() if isinstance(m, normlab.NormBase)]
    assert len(norms) == 3 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(int(m.num_batches_tracked) == 0 and float(m.running_mean.abs().max()) == 0.0 for m in norms)
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, o: seen.append(o)) for m in norms]
    with torch.no_grad():
        model.train()(batch)
    for h in handles:
        h.remove()
    for out in seen:  # the data-dependent init: zero-mean, unit-variance pre-activations on the init batch
        var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
        assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


def test_claim_without_numbers_is_not_checked() -> None:
    assert get("domain-shift").claim({"accuracy": {}, "shift": {}}).verdict == "NOT CHECKED"
    c = Claim("x")
    c.at_least("nan never passes", float("nan"), 0.0)
    assert c.verdict == "NOT REPRODUCED"


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


def test_cli_runs_one_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "domain-shift", "--tiny", "--out", str(tmp_path), "--no-progress", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "target domain" in printed and re.search(r"(NOT )?REPRODUCED|NOT CHECKED", printed)
    assert json.loads((tmp_path / "domain-shift" / "results.json").read_text())["seed"] == 1


def test_format_table_aligns() -> None:
    text = format_table(["a", "bb"], [[1.23456, "x"], ["long", 2]])
    lines = text.splitlines()
    assert lines[0].startswith("a") and set(lines[1]) <= {"-", " "}
    assert "1.235" in lines[2]
