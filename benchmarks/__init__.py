"""hvd-bench: side-by-side measurements of every gradient-exchange path, and a calibrated cost
model (``hvd-bench --quick``; see benchmarks/REPORT.md)."""
