"""modelgate's benchmark: HTTP load against real server processes, plus micro-benchmarks.

Run it with ``make bench`` or ``python -m bench`` (see ``bench/README.md``). It is a script, not a
test: it measures, prints one table, writes ``bench/results/<timestamp>.json`` and exits non-zero
if a dependency is missing or any measured run saw an error response.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# One iris flower: the feature row every benchmark sends.
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


class BenchError(Exception):
    """A problem that stops the benchmark with a one-line message (missing dependency, a server
    that does not come up...)."""
