"""Text generation: a preallocated KV cache, prefill in one pass, then one-token decode steps.

    text = fnlm.generate(params, tok, "Hello", max_new_tokens=32)
    texts = fnlm.generate(params, tok, [[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=0)
    fnlm.generate(params, tok, "Hello", sampling=Sampling(temperature=0.7, top_p=0.9, seed=0))

Four modules, each usable alone:
- `sampling`: the frozen `Sampling` knobs, transformers' logits processors (`process_logits`) and
  the next-token choice (`choose`);
- `step`: the cache and the two model passes (`init_cache`, `prefill`, `decode_step`), and the
  passes as they run: torch.compile'd layers (batch, prompt and cache lengths dynamic
  dimensions), the decode step inside a CUDA graph kept across calls (`DecodeState`,
  `release_graphs`);
- `tokens`: the token loop (`generate_tokens`): left-padded batches, sampling, per-sequence
  stopping on eos; on CUDA the host reads token t while the device already computes token t + 1;
- `text`: `generate`, prompts or conversations through the tokenizer and chat template, stop
  strings, streaming of text pieces.
"""

from fnlm.generate.sampling import GREEDY, Sampling, choose, process_logits
from fnlm.generate.step import (
    DecodeState,
    cache_length,
    decode_step,
    graphable,
    init_cache,
    prefill,
    release_graphs,
)
from fnlm.generate.text import TextRow, generate
from fnlm.generate.tokens import generate_tokens

__all__ = [
    "GREEDY",
    "DecodeState",
    "Sampling",
    "TextRow",
    "cache_length",
    "choose",
    "decode_step",
    "generate",
    "generate_tokens",
    "graphable",
    "init_cache",
    "prefill",
    "process_logits",
    "release_graphs",
]
