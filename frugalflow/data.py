"""DVC stage `prepare_data`: a corpus split by document into disjoint token windows.

Documents are split by a hash of their key, so the same document always lands in the
same split: sha1(key) % 5 in {0, 1, 2} -> calibration, 3 -> training, 4 -> evaluation.
Each split's texts are joined with a blank line, tokenized with the base model's
tokenizer and cut into `window`-token windows; at most the first `*_windows` of each are
kept (the pydoc topics give 156 calibration, 39 training and 24 evaluation windows of 512).
`calib_mix` appends the first windows of other text to the calibration split (e.g. other
languages: corpora/README.md). Written as `<split>.safetensors` (int64 [n, window]) plus
`manifest.json`, which lists where the calibration windows came from.

    python -m frugalflow.data --params params.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from frugalflow.config import DataConfig
from frugalflow.input_files import matching_files
from frugalflow.recipe_io import load_recipe

SPLITS = ("calib", "train", "eval")


def load_corpus(cfg: DataConfig) -> dict[str, str]:
    """Document key -> text."""
    if cfg.corpus == "pydoc_topics":
        import pydoc_data.topics

        return dict(pydoc_data.topics.topics)
    docs = {}
    for name in cfg.text_files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_files: {path} does not exist")
        docs[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    return docs


def calib_mix_windows(cfg: DataConfig, encode) -> tuple[list[torch.Tensor], dict]:
    """The windows of each `calib_mix` source (sorted by name) and, per source, its files,
    tokens and windows. Raises FileNotFoundError for a pattern that matches no file and
    ValueError for a source too short for its windows."""
    parts, sources = [], {}
    for name, source in sorted(cfg.calib_mix.items()):
        files: set[Path] = set()
        for pattern in source.text_files:
            hits = matching_files(pattern)
            if not hits:
                raise FileNotFoundError(f"data.calib_mix.{name}.text_files: {pattern!r} matches no file "
                                        f"(relative to {Path.cwd()})")
            files.update(hits)
        ordered = sorted(files)
        ids = encode("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in ordered))
        windows = to_windows(ids, cfg.window, source.windows)
        if len(windows) < source.windows:
            raise ValueError(f"data.calib_mix.{name}: {len(ids)} tokens give {len(windows)} windows of "
                             f"{cfg.window}, fewer than windows={source.windows}; add text or ask for fewer")
        parts.append(windows)
        sources[name] = {"files": [str(p) for p in ordered], "tokens": len(ids), "windows": len(windows)}
    return parts, sources


def split_of(key: str) -> str:
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5
    return "calib" if bucket <= 2 else ("train" if bucket == 3 else "eval")


def split_documents(docs: dict[str, str]) -> dict[str, list[str]]:
    """Split name -> sorted document keys; splits are disjoint by construction."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in sorted(docs):
        out[split_of(key)].append(key)
    return out


def to_windows(token_ids: list[int], window: int, limit: int) -> torch.Tensor:
    n = min(len(token_ids) // window, limit)
    return torch.tensor(token_ids[: n * window], dtype=torch.long).reshape(n, window)


def tokenize_fn(tokenizer_dir: str | Path):
    """text -> token ids without special tokens. A fast tokenizer's tokenizer.json is run by the
    `tokenizers` library directly (the ids PreTrainedTokenizerFast gives, without importing
    transformers); anything else goes through AutoTokenizer."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
        return lambda text: backend.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


def prepare_data(cfg: DataConfig, tokenizer_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    out_dir = Path(out_dir or cfg.path)
    encode = tokenize_fn(tokenizer_dir)
    docs = load_corpus(cfg)
    keys = split_documents(docs)
    wanted = {"calib": cfg.calib_windows, "train": cfg.train_windows, "eval": cfg.eval_windows}
    manifest: dict = {"window": cfg.window, "corpus": cfg.corpus, "splits": {}}
    tensors = {}
    for split in SPLITS:
        text = "\n\n".join(docs[k] for k in keys[split])
        ids = encode(text)
        windows = to_windows(ids, cfg.window, wanted[split])
        if len(windows) == 0 and wanted[split] > 0:
            raise ValueError(f"the {split} split of corpus {cfg.corpus!r} has {len(ids)} tokens, fewer than "
                             f"one window of data.window={cfg.window}; add text or lower data.window")
        tensors[split] = windows
        manifest["splits"][split] = {"documents": len(keys[split]), "tokens": len(ids),
                                     "windows": len(windows), "first_keys": keys[split][:5]}
    if cfg.calib_mix:
        parts, sources = calib_mix_windows(cfg, encode)
        calib = manifest["splits"]["calib"]
        calib["sources"] = {cfg.corpus: {"windows": calib["windows"]}} | sources
        tensors["calib"] = torch.cat([tensors["calib"], *parts])
        calib["windows"] = len(tensors["calib"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, windows in tensors.items():
        save_file({"windows": windows.contiguous()}, str(out_dir / f"{split}.safetensors"))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_windows(data_dir: str | Path, split: str) -> torch.Tensor:
    path = Path(data_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare_data stage (dvc repro prepare_data)")
    return load_file(str(path))["windows"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokenizer", default=None, help="default: base_model.path")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.params)
    manifest = prepare_data(recipe.data, args.tokenizer or recipe.base_model.path)
    for split, info in manifest["splits"].items():
        mix = ", ".join(f"{k} {v['windows']}" for k, v in info.get("sources", {}).items())
        print(f"prepare_data: {split}: {info['documents']} documents, {info['tokens']} tokens, "
              f"{info['windows']} windows" + (f" ({mix})" if mix else ""))


if __name__ == "__main__":
    main()
