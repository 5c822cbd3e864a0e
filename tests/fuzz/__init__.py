"""Property-based fuzzer of the npu_attn backend: a program generator (programs.py) and an oracle (oracle.py).

tests/test_fuzz.py runs a fixed, seeded budget of programs in CI; bench/fuzz_soak.py runs many more and
writes every failing program as a standalone reproduction script.
"""
