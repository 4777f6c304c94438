"""Training data: read rows, render chats, mask prompts, tokenize (cached), pack or pad batches.

    data = fnlm.data.prepare("data/demo.jsonl", tok, max_seq_length=1024)   # -> TokenizedData
    for batch in fnlm.data.micro_batches(data, batch_size=4, max_seq_length=1024, epoch=0):
        loss = fnlm.loss(params, batch, lora=lora, reduction="sum")

    # a hub dataset's split and subset, its columns named, 4 tokenizing processes
    fnlm.data.prepare("org/chats", tok, max_seq_length=2048, split="train_sft", subset="en",
                      columns={"messages": "dialog"}, num_proc=4, on_bad_row="skip")

Sources: a JSONL / JSON / Parquet file, a directory of them (read in this process unless
`num_proc` or `streaming` is asked for), or, with the optional `datasets` package, a hub dataset
or a saved one. Row formats, detected per row (see `fnlm.data.rows`): chat (messages), ShareGPT
(conversations), Alpaca, prompt/completion and text.

Everything but raw text becomes a chat and is rendered with the model's chat template; with
`train_on_responses_only` only the assistant turns (and their end-of-turn tokens) carry labels
(`fnlm.data.chat`). Text longer than max_seq_length is split into blocks. Labels are aligned
with the tokens as in transformers (`fnlm.loss` shifts them) and are -100 where nothing is
learned. Modules: rows (reading, formats), chat (response spans), tokenize (rows -> examples),
sources (`datasets`), prepare; batch functions live in fnlm.batches.
"""

from fnlm.batches import (  # noqa: F401  (fnlm.data's batch functions live in fnlm.batches)
    IGNORE_INDEX,
    PACKING_STRATEGIES,
    collate,
    collate_packed,
    collate_padded,
    epoch_plan,
    micro_batches,
    pack,
    piece,
    trained_tokens,
    wrap,
)
from fnlm.data.chat import chat_pieces  # noqa: F401
from fnlm.data.prepare import CACHE_VERSION, prepare  # noqa: F401
from fnlm.data.rows import (  # noqa: F401
    FILE_SUFFIXES,
    FORMATS_HELP,
    ROLE_ALIASES,
    ROW_KEYS,
    Row,
    _turns,
    check_source,
    local_files,
    map_columns,
    read_rows,
    row_format,
    standardize,
)
from fnlm.data.tokenize import (  # noqa: F401
    BAD_ROW_POLICIES,
    Example,
    RowOptions,
    RowResult,
    TokenizedData,
    text_blocks,
    tokenize_example,
    tokenize_row,
    tokenizer_fingerprint,
)
