"""Writes pydoc_mc.jsonl: "which section of the Python reference is this passage from?", four
choices, from the pydoc topics that ship with Python (no download). Deterministic: one item
per topic with a usable paragraph, distractors and answer position drawn from a generator
seeded by the topic key. The committed file was made with Python 3.11.

    python evals/lm_eval/pydoc_mc/make_data.py
"""
from __future__ import annotations

import json
import pydoc_data.topics
import random
import re
from pathlib import Path

N_CHOICES = 4
MIN_CHARS, MAX_CHARS = 160, 480


def title_and_body(text: str) -> tuple[str, str]:
    """The first heading (a line underlined with *, = or -) and the text after it."""
    lines = text.strip("\n").split("\n")
    if len(lines) > 1 and lines[1] and set(lines[1]) <= set("*=-"):
        return lines[0].strip(), "\n".join(lines[2:])
    return "", text


def passage(body: str) -> str | None:
    """The first prose paragraph of at least MIN_CHARS, whitespace collapsed, cut at a word."""
    for para in re.split(r"\n\s*\n", body):
        if para.startswith("   ") or re.search(r"\n[*=-]{3,}", para):
            continue  # code blocks, grammar and headings
        text = " ".join(para.split())
        if len(text) < MIN_CHARS:
            continue
        if len(text) > MAX_CHARS:
            text = text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
        return text
    return None


def build() -> list[dict]:
    topics = pydoc_data.topics.topics
    items = {}
    for key in sorted(topics):
        title, body = title_and_body(topics[key])
        text = passage(body)
        if title and text and title not in {i["title"] for i in items.values()}:
            items[key] = {"title": title, "passage": text}
    titles = sorted(i["title"] for i in items.values())
    out = []
    for key, item in items.items():
        rng = random.Random(f"pydoc_mc:{key}")
        choices = rng.sample([t for t in titles if t != item["title"]], N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, item["title"])
        out.append({"id": key, "passage": item["passage"], "choices": choices, "label": label})
    return out


def main() -> None:
    path = Path(__file__).with_name("pydoc_mc.jsonl")
    items = build()
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    print(f"{path}: {len(items)} items")


if __name__ == "__main__":
    main()
