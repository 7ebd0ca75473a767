"""zooselect: isolated model embedding (Standardized Embedder) for scalable model selection.

The library runs without Ray; `jobs/` fans it out over a Ray cluster.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
