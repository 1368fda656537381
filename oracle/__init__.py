"""The torch oracle: Llama 3's math written again in torch (reference.py), the comparison of its
trace with npllama's (compare.py), and random Meta checkpoints for tests and benchmarks
(checkpoints.py). Only tests, benchmarks and `python -m npllama compare` import it."""
