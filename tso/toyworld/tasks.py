"""The toy world's tasks: instruction prompts whose answers a program can check.

Seven families of short prompts, from easy to hard for a tiny character-level model:
copy-like (``spell``, ``reverse``), small algorithms (``sort``, ``count``), arithmetic (``add``,
``sub``) and recall from a fixed table of made-up countries (``capital``). Capacity shows in which
families a model gets right, so models of different sizes and training budgets reach clearly
different quality.

Splits ("train", "pref", "eval") are a pure function of a task's *canonical* form (a hash), not of
the seed or the order of generation, so they can never overlap whatever is generated. For the
algorithmic families the canonical form is the problem itself (an eval problem is never seen in
training, in any wording); for ``capital`` it is (country, wording): the facts are learnt in
training and recalled under wordings held out from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from tso.io import atomic_write_jsonl

SPLITS = ("train", "pref", "eval")
# Share of the canonical-task space per split (by hash), in percent.
SPLIT_PERCENT = {"train": 70, "pref": 15, "eval": 15}
FAMILIES = ("add", "sub", "reverse", "sort", "count", "capital", "spell")

# The world is fixed (its own constant seed): every build and every run sees the same facts.
WORLD_SEED = 20240903
N_COUNTRIES = 80
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COUNT_ALPHABET = "abcde"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "sub": ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."),
    "reverse": ("Reverse the word {w}.", "Write {w} backwards.", "Reverse: {w}"),
    "sort": ("Sort the digits {d}.", "Sort ascending: {d}", "Put in order: {d}"),
    "count": ("How many {c} in {s}?", "Count the letter {c} in {s}.", "Number of {c}'s in {s}?"),
    "capital": (
        "What is the capital of {x}?",
        "Name the capital of {x}.",
        "Capital city of {x}?",
        "Which city is the capital of {x}?",
        "{x} has which capital?",
        "Tell me the capital of {x}.",
    ),
    "spell": ("Spell {w} with dashes.", "Spell out {w} using dashes.", "Write {w} letter by letter with dashes."),
}


# ----------------------------------------------------------------------------- the fact table


def _made_up_word(rng: random.Random, syllables: int) -> str:
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u"]
    codas = ["", "", "", "n", "r", "l", "s"]
    return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))


def fact_table() -> dict[str, str]:
    """Made-up country -> capital, fixed by WORLD_SEED (names and capitals all distinct)."""
    rng = random.Random(WORLD_SEED)
    countries: dict[str, str] = {}
    used: set[str] = set()
    while len(countries) < N_COUNTRIES:
        country = (_made_up_word(rng, 2) + rng.choice(["ia", "a", "or", "en", "ar"])).capitalize()
        capital = _made_up_word(rng, 2).capitalize()
        if country in used or capital in used or len(capital) < 4:
            continue
        used.update((country, capital))
        countries[country] = capital
    return countries


FACTS = fact_table()

# ----------------------------------------------------------------------------- families


def _operands(rng: random.Random, level: int, sub: bool) -> tuple[int, int]:
    """Level 1: one digit and one digit (100 facts to learn); level 2: two digits and one digit."""
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
    else:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        if not sub and rng.random() < 0.5:
            a, b = b, a
    if sub and b > a:
        a, b = b, a
    return a, b


def _family_add(rng: random.Random) -> dict:
    level = rng.randint(1, 2)
    a, b = _operands(rng, level, sub=False)
    t = rng.randrange(len(TEMPLATES["add"]))
    return {"canonical": f"add|{a}|{b}", "template": t, "args": {"a": a, "b": b}, "answer": str(a + b)}


def _family_sub(rng: random.Random) -> dict:
    level = rng.randint(1, 2)
    a, b = _operands(rng, level, sub=True)
    t = rng.randrange(len(TEMPLATES["sub"]))
    return {"canonical": f"sub|{a}|{b}", "template": t, "args": {"a": a, "b": b}, "answer": str(a - b)}


def _random_word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _family_reverse(rng: random.Random) -> dict:
    w = _random_word(rng, 2, 5)
    t = rng.randrange(len(TEMPLATES["reverse"]))
    return {"canonical": f"reverse|{w}", "template": t, "args": {"w": w}, "answer": w[::-1]}


def _family_sort(rng: random.Random) -> dict:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
    t = rng.randrange(len(TEMPLATES["sort"]))
    d = " ".join(map(str, digits))
    return {"canonical": f"sort|{d}", "template": t, "args": {"d": d},
            "answer": " ".join(map(str, sorted(digits)))}


def _family_count(rng: random.Random) -> dict:
    s = "".join(rng.choice(_COUNT_ALPHABET) for _ in range(rng.randint(3, 7)))
    c = rng.choice(_COUNT_ALPHABET)
    t = rng.randrange(len(TEMPLATES["count"]))
    return {"canonical": f"count|{c}|{s}", "template": t, "args": {"c": c, "s": s}, "answer": str(s.count(c))}


def _family_spell(rng: random.Random) -> dict:
    w = _random_word(rng, 2, 5)
    t = rng.randrange(len(TEMPLATES["spell"]))
    return {"canonical": f"spell|{w}", "template": t, "args": {"w": w}, "answer": "-".join(w)}


def _capital_space() -> list[dict]:
    """Every capital task (small space: enumerated, not sampled). The wording is part of the key."""
    out = []
    for x, cap in FACTS.items():
        for t in range(len(TEMPLATES["capital"])):
            out.append({"canonical": f"capital|{x}|{t}", "template": t, "args": {"x": x}, "answer": cap})
    return out


_SAMPLERS: dict[str, Callable[[random.Random], dict]] = {
    "add": _family_add,
    "sub": _family_sub,
    "reverse": _family_reverse,
    "sort": _family_sort,
    "count": _family_count,
    "spell": _family_spell,
}

# ----------------------------------------------------------------------------- splits and records


def split_of(canonical: str) -> str:
    """The split a canonical task belongs to: a hash, independent of seed and generation order."""
    h = int.from_bytes(hashlib.sha256(f"tso-toyworld|{canonical}".encode()).digest()[:8], "big") % 100
    acc = 0
    for name in SPLITS:
        acc += SPLIT_PERCENT[name]
        if h < acc:
            return name
    raise AssertionError("split percentages must sum to 100")


def task_id(canonical: str) -> str:
    family = canonical.split("|", 1)[0]
    return f"{family}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def _record(family: str, raw: dict, split: str) -> dict:
    prompt = TEMPLATES[family][raw["template"]].format(**raw["args"])
    return {
        "id": task_id(raw["canonical"]),
        "family": family,
        "prompt": prompt,
        "human": raw["answer"],
        "answer": raw["answer"],  # what the verifier checks (equal to the human reference)
        "split": split,
        "canonical": raw["canonical"],
        "args": dict(raw["args"]),
    }


def _quotas(n: int, families: tuple[str, ...]) -> dict[str, int]:
    base, extra = divmod(n, len(families))
    return {f: base + (1 if i < extra else 0) for i, f in enumerate(families)}


def generate_tasks(split: str, n: int, seed: int = 0, families: Iterable[str] | None = None) -> list[dict]:
    """``n`` distinct tasks of one split, balanced over families, deterministic given ``seed``.

    A family whose space in the split is smaller than its quota (only ``capital``: 480 tasks in
    all) contributes what exists; the result is then shorter than ``n``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (have {SPLITS})")
    fams = tuple(families or FAMILIES)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown} (have {FAMILIES})")
    out: list[dict] = []
    for family, quota in _quotas(n, fams).items():
        rng = random.Random(f"{seed}|{split}|{family}")
        if family == "capital":
            space = [r for r in _capital_space() if split_of(r["canonical"]) == split]
            rng.shuffle(space)
            out.extend(_record(family, r, split) for r in space[:quota])
            continue
        seen: set[str] = set()
        attempts = 0
        while len(seen) < quota and attempts < 100 * quota + 1000:
            attempts += 1
            raw = _SAMPLERS[family](rng)
            if raw["canonical"] in seen or split_of(raw["canonical"]) != split:
                continue
            seen.add(raw["canonical"])
            out.append(_record(family, raw, split))
    # Interleave families (a stable order that does not group them), deterministic for the seed.
    random.Random(f"{seed}|{split}|order").shuffle(out)
    return out


def training_pool(split: str, n: int, seed: int = 0, families: Iterable[str] | None = None) -> list[dict]:
    """``n`` tasks of a split drawn *with replacement* from each family's own distribution, every
    family equally often: the data a model is trained on (repeats allowed, so easy levels with few
    distinct problems — one-digit sums, the 80 capitals — keep their share)."""
    fams = tuple(families or FAMILIES)
    out: list[dict] = []
    for family, quota in _quotas(n, fams).items():
        rng = random.Random(f"{seed}|{split}|pool|{family}")
        if family == "capital":
            space = [r for r in _capital_space() if split_of(r["canonical"]) == split]
            out.extend(_record(family, rng.choice(space), split) for _ in range(quota))
            continue
        got = 0
        while got < quota:
            raw = _SAMPLERS[family](rng)
            if split_of(raw["canonical"]) == split:
                out.append(_record(family, raw, split))
                got += 1
    random.Random(f"{seed}|{split}|pool|{','.join(fams)}").shuffle(out)
    return out


def generate_splits(n_train: int, n_pref: int, n_eval: int, seed: int = 0) -> dict[str, list[dict]]:
    return {
        "train": generate_tasks("train", n_train, seed),
        "pref": generate_tasks("pref", n_pref, seed),
        "eval": generate_tasks("eval", n_eval, seed),
    }


# ----------------------------------------------------------------------------- JSONL


PROMPT_FIELDS = ("id", "prompt", "human", "family")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_jsonl(path, rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
    return rows


def write_prompts_jsonl(path: str | os.PathLike, tasks: Iterable[dict], full: bool = False) -> Path:
    """The prompts file of the pairs pipeline: one {id, prompt, human, family} per line.

    ``full=True`` keeps every field (``answer``, ``args``, ``split``...) so the verifier can run
    on the file's rows directly.
    """
    rows = (dict(t) if full else {k: t[k] for k in PROMPT_FIELDS} for t in tasks)
    return write_jsonl(path, rows)


def task_from_row(row: dict) -> dict:
    """Rebuild a full task record (what the verifier needs) from a prompts-file row by its prompt.

    The prompt text identifies the task; its family and reference answer are checked against it.
    """
    for family in FAMILIES:
        if row.get("family") not in (None, family):
            continue
        rec = _parse_prompt(family, row["prompt"])
        if rec is not None:
            return rec
    raise ValueError(f"prompt {row.get('prompt')!r} is not a toy-world task")


def _parse_prompt(family: str, prompt: str) -> dict | None:
    import re

    for t, template in enumerate(TEMPLATES[family]):
        pattern = "^" + re.escape(template).replace(r"\{", "{").replace(r"\}", "}") + "$"
        pattern = re.sub(r"\{(\w)\}", r"(?P<\1>.+?)", pattern)
        m = re.match(pattern, prompt)
        if not m:
            continue
        args = m.groupdict()
        try:
            raw = _raw_from_args(family, t, args)
        except (ValueError, KeyError):
            continue
        if TEMPLATES[family][t].format(**raw["args"]) != prompt:
            continue
        return _record(family, raw, split_of(raw["canonical"]))
    return None


def _raw_from_args(family: str, t: int, args: dict) -> dict:
    if family in ("add", "sub"):
        a, b = int(args["a"]), int(args["b"])
        ans = a + b if family == "add" else a - b
        return {"canonical": f"{family}|{a}|{b}", "template": t, "args": {"a": a, "b": b}, "answer": str(ans)}
    if family == "reverse":
        w = args["w"]
        return {"canonical": f"reverse|{w}", "template": t, "args": {"w": w}, "answer": w[::-1]}
    if family == "spell":
        w = args["w"]
        return {"canonical": f"spell|{w}", "template": t, "args": {"w": w}, "answer": "-".join(w)}
    if family == "sort":
        digits = [int(x) for x in args["d"].split(" ")]
        d = " ".join(map(str, digits))
        return {"canonical": f"sort|{d}", "template": t, "args": {"d": d},
                "answer": " ".join(map(str, sorted(digits)))}
    if family == "count":
        c, s = args["c"], args["s"]
        if len(c) != 1:
            raise ValueError(c)
        return {"canonical": f"count|{c}|{s}", "template": t, "args": {"c": c, "s": s}, "answer": str(s.count(c))}
    if family == "capital":
        x = args["x"]
        return {"canonical": f"capital|{x}|{t}", "template": t, "args": {"x": x}, "answer": FACTS[x]}
    raise KeyError(family)
