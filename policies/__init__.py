"""Policy contract, action tokenizer, V-GPS steering, adapters, the project's own VLAs, Q-SFT."""
