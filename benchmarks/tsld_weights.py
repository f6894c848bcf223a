"""How far TSLD's token weights move its loss from plain KL, SmolLM2-135M: the weights on the text
the default recipe distils on (the teacher's own samples) and on the calibration corpus, against
the student before distillation.

    python benchmarks/tsld_weights.py [--sequences 71] [--length 256]

The student is params.yaml's stages before distillation, run like benchmarks/domains.py (reused
from its `--work` folder). Texts: `generated`, the default's training text (the teacher's samples,
the recipe's seed, as many and as long as the stage trains on); `corpus`, as many windows of the
calibration corpus's train split (at most) cut to the same length. Per sequence of L scored tokens, with w
TSLD's weights (frugalflow.distill.losses.token_scale) and kl_t the student's KL from the teacher:
- effective share = 1 / (L * sum w^2): 1 when every token weighs the same, 1/L for one token;
- top weight = L * max w, and p90 / p10 of L * w;
- emphasis = sum w * kl / mean kl: TSLD's starting objective over KL's (1: the same weighting);
- corr: Pearson correlation between a token's score and its kl within the sequence.
Medians over sequences; writes tsld_weights.json and tsld_weights.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.domains import before_distillation, recipe_and_folders  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from frugalflow.data import load_windows  # noqa: E402
from frugalflow.distill.losses import IGNORE_INDEX, next_token_labels, token_scale  # noqa: E402
from frugalflow.models import load_model  # noqa: E402
from frugalflow.teacher_text import generated_windows  # noqa: E402

SCALES = (("target", 10.0), ("target", 3.0), ("entropy", 10.0))


def weight_stats(weights: torch.Tensor, kl: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Medians over sequences of the effective share, top weight, p90/p10, emphasis and the
    correlation of a token's score with its kl (module docstring), for weights, kl and valid of
    shape [N, T]. Within a sequence a token's score is tau * log w plus a constant, so the
    correlation is taken with log w."""
    rows = {"effective_share": [], "top_weight": [], "p90_p10": [], "emphasis": [], "corr_score_kl": []}
    for w, k, v in zip(weights, kl, valid):
        w, k = w[v].double(), k[v].double()
        n = len(w)
        rel = n * w
        rows["effective_share"].append(float(1 / (n * (w**2).sum())))
        rows["top_weight"].append(float(rel.max()))
        rows["p90_p10"].append(float(rel.quantile(0.9) / rel.quantile(0.1)))
        rows["emphasis"].append(float((w * k).sum() / k.mean()))
        x, y = w.log() - w.log().mean(), k - k.mean()
        rows["corr_score_kl"].append(float((x * y).sum() / (x.norm() * y.norm())))
    return {name: round(statistics.median(values), 3) for name, values in rows.items()}


@torch.no_grad()
def measure(teacher, student, windows: torch.Tensor, batch: int = 4) -> list[dict]:
    """One row per (score, tau) of SCALES on `windows`, a batch of sequences at a time."""
    labels = next_token_labels(windows)
    kl, weights = [], {scale: [] for scale in SCALES}
    for ids, y in zip(windows.split(batch), labels.split(batch)):
        t = teacher(input_ids=ids).logits[:, :-1].float()
        s = student(input_ids=ids).logits[:, :-1].float()
        kl.append(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1))
        for scale_by, tau in SCALES:
            weights[scale_by, tau].append(token_scale(t, y, tau, scale_by))
    kl, valid = torch.cat(kl), labels != IGNORE_INDEX
    return [{"scale_by": scale_by, "tau": tau, **weight_stats(torch.cat(w), kl, valid),
             "mean_kl": round(float(kl[valid].mean()), 4)} for (scale_by, tau), w in weights.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--sequences", type=int, help="sequences per text (default: the stage's generated_sequences)")
    parser.add_argument("--length", type=int, help="tokens per sequence (default: the stage's generated_tokens)")
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "bench-domains"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    recipe, base, data, work = recipe_and_folders(args.params, args.work)
    *compress, last = recipe.stages
    if last.method != "tsld":
        raise SystemExit(f"{args.params}: the last stage is {last.method}, not tsld")
    n, length = args.sequences or last.generated_sequences, args.length or last.generated_tokens
    before, _ = before_distillation(compress, base, data, work, recipe.seed)
    started = time.time()
    texts = {"generated": generated_windows(base, n, length, recipe.seed),
             "corpus": load_windows(data, "train")[:n, :length]}
    teacher, student = load_model(base), load_model(before)
    rows = [{"text": name, "sequences": len(w), "tokens": w.shape[1], **row}
            for name, w in texts.items() for row in measure(teacher, student, w)]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe(), "student": before.name,
              "seed": recipe.seed, "seconds": round(time.time() - started, 1), "rows": rows}
    out = Path(args.out)
    (out / "tsld_weights.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# TSLD's token weights against plain KL, SmolLM2-135M-Instruct", "",
             f"Produced by `python benchmarks/tsld_weights.py` ({result['date']}, {result['machine']}). Student: "
             f"params.yaml's stages before distillation ({before.name}); teacher: the base model. `generated`: "
             f"the default's training text (the teacher's samples, seed {recipe.seed}); `corpus`: the calibration "
             f"corpus's train windows cut to {length} tokens. Per sequence: effective share 1 / (L sum w^2) "
             "(1: uniform), top weight L max w, p90/p10 of L w, emphasis sum w kl / mean kl (TSLD's starting "
             "objective over KL's); medians over sequences. corr: Pearson correlation of a token's score with "
             "its KL within the sequence.", "",
             "| text | score, tau | sequences x tokens | effective share | top weight | p90 / p10 | emphasis | "
             "corr(score, KL) | mean KL |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['text']} | {r['scale_by']}, {r['tau']:g} | {r['sequences']} x {r['tokens']} | "
              f"{r['effective_share']} | {r['top_weight']} | {r['p90_p10']} | {r['emphasis']} | "
              f"{r['corr_score_kl']} | {r['mean_kl']} |" for r in rows]
    (out / "tsld_weights.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
