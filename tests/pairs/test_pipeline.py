"""Pair formation end to end: Ray Data streams prompts through real Serve deployments of tiny models.

One app (4 matrix models, policy, an overfit judge that always answers correctness 7 / conciseness 3,
i.e. a mean score of 5) serves the module. Checks: provenance matches what each source generates
for its keyed seed; prompts without a human answer renormalise alpha; the same seed gives the same
pairs whatever the batching; thresholds route the policy's judged samples; every reject reason is
written with its line; source frequencies follow alpha and gamma.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.helpers import JUDGE_RUBRICS, train_tiny_judge
from tso.config import parse_config
from tso.method.sources import HUMAN, row_seed
from tso.pairs.pipeline import PairJob, _plan_row, form_pairs_step
from tso.pairs.prompts import as_chat

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]

PORT = 18301
APP = "tso-pairs-test"
N_PROMPTS = 24


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from tso.zoo.tiny import random_tiny_llama, save_model_dir

    root = tmp_path_factory.mktemp("pairs-models")
    dirs = {"a1": str(tiny_model_dir)}
    for name, seed in (("a2", 11), ("b", 12), ("c", 13)):
        dirs[name] = str(save_model_dir(random_tiny_llama(tiny_tokenizer, seed=seed), tiny_tokenizer, root / name))
    dirs["judge"] = str(train_tiny_judge(tmp_path_factory.mktemp("judge"), tiny_tokenizer))
    return dirs


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = []
    for i in range(N_PROMPTS):
        row = {"id": f"p{i:03d}", "prompt": f"add {i} and {i + 1}"}
        if i % 3:
            row["human"] = str(2 * i + 1)
        lines.append(json.dumps(row))
    lines[5] = "{broken json"
    lines[9] = json.dumps({"id": "p009", "prompt": "   "})
    lines.append(json.dumps({"id": "p001", "prompt": "a duplicate id"}))
    lines.append(json.dumps({"id": "long", "prompt": "x" * 500}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _engine() -> dict:
    return {"kind": "transformers", "torch_threads": 1, "max_batch_size": 32, "batch_wait_timeout_s": 0.02}


def make_cfg(model_dirs, prompts_file, run_dir, **pairs) -> object:
    res = {"num_cpus": 0.2, "max_ongoing_requests": 64}
    models = [
        {"name": "a1", "version": 1, "size": 1, "weight": 0.25},
        {"name": "a2", "version": 2, "size": 1, "weight": 0.75},
        {"name": "b", "version": 1, "size": 2},
        {"name": "c", "version": 1, "size": 4},
    ]
    return parse_config({
        "run_dir": str(run_dir),
        "seed": 7,
        "matrix": {"base": "b", "models": [
            {**m, "path": model_dirs[m["name"]], "engine": _engine(), "resources": res} for m in models
        ]},
        "judge": {"path": model_dirs["judge"], "rubrics": JUDGE_RUBRICS, "engine": _engine(), "resources": res},
        # random models rarely stop within 6 tokens: keep their cut answers (the drop rule has its own tests)
        "pairs": {"prompts": str(prompts_file), "human_weight": 0.3, "n_self": 2, "max_prompt_chars": 200,
                  "truncated": "keep", "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}, **pairs},
        "serve": {"port": PORT, "app_name": APP},
    })


@pytest.fixture(scope="module")
def app(ray_cluster, model_dirs, prompts_file, tmp_path_factory):
    from ray import serve

    from tso.serving.app import deploy

    cfg = make_cfg(model_dirs, prompts_file, tmp_path_factory.mktemp("run"))
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deploy(cfg, port=PORT)
    yield cfg
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def first_run(app, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs-1")
    res = form_pairs_step(app, 1, out, batch_size=8, concurrency=2)
    return res, pq.read_table(out / "pairs.parquet").to_pylist()


def test_outputs_summary_and_rejects(first_run):
    res, rows = first_run
    s = res["summary"]
    assert s["rejects"] == {"invalid_json": 1, "empty_prompt": 1, "duplicate_id": 1, "prompt_too_long": 1}
    rejects = [json.loads(line) for line in open(res["rejects_path"])]
    assert sorted((r["line"], r["reason"]) for r in rejects) == [
        (6, "invalid_json"), (10, "empty_prompt"), (25, "duplicate_id"), (26, "prompt_too_long")
    ]
    assert s["prompts"] == N_PROMPTS - 2 and s["pairs"] == len(rows) == N_PROMPTS - 2
    assert sum(s["pair_kinds"].values()) == s["pairs"]
    assert s["unscored_judge_answers"] == {}  # the overfit judge always answers with a score
    assert all(r["stage"] == 1 and r["seed"] == 7 for r in rows)
    assert {r["chosen_score"] for r in rows} == {5.0}  # mean of correctness 7 and conciseness 3


def test_provenance_matches_what_each_source_generates(first_run, app, prompts_file):
    from ray import serve

    _, rows = first_run
    humans = {}
    for line in open(prompts_file):
        if line.startswith('{"id"'):
            row = json.loads(line)
            humans.setdefault(row["id"], row.get("human"))  # the first row of an id is the one kept
    sampling = app.pairs.sampling.model_dump()
    checked = Counter()
    for r in rows:
        if r["kind"] != "matrix":
            continue
        if r["chosen_source"] == HUMAN:
            assert r["chosen"] == humans[r["id"]]
        else:
            assert r["chosen_source"] == "c"
            again = serve.get_deployment_handle("model-c", APP).generate.remote(
                {"prompt": as_chat(r["prompt"]), "n": 1, "seed": row_seed(7, 1, r["id"], "pos0"), **sampling}).result()
            assert again["texts"][0] == r["chosen"]
            checked["model"] += 1
        assert r["rejected_source"] in ("a1", "a2")
        again = serve.get_deployment_handle(f"model-{r['rejected_source']}", APP).generate.remote(
            {"prompt": as_chat(r["prompt"]), "n": 1, "seed": row_seed(7, 1, r["id"], "neg0"), **sampling}).result()
        assert again["texts"][0] == r["rejected"]
        checked["neg"] += 1
        if humans.get(r["id"]) is None:
            assert r["alpha_renormalized"] and r["chosen_source"] != HUMAN, r
    assert checked["neg"] > 0


def test_thresholds_route_the_policys_judged_samples(first_run, app, model_dirs, prompts_file, tmp_path):
    # default tau_pos 8 / tau_neg 4: the judge's 5.0 qualifies for neither side -> matrix pairs only
    _, rows = first_run
    assert {r["kind"] for r in rows} == {"matrix"}
    self_rows = [r for r in rows if r["self_scores"]]
    assert self_rows and all(r["self_scores"] == [5.0, 5.0] for r in self_rows)
    for tau_pos, tau_neg, kind, side in ((5.0, 4.0, "self_chosen", "chosen"), (6.0, 5.0, "self_rejected", "rejected")):
        cfg = make_cfg(model_dirs, prompts_file, tmp_path, tau_pos=tau_pos, tau_neg=tau_neg, self_pair_fraction=1.0)
        res = form_pairs_step(cfg, 1, tmp_path / kind, app_name=APP, batch_size=16, concurrency=1)
        got = pq.read_table(tmp_path / kind / "pairs.parquet").to_pylist()
        assert res["summary"]["pair_kinds"] == {kind: N_PROMPTS - 2}
        assert all(r[f"{side}_source"] == "policy" and r[f"{side}_score"] == 5.0 for r in got)


def test_same_seed_same_pairs_whatever_the_batching(first_run, app, tmp_path):
    _, rows = first_run
    form_pairs_step(app, 1, tmp_path, batch_size=3, concurrency=1)
    again = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert {r["id"]: r for r in again} == {r["id"]: r for r in rows}


def test_source_frequencies_follow_alpha_and_gamma(app):
    job = PairJob.from_config(app, stage=1)
    n = 4000
    pos, neg = Counter(), Counter()
    for i in range(n):
        plan = _plan_row(job, {"id": f"q{i}", "prompt": "x", "human": "y"})
        pos[plan["pos"][0][0]] += 1
        neg[plan["neg"][0][0]] += 1
    tol = 4 * (0.25 * 0.75 / n) ** 0.5  # four standard deviations
    assert pos[HUMAN] / n == pytest.approx(0.3, abs=tol) and pos["c"] / n == pytest.approx(0.7, abs=tol)
    assert neg["a1"] / n == pytest.approx(0.25, abs=tol) and neg["a2"] / n == pytest.approx(0.75, abs=tol)
    assert set(pos) == {HUMAN, "c"} and set(neg) == {"a1", "a2"}


def test_a_prompts_file_without_any_human_answer_renormalises_alpha(app, tmp_path):
    """Seen live: a file in which no row has a human answer sent a null answer to the judge (the
    column reached the Ray Data batch as null/NaN) and failed the stage."""
    path = tmp_path / "no-human.jsonl"
    path.write_text("".join(json.dumps({"id": f"n{i:02d}", "prompt": f"add {i} and 2"}) + "\n" for i in range(10)))
    cfg = app.model_copy(deep=True)
    cfg.pairs.prompts = str(path)
    res = form_pairs_step(cfg, 1, tmp_path / "out", batch_size=4, concurrency=2)
    rows = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert res["summary"]["pairs"] == len(rows) == 10 and res["summary"]["rejected_rows"] == 0
    assert all(r["alpha_renormalized"] and r["chosen_source"] == "c" for r in rows)
    assert res["summary"]["drawn_sources"]["positive"] == {"c": 10}


def test_truncated_answers_are_dropped_redrawn_and_counted(model_dirs, prompts_file, tmp_path):
    """Random tiny models never stop within 6 tokens: with `truncated: drop` no cut answer reaches a pair.
    A cut matrix negative is redrawn (keyed) max_redraws times, then the prompt gives no pair and says
    why; with `keep` the same answers make pairs, marked as cut."""
    from tso.serving.client import InProcessClient

    cfg = make_cfg(model_dirs, prompts_file, tmp_path, truncated="drop", max_redraws=2)
    res = form_pairs_step(cfg, 1, tmp_path / "out", client=InProcessClient(cfg), batch_size=8, progress=False)
    s, n = res["summary"], res["summary"]["prompts"]
    assert n == N_PROMPTS - 2 and s["pairs"] == 0 and sum(s["no_pair"].values()) == n
    assert s["truncated"]["a1"] + s["truncated"]["a2"] == 3 * n  # the first draw and two redraws, all cut
    assert s["redrawn_sources"].get("a1", 0) + s["redrawn_sources"].get("a2", 0) == 2 * n
    assert s["truncated"]["policy"] > 0 and s["truncated"]["policy"] % 2 == 0  # n_self = 2 per self row
    assert s["truncated_action"] == "drop"

    kept = make_cfg(model_dirs, prompts_file, tmp_path, truncated="keep")
    res = form_pairs_step(kept, 1, tmp_path / "kept", client=InProcessClient(kept), batch_size=8, progress=False)
    rows = pq.read_table(tmp_path / "kept" / "pairs.parquet").to_pylist()
    assert res["summary"]["pairs"] == len(rows) == N_PROMPTS - 2 and not res["summary"]["redrawn_sources"]
    assert all(r["rejected_finish_reason"] == "length" and r["rejected_stop_token"] is None for r in rows)
    assert all(r["chosen_finish_reason"] == "stop" for r in rows if r["chosen_source"] == HUMAN)
    assert "length" in {r["chosen_finish_reason"] for r in rows if r["chosen_source"] != HUMAN}


def test_a_request_that_fails_inside_a_model_fails_its_row_only(model_dirs, prompts_file, tmp_path):
    """Rows are checked before any model call, but a model can still refuse a request: here rows that
    skipped the checks, with a prompt longer than every model's context. Such a request costs its
    source for that row (the side is redrawn from the others); a row left without a pair is a reject
    naming the source, and the other rows of the batch are answered."""
    from tso.pairs.pipeline import form_batch
    from tso.serving.client import InProcessClient

    cfg = make_cfg(model_dirs, prompts_file, tmp_path, truncated="keep", human_weight=0.0, self_pair_fraction=0.0)
    job = PairJob.from_config(cfg, stage=1)
    rows = [{"id": "ok", "prompt": "add 1 and 2", "human": None, "line": 1},
            {"id": "huge", "prompt": "x" * 1500, "human": None, "line": 2}]
    ok, huge = form_batch(job, rows, InProcessClient(cfg))
    assert ok["reject"] is None and len(ok["pairs"]) == 1 and ok["failed"] == []
    assert huge["pairs"] == [] and huge["reject"]["reason"] == "generation_failed" and huge["reject"]["line"] == 2
    assert huge["reject"]["source"] in ("c", "a1", "a2") and "1024" in huge["reject"]["detail"]
    failed = {f["source"] for f in huge["failed"]}
    assert failed <= {"c", "a1", "a2"} and "c" in failed  # the only positive source failed: no redraw left
    assert all(f["code"] == "prompt_too_long" for f in huge["failed"])


def test_rso_mode_samples_judges_and_rejection_samples_the_policys_answers(app, model_dirs, prompts_file, tmp_path):
    """pairs.mode rso: the policy alone answers, rso.samples times per prompt, every answer judged; the
    sampler keeps rso.accepted per prompt. This judge scores every answer 5.0, so every accepted couple
    ties: RSO has no preference to learn and forms no pair (counted), never a made-up one."""
    cfg = make_cfg(model_dirs, prompts_file, tmp_path, mode="rso", rso={"samples": 6, "accepted": 4})
    res = form_pairs_step(cfg, 1, tmp_path / "rso", app_name=APP, batch_size=8, concurrency=1)
    s = res["summary"]
    valid = N_PROMPTS - 2
    assert s["pairs"] == 0 and s["pair_kinds"] == {} and s["no_pair"] == {"no_self_pair": valid}
    assert s["rso"] == {"accepted": 4 * valid, "ties": 2 * valid}
    assert sum(s["score_histograms"]["self"].values()) == 6 * valid  # 6 policy samples per prompt, judged
    assert sum(s["score_histograms"]["pos"].values()) == sum(s["score_histograms"]["neg"].values()) == 0
    assert s["drawn_sources"] == {"positive": {}, "negative": {}}  # no matrix answer was asked for
