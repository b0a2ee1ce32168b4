"""Test support shared by the suite and the benchmarks: starting `supervisor serve` as users
do, and the chaos run. Not part of the product: nothing under `supervisor/`,
`projections/` or `schemas/` imports it, and it is not packaged."""
