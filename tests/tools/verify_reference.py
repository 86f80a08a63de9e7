"""Check a boundary checkpoint's stored reference log-probs against an independent recomputation.

Run it in a fresh process (``python -m tests.tools.verify_reference CKPT... --pairs PAIRS``): it loads the policy
saved at the boundary with ``from_pretrained`` and recomputes each pair's log-probs one unpadded
sequence at a time with ``tso.method.logprobs.slow_sequence_logprob`` (full logits, no batching),
which shares no code with the batched training path. With ``--base`` it also reports how far the
stored values are from the base model's, to show the check can tell the two apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tso.method.logprobs import slow_sequence_logprob
from tso.train.checkpoint import read_reference, read_state
from tso.train.data import encode_prompt, encode_response, read_pairs


def _load(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tok


def check_reference(checkpoint_dir: str | Path, pairs_path: str | Path, base_path: str | Path | None = None) -> dict[str, Any]:
    ckpt = Path(checkpoint_dir)
    state = read_state(ckpt)
    found = read_reference(ckpt)
    if found is None:
        raise ValueError(f"{ckpt}: no stored reference log-probs (the last boundary, or frozen-copy mode)")
    minibatch, stored = found
    model, tok = _load(ckpt / "policy")
    base = _load(base_path)[0] if base_path else None
    rows = {r["id"]: r for r in read_pairs(pairs_path)}
    diffs, base_diffs = [], []
    for pid, (chosen, rejected) in stored.items():
        row = rows[pid]
        prompt = encode_prompt(tok, row["prompt"])
        for text, value in ((row["chosen"], chosen), (row["rejected"], rejected)):
            resp = encode_response(tok, text)
            diffs.append(abs(slow_sequence_logprob(model, prompt, resp) - value))
            if base is not None:
                base_diffs.append(abs(slow_sequence_logprob(base, prompt, resp) - value))
    return {"checkpoint": str(ckpt), "boundary": state["boundary"], "minibatch": minibatch, "pairs": len(stored),
            "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "min_abs_diff_base": min(base_diffs) if base_diffs else None,
            "mean_abs_diff_base": sum(base_diffs) / len(base_diffs) if base_diffs else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tools.verify_reference", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--pairs", required=True)
    p.add_argument("--base")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = [check_reference(c, args.pairs, args.base) for c in args.checkpoints]
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
