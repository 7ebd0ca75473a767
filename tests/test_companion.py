"""The standard's random-init companion: its features join the baseline's in z."""

import dataclasses
import re

import numpy as np
import pytest

from selection.data import load_dataset
from selection.embedder import embed_entry
from selection.errors import ConfigError, StandardMismatchError
from selection.standard import (DEFAULT_COMPANION, StandardConfig, build_standard, load_standard,
                                load_standard_models, plan_standard, save_standard, standard_features)
from selection.table import load_table
from tests.conftest import tiny_config
from tests.test_standard_table import A, C


@pytest.fixture(scope="module")
def with_companion():
    return build_standard(tiny_config(companion=DEFAULT_COMPANION, form="per-source"))


def test_library_default_has_the_companion_on_half_of_d():
    config = StandardConfig()
    assert config.companion == DEFAULT_COMPANION and config.split == (32, 32)
    assert tiny_config(companion=DEFAULT_COMPANION, d=9, companion_d=2).split == (7, 2)
    assert tiny_config().split == (8, 0)


def test_the_standard_tells_the_widths_of_its_parts(with_companion):
    assert with_companion.parts == (4, 4)
    assert dataclasses.replace(with_companion, spec={**with_companion.spec, "companion": None}).parts == (8,)


@pytest.mark.parametrize("cd", [0, 8, 20])
def test_companion_d_out_of_range_is_a_clear_error(cd):
    with pytest.raises(ConfigError, match=rf"companion_d must be between 1 and 7 \(one less than d = 8\), got {cd}"):
        tiny_config(companion=DEFAULT_COMPANION, companion_d=cd)
    with pytest.raises(ConfigError, match=f"companion_d is {cd} but the standard has no companion"):
        tiny_config(companion=None, companion_d=cd)  # was silently ignored


def test_companion_is_part_of_the_standard_id():
    ids = {plan_standard(c)[0]["standard_id"] for c in (
        tiny_config(), tiny_config(companion=DEFAULT_COMPANION),
        tiny_config(companion=DEFAULT_COMPANION, companion_d=3),
        tiny_config(companion=dataclasses.replace(DEFAULT_COMPANION, id="companion/other-seed")))}
    assert len(ids) == 4


def test_z_is_both_networks_whitened_on_the_fit_split(with_companion):
    std = with_companion
    assert std.z.shape == (len(std.probe_images), 8)
    z_fit = std.z[std.fit_idx]
    assert np.allclose(z_fit.mean(0), 0, atol=1e-8)
    assert np.allclose(np.cov(z_fit[:, :4], rowvar=False), np.eye(4), atol=1e-6)  # the baseline's half
    assert np.allclose(np.cov(z_fit[:, 4:], rowvar=False), np.eye(4), atol=1e-6)  # the companion's half
    # The halves are different networks: far from a copy of each other.
    cross = np.corrcoef(z_fit[:, :4].T, z_fit[:, 4:].T)[:4, 4:]
    assert np.abs(cross).max() < 0.99


def test_task_features_reproduce_the_probe_z_after_a_store_roundtrip(with_companion, store):
    save_standard(store, with_companion)
    std = load_standard(store)
    assert std.companion == DEFAULT_COMPANION
    assert np.array_equal(std.companion_projection, with_companion.companion_projection)
    z = standard_features(std, std.probe_images[:50])
    assert np.allclose(z, with_companion.z[:50], atol=1e-5)
    with pytest.raises(StandardMismatchError, match="needs the companion's features"):
        std.project(np.zeros((3, std.mean.shape[0])))


def test_a_companion_that_initialises_differently_is_refused(with_companion):
    spec = dict(with_companion.spec, companion=dict(with_companion.spec["companion"], state_sha256="0" * 64))
    with pytest.raises(StandardMismatchError, match="initialises to other weights here"):
        load_standard_models(dataclasses.replace(with_companion, spec=spec))


def test_a_baseline_that_timm_now_preprocesses_otherwise_is_refused(with_companion):
    assert load_standard_models(with_companion).baseline is not None  # as built: accepted
    recorded = with_companion.spec["baseline_data_config"]
    spec = dict(with_companion.spec, baseline_data_config=dict(recorded, crop_pct=0.5))
    with pytest.raises(StandardMismatchError, match=f"crop_pct 0.5 -> {recorded['crop_pct']!r}"):
        load_standard_models(dataclasses.replace(with_companion, spec=spec))


def test_a_standard_built_by_the_floored_crop_is_refused_only_where_its_crop_moved(with_companion):
    """Standards before the preprocessing version 2 floored the crop's start: where a model's resize is
    3 pixels (modulo 4) wider than its crop, task features now start a pixel further than the probe's."""
    versions = {k: v for k, v in with_companion.spec["versions"].items() if k != "preprocess"}
    assert with_companion.spec["versions"]["preprocess"] == "2"
    older = dict(with_companion.spec, versions=versions)  # as an older zooselect recorded it
    assert load_standard_models(dataclasses.replace(with_companion, spec=older)).baseline is not None  # 36 -> 32
    # resnet10t (crop_pct 0.875) at 24 px resizes to 27: the crop started at pixel 1, now at 2
    older = dict(older, input_size=24)
    with pytest.raises(StandardMismatchError, match=r"cropped its baseline 'resnet10t'.s inputs a pixel off "
                       r"timm's transform \(the 24 px crop of its 27 px resize started at pixel 1, now at 2\)"):
        load_standard_models(dataclasses.replace(with_companion, spec=older))
    assert load_standard_models(dataclasses.replace(with_companion, spec=dict(
        with_companion.spec, input_size=24))).baseline is not None  # built by this version: accepted


def test_the_companion_as_a_candidate_is_flagged_like_the_baseline(with_companion, store):
    save_standard(store, with_companion)
    for entry in (DEFAULT_COMPANION, A, C):
        assert embed_entry(entry, with_companion, store).status == "embedded"
    table = load_table(store, with_companion)
    flags = dict(zip(table.model_ids, table.meta.column("is_baseline").to_pylist()))
    assert flags == {DEFAULT_COMPANION.id: True, A.id: False, C.id: False}


def test_selection_end_to_end_with_a_companion(with_companion, store):
    from selection.select import SelectConfig, embed_task, sweep

    save_standard(store, with_companion)
    for entry in (A, C):
        embed_entry(entry, with_companion, store)
    task = load_dataset("builtin:digits?split=test&n=40", 32)
    emb = embed_task(with_companion, task, SelectConfig(task_image_size=32))
    plain = embed_task(with_companion, task, SelectConfig(task_image_size=32, weigh_parts=False))
    assert np.isclose(np.trace(emb.g), 1.0) and not np.allclose(emb.g, plain.g)
    ranked = sweep(load_table(store, with_companion), [emb.query(with_companion, "rank-mean")], top_k=2)[0]
    assert sorted(r.model_id for r in ranked) == sorted([A.id, C.id])


@pytest.mark.parametrize("field,value,needle", [
    ("d", 8.0, "d must be an integer, got 8.0"),
    ("d", True, "d must be an integer, got True"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("split_seed", -1, "split_seed must be >= 0, got -1"),
    ("input_size", 32.0, "input_size must be an integer, got 32.0"),
    ("fit_fraction", "0.7", "fit_fraction must be a number, got '0.7'"),
    ("probe_sources", "builtin:digits-probe?n=40", "probe_sources must be a tuple of dataset specs, got "
                                                   "'builtin:digits-probe?n=40'"),
    ("baseline", "resnet10t", "baseline must be a CatalogEntry, got str 'resnet10t'"),
])
def test_a_standard_config_of_another_type_is_refused_when_made(field, value, needle):
    """A review (session 43): each was accepted, then failed after the probe set was built ('slice
    indices must be integers', 'expected non-negative integer', a probe source read one character at
    a time: "dataset 'b' does not exist")."""
    with pytest.raises(ConfigError, match=f"^{re.escape(needle)}$"):
        tiny_config(**{field: value})
    assert tiny_config(probe_sources=["builtin:digits-probe?n=40"]).probe_sources == ("builtin:digits-probe?n=40",)
