"""The built-in miniature world: the paper's setting at a size a CPU trains in minutes.

- `tasks`: arithmetic problems with checkable answers, in a student style (one
  operation per line) and a teacher style (operations folded together);
- `tokenizer`: a small BPE with a ChatML template and `<think>`;
- `pretrain`: the plain torch loop that trains the Qwen3 student and teacher;
- `build`: `tracetailor world build`, which makes it all from a seed and caches it.
"""
