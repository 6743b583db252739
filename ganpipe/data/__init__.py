"""Data: open sources (sources), validate and prepare them once (ingest, with labels, decode and
pool), write and read the prepared form fast (prepared)."""

from ganpipe.data.ingest import IngestResult, ingest
from ganpipe.data.prepared import PreparedData, open_prepared

__all__ = ["IngestResult", "PreparedData", "ingest", "open_prepared"]
