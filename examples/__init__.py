"""Examples: targets for the CLI (tiny_decoder.py) and the mini-vLLM serving engine (mini_vllm/)."""
