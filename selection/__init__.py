"""zooselect: isolated model embedding (Standardized Embedder) for scalable model selection.

The library runs without Ray; `jobs/` fans it out over a Ray cluster.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1


def schema_remedy(versions: object) -> str:
    """What to do about standards or rows of other schema versions: ", written by a newer zooselect:
    upgrade this one" where one is a later version, else ""."""
    found = versions if isinstance(versions, (set, frozenset, list, tuple)) else [versions]
    later = [v for v in found if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION]
    return f", written by a newer zooselect ({__version__} here): upgrade this one" if later else ""
