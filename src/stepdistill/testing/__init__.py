"""Test utilities users can reuse (e.g. a fake OpenAI-compatible server that injects faults)."""
