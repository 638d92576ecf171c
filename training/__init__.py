"""Fine-tuning data for SDM language models: record format, correctness functions, task builders."""
