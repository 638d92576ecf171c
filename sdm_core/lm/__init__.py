"""sdm_core.lm: the language-model glue around the SDM estimator.

Where models come from (:mod:`sdm_core.lm.models`), how a (prompt, response) pair becomes the head's input h
(:mod:`sdm_core.lm.embedding`), and the deployable bundle of LM, tokenizer and SDM head
(:mod:`sdm_core.lm.bundle`). It imports transformers and peft; the estimator modules of :mod:`sdm_core` never import
it, so the estimator stays usable on any embeddings without a language-model stack.
"""
