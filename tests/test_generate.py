"""Generation against transformers' `generate`: greedy tokens, sampling filters, stops, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as hf_processors

import fnlm
from fnlm.errors import ArgumentError
from fnlm.generate import Sampling, choose, generate_tokens, process_logits
from tests.models import HF_CONFIGS, hf_configs, saved_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

# Sampled frequencies from 20,000 seeded draws: a frequency p has standard deviation
# sqrt(p(1-p)/20000) <= 0.0036, so 0.015 is four deviations (and the draws are deterministic).
SAMPLE_DRAWS = 20_000
FREQUENCY_TOL = 0.015

# An fp8 (e4m3) cache rounds keys and values to 3 mantissa bits (relative error <= 1/16); through
# attention the logits move by a few percent of their scale.
FP8_CACHE_REL_TOL = 0.1


def load_fp32(directory):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


def reference_generate(model, prompts, max_new_tokens, eos):
    """transformers' greedy generate on a left-padded batch; rows cut after their first eos."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=0,
        )[:, width:].tolist()  # fmt: skip
    rows = []
    for row in out:
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


@st.composite
def prompt_batches(draw, vocab_size: int, max_batch: int = 3):
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=max_batch))
    ids = st.integers(0, vocab_size - 1)
    return [draw(st.lists(ids, min_size=n, max_size=n)) for n in lengths]


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
@given(data=st.data())
def test_greedy_matches_transformers(model_type, data):
    config = data.draw(hf_configs(model_type))
    prompts = data.draw(prompt_batches(config.vocab_size))
    new = data.draw(st.integers(1, 12))
    eos = data.draw(st.sampled_from([None, 0, 1, 2]))  # 2 is transformers' default eos for Llama
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        ours = generate_tokens(
            params, prompts, max_new_tokens=new, eos_token_ids=[] if eos is None else [eos]
        )
        ref = reference_generate(model, prompts, new, eos)
        # each row alone (no padding) gives the same tokens as inside the batch
        alone = generate_tokens(
            params, prompts[-1:], max_new_tokens=new, eos_token_ids=[] if eos is None else [eos]
        )
    assert ours == ref
    assert alone[0] == ours[-1]


def greedy_by_forward(params, prompt, steps, lora=None):
    """Greedy decoding by recomputing the whole sequence each step: the cache-free reference."""
    ids = list(prompt)
    for _ in range(steps):
        logits = fnlm.forward(params, torch.tensor([ids], device=params["norm"].device), lora=lora)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def tiny_llama(**overrides):
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def random_lora(params):
    import fnlm.lora

    lora = fnlm.lora.init(params, r=4, alpha=8, seed=1)
    with torch.no_grad():  # B starts at zero; make the adapters change the output
        for t in fnlm.lora.parameters(lora):
            noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()))
            t.copy_(noise * 0.3)
    return lora


def test_nf4_and_lora_decode_equal_full_recompute():
    """The cached decode path runs the same leaves as `forward`: NF4 weights, LoRA unmerged."""
    pytest.importorskip("bitsandbytes")
    with saved_checkpoint(tiny_llama()) as (_, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    prompt = [3, 17, 42, 99, 5]
    assert generate_tokens(params, [prompt], max_new_tokens=8) == [
        greedy_by_forward(params, prompt, 8)
    ]
    lora = random_lora(params)
    with_lora = generate_tokens(params, [prompt], lora=lora, max_new_tokens=8)
    assert with_lora == [greedy_by_forward(params, prompt, 8, lora=lora)]


def test_fp8_cache_stays_close():
    from fnlm.generate import decode_step, init_cache, prefill

    with saved_checkpoint(tiny_llama()) as (_, directory):
        params = load_fp32(directory)
    tokens = torch.tensor([[3, 17, 42, 99, 5]])
    logits = {}
    for dtype in (torch.float32, torch.float8_e4m3fn):
        cache = init_cache(params, 1, 8, dtype=dtype)
        _, cache = prefill(params, tokens, cache)
        assert cache["k"][0].dtype == dtype
        logits[dtype] = decode_step(
            params, cache, torch.tensor([[7]]), torch.tensor([[5]]), torch.tensor([5])
        )
    exact, fp8 = logits[torch.float32], logits[torch.float8_e4m3fn]
    scale = exact.abs().max()
    assert 0 < (fp8 - exact).abs().max() <= FP8_CACHE_REL_TOL * scale
    assert (
        len(generate_tokens(params, tokens.tolist(), max_new_tokens=3, cache_dtype="fp8")[0]) == 3
    )


def test_generation_stops_at_the_context_length():
    with saved_checkpoint(tiny_llama(max_position_embeddings=12)) as (_, directory):
        params = load_fp32(directory)
    out = generate_tokens(params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=50)
    assert len(out[0]) == 3


def counting_compiles(monkeypatch) -> list:
    """The compiled layer's backend swapped for one that runs the traced graph as it is and
    records it: the returned list grows by one per compile."""
    import importlib

    step = importlib.import_module("fnlm.generate.step")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(step, "COMPILE_BACKEND", counting_backend)
    torch._dynamo.reset()
    return graphs


def test_second_call_at_a_new_length_compiles_nothing(monkeypatch):
    """The compiled layer takes the batch, the prompt length and the cache length as dynamic
    dimensions: the first call compiles the prefill and the decode step once each; calls at
    other prompt lengths and cache buckets compile nothing, a second batch size once more (a
    batch of one is specialized), and every call gives the eager tokens."""
    from fnlm.generate.step import cache_length

    graphs = counting_compiles(monkeypatch)
    with saved_checkpoint(tiny_llama(max_position_embeddings=1024)) as (_, directory):
        params = load_fp32(directory)
    short, long = [3, 17, 42], list(range(1, 121)) * 3  # cache buckets 256 and 512
    assert cache_length(len(short) + 6) == 256 and cache_length(len(long) + 6) == 512
    counts = []
    for prompts in ([short], [long], [short[:2]], [long[:57]], [[9]],
                    [short, long[:20]], [long[:7], short[:1], long[:30]]):  # fmt: skip
        compiled = generate_tokens(params, prompts, max_new_tokens=6, compile=True)
        assert compiled == generate_tokens(params, prompts, max_new_tokens=6), prompts
        counts.append(len(graphs))
    # batch 1: prefill and step; batch 2: the two again, with the batch dynamic; batch 3: none
    assert counts == [2, 2, 2, 2, 2, 4, 4]


def test_compiled_prefill_equals_the_eager_one(monkeypatch):
    """prefill_fn(True) at several prompt lengths (one compile): the same logits and cache
    contents as the eager prefill, bit for bit (the counting backend runs the traced ops)."""
    from fnlm.generate.step import init_cache, prefill, prefill_fn

    graphs = counting_compiles(monkeypatch)
    with saved_checkpoint(tiny_llama(max_position_embeddings=256)) as (_, directory):
        params = load_fp32(directory)
    g = torch.Generator().manual_seed(0)
    for length in (5, 33, 2, 100):
        tokens = torch.randint(0, 128, (2, length), generator=g)
        mask = torch.ones_like(tokens)
        mask[1, : length // 2] = 0  # a left-padded row
        caches = [init_cache(params, 2, 128, attention_mask=mask) for _ in range(2)]
        with torch.no_grad():
            eager, _ = prefill(params, tokens, caches[0], attention_mask=mask)
            compiled, _ = prefill_fn(True)(params, tokens, caches[1], attention_mask=mask)
        assert torch.equal(compiled, eager)
        for name in ("k", "v"):
            assert all(map(torch.equal, caches[0][name], caches[1][name]))
    assert len(graphs) == 1


def test_kept_decode_states_are_reused_per_shape_and_model(monkeypatch):
    """The graph cache's bookkeeping, on CPU with capture stood in by the plain step: a second
    call of the same batch and cache bucket takes the kept state (no new capture) and gives the
    same tokens; adapters, batch and bucket each get their own; a state in use is never shared;
    another model empties the cache."""
    import importlib

    step = importlib.import_module("fnlm.generate.step")
    captures = []
    monkeypatch.setattr(step, "will_capture", lambda params: True)
    monkeypatch.setattr(step, "capture", lambda fn, keep=(): captures.append(fn) or fn)
    monkeypatch.setattr(step, "COMPILE_BACKEND", lambda gm, inputs: gm.forward)
    step.release_graphs()
    with saved_checkpoint(tiny_llama(max_position_embeddings=1024)) as (_, directory):
        params = load_fp32(directory)
        other = load_fp32(directory)
    lora = random_lora(params)
    run = lambda prompt, **kw: generate_tokens(
        params, [prompt], max_new_tokens=6, compile=True, **kw
    )
    first = run([3, 17, 42])
    assert len(captures) == 1
    assert run([5, 6, 7, 8, 9]) == [greedy_by_forward(params, [5, 6, 7, 8, 9], 6)]
    assert run([3, 17, 42]) == first and len(captures) == 1  # same bucket: kept state
    adapted = run([3, 17, 42], lora=lora)
    assert adapted == [greedy_by_forward(params, [3, 17, 42], 6, lora=lora)]
    assert len(captures) == 2
    run(list(range(1, 121)) * 3)  # bucket 512
    generate_tokens(params, [[1, 2], [3]], max_new_tokens=6, compile=True)  # batch 2
    assert len(captures) == 4
    assert run([3, 17, 42], lora=lora) == adapted and run([3, 17, 42]) == first
    assert len(captures) == 4
    # a state in use is not handed out twice
    args = dict(attention_mask=None, dtype=torch.float32, compile=True)
    taken = step.decode_state(params, params, 1, 256, **args)
    assert taken.step is not None
    assert step.decode_state(params, params, 1, 256, **args).step is None
    step.keep(taken)
    generate_tokens(other, [[3, 17, 42]], max_new_tokens=6, compile=True)
    assert all(state.params is other for state in step._graphs.values())
    step.release_graphs()


def test_captured_prefills_are_bucketed_and_kept(monkeypatch):
    """Where steps are graph-captured, so is the prefill, of prompts left padded to a bucketed
    length (on CPU with capture stood in by the plain call): one capture per prompt bucket of a
    kept state, none for a prompt in a bucket seen before, and the tokens of the eager path."""
    import importlib

    step = importlib.import_module("fnlm.generate.step")
    tokens_module = importlib.import_module("fnlm.generate.tokens")
    graphs = counting_compiles(monkeypatch)
    with saved_checkpoint(tiny_llama(max_position_embeddings=1024)) as (_, directory):
        params = load_fp32(directory)
    prompts = [[3, 17, 42], list(range(1, 58)), list(range(7, 107)), [9, 8], list(range(2, 72))]
    eager = [generate_tokens(params, [p], max_new_tokens=6) for p in prompts]
    first = eager[0][0]
    eager.append(generate_tokens(params, [prompts[0], prompts[2]], max_new_tokens=6))
    captures = []
    for module in (step, tokens_module):
        monkeypatch.setattr(module, "will_capture", lambda params: True)
    monkeypatch.setattr(step, "capture", lambda fn, pool=None, keep=(): captures.append(fn) or fn)
    step.release_graphs()
    assert [step.prompt_length(len(p)) for p in prompts] == [64, 64, 128, 64, 128]
    counts = []
    for prompt in prompts:
        assert generate_tokens(params, [prompt], max_new_tokens=6, compile=True) == eager.pop(0)
        counts.append(len(captures))
    assert generate_tokens(
        params, [prompts[0], prompts[2]], max_new_tokens=6, compile=True
    ) == eager.pop(0)
    # step + prefill at 64; prefill at 128; nothing new; then batch 2: step + prefill at 128
    assert counts == [2, 2, 3, 3, 3] and len(captures) == 5
    # one-token calls (no decode step: the state holds only its prefill) keep it all the same
    step.release_graphs()
    one = [generate_tokens(params, [prompts[0]], max_new_tokens=1, compile=True) for _ in "ab"]
    assert one[0] == one[1] == [[first[0]]] and len(captures) == 6
    assert len(graphs) == 4  # prefill and step, at batch 1 and batch 2
    assert [step.prompt_length(n) for n in (1, 64, 65, 1000, 1025, 2049, 8000)] == [
        64, 64, 128, 1024, 1152, 2304, 8192,
    ]  # fmt: skip
    step.release_graphs()


def test_cache_length_buckets():
    from fnlm.generate import cache_length

    assert [cache_length(n) for n in (1, 256, 257, 384, 1500, 2049, 5000)] == [
        256, 256, 512, 512, 1536, 2560, 5120,
    ]  # fmt: skip
    for n in range(1, 20000, 37):
        assert n <= cache_length(n) <= max(256, 1.25 * n + 256)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def hf_warped(
    logits, ids, *, repetition_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
):
    """transformers' processors in the order its generate builds them."""
    chain = hf_processors.LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(hf_processors.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        chain.append(hf_processors.TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(hf_processors.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(hf_processors.TopPLogitsWarper(top_p))
    if min_p:
        chain.append(hf_processors.MinPLogitsWarper(min_p))
    return chain(ids, logits.clone())


def seen_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], vocab, dtype=torch.bool).scatter_(1, ids, True)


@given(
    seed=st.integers(0, 2**16),
    repetition_penalty=st.sampled_from([1.0, 0.7, 1.3]),
    temperature=st.sampled_from([1.0, 0.5, 1.7]),
    top_k=st.sampled_from([0, 1, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_p=st.sampled_from([0.0, 0.05, 0.5]),
)
@settings(max_examples=30)  # each example is a few small tensor ops
def test_processors_equal_transformers(seed, repetition_penalty, temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 7), generator=g)
    args = dict(
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p,
    )  # fmt: skip
    ours = process_logits(logits, Sampling(**args), seen=seen_mask(ids, 50))
    assert torch.equal(ours, hf_warped(logits, ids, **args))


def test_filters_keep_exactly_the_crafted_support():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15, 0.0]])
    logits = probs.log()
    kept = lambda **kw: (
        (process_logits(logits, Sampling(**kw)) > -math.inf)[0].nonzero().flatten().tolist()
    )
    assert kept(top_k=2) == [1, 3]
    # sorted 0.5, 0.2, 0.15 reach 0.85 >= 0.8; the 0.1 and 0.05 tail (0.15 <= 0.2) goes
    assert kept(top_p=0.8) == [1, 3, 4]
    assert kept(top_p=0.5) == [1]
    # min_p 0.3 of the top 0.5 = 0.15: 0.15 itself stays (strictly below is removed)
    assert kept(min_p=0.3) == [1, 3, 4]
    assert kept(top_k=4, top_p=0.7, min_p=0.25) == [1, 3]
    seen = torch.tensor([[False, True, False, False, False, False]])
    penalize = Sampling(repetition_penalty=2.0)
    penalized = process_logits(torch.tensor([[1.0, 2.0, -1.0]]), penalize, seen=seen[:, :3])
    assert penalized.tolist() == [[1.0, 1.0, -1.0]]
    penalized = process_logits(
        torch.tensor([[1.0, -2.0]]), penalize, seen=torch.tensor([[False, True]])
    )
    assert penalized.tolist() == [[1.0, -4.0]]


def test_sampling_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.45, 0.3, 0.15, 0.06, 0.04])
    logits = probs.log().expand(SAMPLE_DRAWS, -1)
    g = torch.Generator().manual_seed(0)
    drawn = choose(logits, Sampling(temperature=1.0, top_k=3), generator=g)
    freq = torch.bincount(drawn, minlength=5).float() / SAMPLE_DRAWS
    expected = torch.tensor([0.45, 0.3, 0.15, 0.0, 0.0]) / 0.9
    assert (freq - expected).abs().max() <= FREQUENCY_TOL
    assert freq[3:].sum() == 0


def test_seeded_sampling_is_reproducible():
    with saved_checkpoint(tiny_llama()) as (_, directory):
        params = load_fp32(directory)
    prompts = [[3, 17, 42], [9, 8, 7, 6, 5]]
    run = lambda seed, **kw: generate_tokens(
        params, prompts, max_new_tokens=10, temperature=1.5, seed=seed, **kw
    )
    first = run(7)
    assert run(7) == first
    assert run(8) != first
    # filters that leave one token turn sampling into greedy decoding
    greedy = generate_tokens(params, prompts, max_new_tokens=10)
    assert run(7, top_k=1) == greedy
    assert run(7, min_p=1.0) == greedy


# ----------------------------------------------------------------------------------------------
# Text: chat, stop strings, streaming
# ----------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per ASCII character: enough of fnlm's Tokenizer for the text layer."""

    eos_token_ids = ()
    pad_token_id = 0

    def encode(self, text, *, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text


def test_stop_strings_and_streaming():
    tok = CharTokenizer()
    with saved_checkpoint(tiny_llama(max_position_embeddings=128)) as (_, directory):
        params = load_fp32(directory)
    prompts = ["Hello", [{"role": "user", "content": "Hi"}]]
    full = fnlm.generate(params, tok, prompts, max_new_tokens=30)
    assert all(len(t) == 30 for t in full)
    # a conversation is rendered by the chat template
    chat_ids = tok.encode(tok.apply_chat_template(prompts[1], add_generation_prompt=True))
    assert full[1] == tok.decode(generate_tokens(params, [chat_ids], max_new_tokens=30)[0])
    stop = full[0][10:13]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    texts, ids = fnlm.generate(
        params, tok, prompts, max_new_tokens=30, stop=[stop, "\x7f\x7f\x7f"], return_tokens=True,
        stream=lambda i, piece: pieces[i].append(piece),
    )  # fmt: skip
    assert texts[0] == full[0][: full[0].index(stop)]
    assert len(ids[0]) == full[0].index(stop) + len(stop)  # stops on the token completing it
    for i in (0, 1):
        assert "".join(pieces[i]) == texts[i]
    assert fnlm.generate(params, tok, "Hello", max_new_tokens=30) == full[0]


def test_embedded_model_chat_matches_transformers():
    """The real SmolLM2-135M-Instruct (fp32): same 20 greedy tokens as transformers, and Paris."""
    from fnlm.default import default_checkpoint

    directory = default_checkpoint()
    params, tok = fnlm.load(quant=None, dtype=torch.float32, device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    pieces: list[str] = []
    text, ids = fnlm.generate(
        params, tok, messages, max_new_tokens=20, return_tokens=True,
        stream=lambda i, piece: pieces.append(piece),
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    prompt = (
        prompt["input_ids"] if isinstance(prompt, dict | transformers.BatchEncoding) else prompt
    )
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1] :]
    assert ids == ref.tolist()[: len(ids)]
    assert "Paris" in text
    assert "".join(pieces) == text
    assert text == hf_tok.decode(ref, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_params():
    with saved_checkpoint(tiny_llama(max_position_embeddings=16)) as (_, directory):
        return load_fp32(directory)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "named"),
    [
        ([], {}, "prompts_or_messages"),
        ("x" * 16, {}, "context"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"temperature": float("nan")}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"top_k": -1}, "top_k"),
        ("hi", {"top_k": 2.5}, "top_k"),
        ("hi", {"min_p": 1.5}, "min_p"),
        ("hi", {"repetition_penalty": 0}, "repetition_penalty"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
        ("hi", {"seed": -1}, "seed"),
        ("hi", {"stop": [""]}, "stop"),
        ("hi", {"stop": [3]}, "stop"),
        ("hi", {"cache_dtype": "int4"}, "cache_dtype"),
        ([{"role": "user"}], {}, "'role' and 'content'"),
        (["hi", 3], {}, "prompts_or_messages[1]"),
        ("", {}, "empty"),
    ],
)
def test_bad_arguments_raise(small_params, prompts, kwargs, named):
    with pytest.raises(ArgumentError, match=named.replace("[", r"\[").replace("]", r"\]")):
        fnlm.generate(small_params, CharTokenizer(), prompts, **kwargs)


def test_missing_tokenizer_and_bad_token_prompts_raise(small_params):
    with pytest.raises(ArgumentError, match="tok is None"):
        fnlm.generate(small_params, None, "hi")
    with pytest.raises(ArgumentError, match="vocabulary"):
        generate_tokens(small_params, [[1, 500]])
    with pytest.raises(ArgumentError, match="prompts"):
        generate_tokens(small_params, [])


def test_models_with_host_syncs_are_not_graph_captured():
    from fnlm import models
    from fnlm.generate import graphable

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    translate = lambda config: models.config_from_hf(config.to_dict())  # noqa: E731
    assert graphable(translate(transformers.LlamaConfig(**small)))
    dynamic = transformers.LlamaConfig(
        **small, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    assert not graphable(translate(dynamic))
    mixtral = translate(
        transformers.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2)
    )
    assert not graphable(mixtral)  # the per-expert loop reads row counts on the host
    assert graphable(mixtral, grouped_experts=True)


# ----------------------------------------------------------------------------------------------
# GPU: the compiled, graph-captured decode step
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_cuda_graph_decode_matches_transformers(model_type):
    hf_config = tiny_llama() if model_type == "llama" else transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        initializer_range=0.2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )  # fmt: skip
    prompts = [[3, 17, 42, 99, 5], [7, 8]]
    with saved_checkpoint(hf_config) as (model, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
        ref = reference_generate(model, prompts, 12, None)
    for compile in (False, True):
        assert generate_tokens(params, prompts, max_new_tokens=12, compile=compile) == ref


@pytest.mark.gpu
def test_cuda_graph_nf4_decode_equals_full_recompute():
    with saved_checkpoint(tiny_llama(hidden_size=128, intermediate_size=256)) as (_, directory):
        # fp32 compute: the fused GEMV and the prefill's matmul then agree to rounding, so
        # greedy tokens cannot flip between the two paths
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cuda")
    prompt = [3, 17, 42, 99, 5]
    expected = greedy_by_forward(params, prompt, 8)
    assert generate_tokens(params, [prompt], max_new_tokens=8) == [expected]
    lora = random_lora(params)
    expected = greedy_by_forward(params, prompt, 8, lora=lora)
    assert generate_tokens(params, [prompt], lora=lora, max_new_tokens=8) == [expected]


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_cuda_graph_moe_decode_equals_eager_steps(quant, monkeypatch):
    """bf16 on sm90+: every expert matmul takes the grouped GEMM, routing stays on the device, so
    the MoE decode step is captured in a CUDA graph; its tokens equal those of the same prefill
    followed by eager steps (same kernels, so bit-equal logits; an eager prefill of the unbucketed
    prompt rounds differently in bf16 and may flip a late token), and the grouped rows equal the
    loop's."""
    import importlib

    from fnlm.models import moe

    gen = importlib.import_module("fnlm.generate.step")

    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(hf_config) as (_, directory):
        params, _ = fnlm.load(directory, quant=quant, dtype=torch.bfloat16, device="cuda")
    assert moe.grouped_everywhere(params)
    prompts = [[3, 17, 42, 99, 5], [7, 8]]
    captured = []
    graph_step = gen.graph_step
    gen.release_graphs()
    monkeypatch.setattr(gen, "graph_step", lambda *a: captured.append(1) or graph_step(*a))
    graphed = generate_tokens(params, prompts, max_new_tokens=10, compile=False)
    assert captured
    # torch.compile'd layers in the graph too (inductor may round differently: lengths only)
    compiled = generate_tokens(params, prompts, max_new_tokens=10, compile=True)
    assert len(captured) == 2 and [len(r) for r in compiled] == [10, 10]
    # the same (captured, bucketed) prefill, then every decode step run eagerly, not replayed
    gen.release_graphs()
    monkeypatch.setattr(
        gen, "graph_step", lambda p, c, t, pos, s, compile: functools.partial(
            gen.step_fn(compile), p, c, t, pos, s
        ),
    )  # fmt: skip
    assert generate_tokens(params, prompts, max_new_tokens=10, compile=False) == graphed

    config = params.config
    route = moe.route(config, torch.randn(9, 8, device="cuda"), torch.bfloat16)
    rows = torch.randn(9 * 2, 64, device="cuda", dtype=torch.bfloat16)
    stack = params["layers"][0]["mlp"]["experts"]["gate_up"]
    grouped = moe.matmul(route, rows, stack, grouped=True).float()
    looped = moe.matmul(route, rows, stack, grouped=False).float()
    assert (grouped - looped).abs().max() <= 2**-7 * looped.abs().max()


@pytest.mark.gpu
def test_cuda_second_call_replays_the_kept_graph(monkeypatch):
    """A second call of the same batch and cache bucket (another prompt length) captures nothing
    and gives the tokens of a fresh capture; a new bucket captures once more."""
    import importlib

    step = importlib.import_module("fnlm.generate.step")
    with saved_checkpoint(tiny_llama(max_position_embeddings=1024)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
    captured = []
    graph_step = step.graph_step
    monkeypatch.setattr(step, "graph_step", lambda *a: captured.append(1) or graph_step(*a))
    step.release_graphs()
    prompts = [[3, 17, 42, 99, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15], list(range(1, 121)) * 3]
    runs = [generate_tokens(params, [p], max_new_tokens=8, compile=False) for p in prompts]
    assert len(captured) == 2  # buckets 256 (twice) and 512
    for prompt, tokens in zip(prompts, runs):
        assert tokens == [greedy_by_forward(params, prompt, 8)]
    # the prefills were captured too: prompt buckets 64 (both short prompts) and 384
    assert sorted(n for s in step._graphs.values() for n in s.prefills) == [64, 384]
