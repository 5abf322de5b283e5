"""Side-by-side benchmarks of txkernel, its peers and plain loopback TCP.

Run with ``bash bench/run.sh``; see ``bench/README.md``. Nothing here is part
of the test suite except the report code's unit tests.
"""
