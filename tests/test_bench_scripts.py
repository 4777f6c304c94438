"""The benchmark scripts' CPU path (--tiny): scripts/bench_train.py and scripts/bench_generate.py
run on shrunk Qwen3.5, Gemma 4 and gpt-oss configs, fnlm and the reference (transformers + peft,
bitsandbytes skipped on a CPU), and print tokens/s for both sides; the LoRA targets of the two
sides adapt the same number of parameters (the GPU comparison's fairness check).

The scripts run in this process (their main() under a patched argv): one import of transformers
and fnlm for all of it. scripts/bench_methods.py (GRPO, DPO against TRL) runs on its tiny Llama
config, one part in a process of its own.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MODELS = ("qwen3.5-9b", "gemma-4-e4b", "gpt-oss-20b")

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_configs
        import bench_generate
        import bench_load
        import bench_train

        yield bench_configs, bench_train, bench_generate, bench_load
    finally:
        sys.path.remove(str(SCRIPTS))


def run_main(module, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return capsys.readouterr().out


def test_one_config_table(scripts):
    configs, train, generate, load = scripts
    assert train.REAL_CONFIGS is configs.REAL_CONFIGS
    assert generate.REAL_CONFIGS is configs.REAL_CONFIGS
    assert load.REAL_CONFIGS is configs.REAL_CONFIGS
    for name in MODELS:  # the real sizes the issue names
        assert configs.hf_config(name).model_type == configs.REAL_CONFIGS[name]["model_type"]
    assert 8.9e9 < configs.parameter_count("qwen3.5-9b") < 9.0e9
    assert 20.8e9 < configs.parameter_count("gpt-oss-20b") < 21.0e9


def test_bench_train_tiny(scripts, tmp_path, monkeypatch, capsys):
    _, train, _, _ = scripts
    from fnlm.kernels import deltanet

    for name in ("SCAN_BACKEND", "SCAN_WIDE_BV", "SCAN_WARPS"):  # restored afterwards
        monkeypatch.setattr(deltanet, name, getattr(deltanet, name))
    common = ["--tiny", "--checkpoints", str(tmp_path / "ck"), "--out"]
    out = run_main(
        train,
        [*common, str(tmp_path / "a"), "--model", "qwen3.5-9b", "--model", "gpt-oss-20b",
         "--model", "gemma-4-e4b", "--deltanet-scan", "torch", "--deltanet-launch", "32x4"],
        monkeypatch,
        capsys,
    )  # fmt: skip
    assert "tokens/s" in out
    assert deltanet.SCAN_BACKEND == "torch"  # what Qwen3.5's layers ran (on CUDA too)
    assert (deltanet.SCAN_WIDE_BV, deltanet.SCAN_WARPS) == (32, 4)
    with pytest.raises(SystemExit):  # refused before any work, naming the option
        run_main(train, [*common, str(tmp_path / "b"), "--deltanet-launch", "12x3"], monkeypatch,
                 capsys)  # fmt: skip
    assert "--deltanet-launch" in capsys.readouterr().err
    models = json.loads((tmp_path / "a" / "bench_train.json").read_text())["models"]
    for name in MODELS:
        for who in ("fnlm", "reference"):
            assert re.search(rf"^{re.escape(name)}\s+{who}\s+[\d,]+\s", out, re.M), (name, who)
        entry = models[name]
        assert entry["fnlm"]["lora_parameters"] == entry["reference"]["lora_parameters"], name
        assert any("bitsandbytes NF4 skipped" in note for note in entry["notes"])


def test_bench_generate_tiny(scripts, tmp_path, monkeypatch, capsys):
    _, _, generate, _ = scripts
    models = [arg for name in MODELS for arg in ("--model", name)]
    argv = ["--tiny", *models, "--dir", str(tmp_path / "ck"), "--out", str(tmp_path)]
    out = run_main(generate, argv, monkeypatch, capsys)
    assert "fnlm tok/s b1 | transformers tok/s b1" in out
    for name in MODELS:
        assert re.search(rf"^\| {re.escape(name)} \| nf4 \| [\d.]+ \| [\d.]+ \|", out, re.M), name
    results = json.loads((tmp_path / "bench_generate.json").read_text())
    assert all(len(results[f"{name} nf4"]["fnlm"]) > 1 for name in MODELS)


def test_bench_generate_refuses_an_unknown_gemv_variant(scripts, monkeypatch, capsys):
    """A misspelt --gemv-variants stops at parsing, naming it, before any checkpoint is written."""
    _, _, generate, _ = scripts
    monkeypatch.setattr(sys, "argv", [generate.__file__, "--gemv-variants", "fixup,swep"])
    with pytest.raises(SystemExit) as exit_:
        generate.main()
    assert exit_.value.code == 2
    assert "--gemv-variants: unknown ['swep']" in capsys.readouterr().err
    assert generate.gemv_variants("sweep,fixup") == ["sweep", "fixup"]


METHODS_TINY = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--prompts", "2",
                "--generations", "2", "--prompt-length", "8", "--completion-length", "8",
                "--dpo-batch", "2"]  # fmt: skip


def test_bench_methods_tiny(tmp_path, monkeypatch):
    """GRPO and DPO, fnlm and TRL, one step each on the tiny config: every part reports a step
    time and the ratios are computed; the default runs each part in a process of its own."""
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_methods

    common = [*METHODS_TINY, "--checkpoints", str(tmp_path / "ck")]
    results = bench_methods.main([*common, "--in-process", "--out", str(tmp_path)])
    for method in ("grpo", "dpo"):
        entry = results["models"]["tiny"][method]
        assert "step_s" in entry["fnlm"] and "step_s" in entry["trl"], entry
        assert entry["speedup"] > 0
    assert results["models"]["tiny"]["grpo"]["fnlm"]["completion_length"] == 8
    alone = bench_methods.main([*common, "--method", "dpo", "--skip-reference", "--out",
                                str(tmp_path / "alone")])  # fmt: skip
    figures = alone["models"]["tiny"]["dpo"]["fnlm"]
    assert "step_s" in figures and figures["tokens_per_s"] > 0, figures
