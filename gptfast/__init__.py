"""gptfast: fast GPT-2 generation."""
