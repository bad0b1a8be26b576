"""Writing results safely: atomic writes and output checks, mask export formats."""
