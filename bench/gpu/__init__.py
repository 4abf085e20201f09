"""Scripts for a lent GPU machine (torch only, no sglang there)."""
