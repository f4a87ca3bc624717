"""Benchmarks: the code behind ``tools/bench_*.py``. Nothing a user's run imports lives here;
it sits above the library and imports from it, never the other way (docs/benchmarks.md)."""
