"""KVG training data for verl: conversion, composition, the RL difficulty filter, and CoT-SFT data.

* :mod:`karl_verl.data.prompts`: the query, answer-format suffix and ground-truth templates
  (shared with the evaluator);
* :mod:`karl_verl.data.schema`: validated annotations, coordinate systems, verl's RL parquet schema,
  and :class:`~karl_verl.data.schema.DataError` (file, row and field of bad input);
* :mod:`karl_verl.data.annotations`: reading JSONL, CSV, parquet and ``datasets`` folders;
* :mod:`karl_verl.data.convert`: annotations -> verl RL parquet (``karl-verl data convert``);
* :mod:`karl_verl.data.compose`: multi-entity composites + probe set (``karl-verl data compose``);
* :mod:`karl_verl.data.filter`: keep 1..k-1 of k correct (``karl-verl data filter``);
* :mod:`karl_verl.data.sft`: sharegpt CoT-SFT files -> verl SFT parquet (``karl-verl data sft-convert``);
* :mod:`karl_verl.data.cot`: CoT rationales from a teacher, and a built-in CoT set (``karl-verl data cot``);
* :mod:`karl_verl.data.teacher`: the teachers: an OpenAI-compatible endpoint, or a local model.

Importing this package imports nothing heavy (no pyarrow, PIL or torch until used).
"""
