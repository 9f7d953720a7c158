"""Benchmarks: tokenlean side by side with its peers, same weights, same prompts, same run.

- `prompts`: deterministic held-out code prompts of an exact token length.
- `peers`: the reference implementations (transformers' generate), imported lazily.
- `report`: the table on stdout and one JSON file per run; `plot`: PNG plots.
- `decode`: `tokenlean bench decode`, plain greedy decoding tokens/s.
- `tasks` + `spec`: `tokenlean bench spec`, lossless speculative decoding, Spec-Bench style.
"""
