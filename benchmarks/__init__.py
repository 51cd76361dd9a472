"""gptfast's benchmarks: `python -m benchmarks` runs `gptfast bench` (see gptfast/bench)."""
