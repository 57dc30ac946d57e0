"""``alignloop loop``: stored feedback → a better deployed model, N times, unattended.

One iteration, in order, each step recorded in ``iter-N/state.json`` when it is done:

1. **collect** (only with simulated users): the population chats with the deployed model
   through the HTTP API and gives feedback, as people would.
2. **export**: the live votes in the iteration's window → training sets by the rules of
   :mod:`alignloop.feedback.datasets`, written as JSONL (each record with its ``feedback_ids``).
3. **train**: the recipe's stages in order, each an ordinary stage run (``iter-N/train-STAGE/``)
   starting from the previous stage's policy, the first from the deployed model (also the
   reference: the KL the gate reads is to what users have now).
4. **evaluate**: ``alignloop evaluate`` of the candidate against the deployed model on held-out
   prompts; the gate's verdict.
5. **register**: the candidate's version in the model registry with its parent, run folder,
   datasets, the exact feedback rows behind them, and its evaluation (promoted or not).
6. **promote**: only when the gate passed, ``POST /admin/deploy``: the server answers with the new
   version from the next request on, running streams finish on the old one.

Crash safety: a step's outputs are written before its marker, and a rerun skips the steps whose
markers exist, so an interrupted loop continues with the step it was in. Stage runs resume from
their own checkpoints; the registry writes are idempotent; the export of an unfinished
iteration is redone over the same window, so no dataset or registry row is written twice.

The folder::

    runs/<name>/
      config.yaml, loop.json        the config; v0 and the simulated population
      prompts/                      users' and held-out prompts (simulation)
      iter-N/state.json             steps done, with their results and seconds
      iter-N/datasets/              pairs/kto/sft/ratings.jsonl, feedback.jsonl, summary.json
      iter-N/train-STAGE/           each recipe stage's run folder
      iter-N/evaluate/              candidate vs deployed: report.md, metrics.json
      final-vs-v0/                  the last deployed version against v0
      report.md, loop.png
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignloop.config import STAGES, EvaluateConfig, LoopConfig, save_config
from alignloop.data.convert import write_jsonl
from alignloop.errors import ConfigError
from alignloop.loop.state import STEPS, read_json, read_jsonl, write_json

log = logging.getLogger("alignloop")

# What the gate asks when the config names no gate: language models must win on held-out prompts
# without drifting far; a classifier's F1 must rise by more than the paired bootstrap's noise.
LANGUAGE_MODEL_GATE = "win_rate_lower>0.5,kl_per_token<0.5"
CLASSIFIER_GATE = {"classification": "macro_f1_delta_lower>0", "ner": "micro_f1_delta_lower>0"}
# What a classifier iteration keeps of `evaluate --task` metrics (the F1s and their paired intervals).
CLASSIFIER_KEEP = ("examples", "candidate_accuracy", "baseline_accuracy", "candidate_macro_f1", "baseline_macro_f1",
                   "macro_f1_delta", "macro_f1_delta_lower", "macro_f1_delta_upper", "candidate_micro_f1",
                   "baseline_micro_f1", "micro_f1_delta", "micro_f1_delta_lower", "micro_f1_delta_upper")


def run_loop(cfg: LoopConfig) -> Path:
    """Run ``cfg.iterations`` iterations (continuing an interrupted loop); return the report's path."""
    from alignloop.feedback.database import resolve_db_url
    from alignloop.feedback.store import FeedbackStore
    from alignloop.loop.report import write_loop_report
    from alignloop.loop.server import connect

    folder = Path(cfg.run.output_dir) / cfg.run.name
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    url = resolve_db_url(cfg.db)
    with connect(cfg, url) as server, FeedbackStore(url) as store:
        loop = Loop(cfg, folder, server, store)
        loop.start()
        started, ran = time.perf_counter(), 0
        for i in range(1, cfg.iterations + 1):
            if loop.done(i):
                log.info("loop: iteration %d/%d was done before", i, cfg.iterations)
                started = time.perf_counter()  # the ETA counts this run's iterations only
                continue
            loop.iteration(i)
            ran += 1
            per_iteration = (time.perf_counter() - started) / ran
            left = cfg.iterations - i
            log.info("loop: iteration %d/%d done in %s; %s", i, cfg.iterations, _clock(per_iteration),
                     f"ETA {_clock(per_iteration * left)}" if left else "all iterations done")
        loop.final_comparison()
    report = write_loop_report(folder, store)
    log.info("loop: report in %s", report)
    return report


class Loop:
    """One loop's folder, server and store; each method is one step of an iteration."""

    def __init__(self, cfg: LoopConfig, folder: Path, server: Any, store: Any) -> None:
        self.cfg, self.folder, self.server, self.store = cfg, folder, server, store
        self.meta_path = folder / "loop.json"
        self.meta: dict = read_json(self.meta_path) or {}

    # --- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        """Record v0 (the version deployed when the loop first ran) and, with a simulation, the
        prompts and the population, once: a rerun reuses them."""
        cfg = self.cfg
        if "v0" not in self.meta:
            version = self.server.served_version(cfg.model_name)
            self.store.deploy(version)
            self.meta["v0"] = {"version": version, "path": self._path_of(version)}
            write_json(self.meta_path, self.meta)
        if cfg.trains_classifier and "task" not in self.meta:
            from alignloop.models.classifier import classifier_task

            self.meta["task"] = classifier_task(self.meta["v0"]["path"])
            write_json(self.meta_path, self.meta)
        if cfg.trains_classifier and cfg.labellers.pool != "none" and "users" not in self.meta:
            from alignloop.envs.labellers import make_labellers

            self.meta.update(self._split_pool())
            labellers = make_labellers(cfg.labellers, self.store.add_user, prefix="sim-labeller")
            # The keys are kept so an interrupted simulation goes on with the same labellers.
            self.meta["users"] = [{"name": u.name, "key": u.key, "liar": u.liar} for u in labellers]
            write_json(self.meta_path, self.meta)
        s = cfg.simulation
        if not cfg.trains_classifier and s.preference != "none" and "users" not in self.meta:
            self.meta.update(self._split_prompts())
            from alignloop.envs.preferences import preference_named
            from alignloop.envs.users import make_population

            users = make_population(preference_named(s.preference), s.users, self.store.add_user, s.troll_share,
                                    s.troll_kind, s.noise, s.seed, prefix=f"sim-{s.preference}")
            # The keys are kept so an interrupted simulation goes on with the same users.
            self.meta["users"] = [{"name": u.name, "key": u.key, "troll": u.troll, "taste": u.preference.name} for u in users]
            write_json(self.meta_path, self.meta)
        log.info("loop: %s starts from version %s (%s)", cfg.model_name, self.meta["v0"]["version"], self.meta["v0"]["path"])

    def _split_prompts(self) -> dict:
        """The simulation's prompts, every ``heldout_every``-th kept for the gate only."""
        from alignloop.data.load import load_records
        from alignloop.rollout.rewards import prompt_text

        s = self.cfg.simulation
        rows, _ = load_records(s.prompts, ("prompt",))
        # Each text once (ignoring case): a held-out "hi" must not be asked by users too.
        by_key = {}
        for r in rows:
            text = prompt_text(r.fields["prompt"]).strip()
            by_key.setdefault(text.lower(), text)
        texts = [t for t in by_key.values() if t and len(t) <= s.max_prompt_chars]
        rows = [{"prompt": [{"role": "user", "content": t}]} for t in texts]
        out = self.folder / "prompts"
        out.mkdir(exist_ok=True)
        held = [r for i, r in enumerate(rows) if i % s.heldout_every == 0]
        asked = [r for i, r in enumerate(rows) if i % s.heldout_every != 0]
        if not asked or not held:
            raise ConfigError(f"simulation.prompts: {s.prompts} has {len(rows)} prompts; need enough for users and held-out ones")
        write_jsonl(asked, out / "users.jsonl")
        write_jsonl(held, out / "heldout.jsonl")
        return {"user_prompts": str(out / "users.jsonl"), "heldout_prompts": str(out / "heldout.jsonl")}

    def _split_pool(self) -> dict:
        """The labellers' pool; without ``evaluate.data``, every ``simulation.heldout_every``-th item
        is kept (with its truth) as the gate's held-out labelled set and never shown to labellers."""
        from alignloop.envs.labellers import load_pool

        pool = load_pool(self.cfg.labellers)
        every = self.cfg.simulation.heldout_every
        records = [{"tokens": list(p.input), "tags": list(p.truth)} if p.tagged else {"text": p.input, "label": p.truth}
                   for p in pool]
        held = [] if self.cfg.evaluate.data else [r for i, r in enumerate(records) if i % every == 0]
        traffic = records if self.cfg.evaluate.data else [r for i, r in enumerate(records) if i % every != 0]
        if not traffic or not (held or self.cfg.evaluate.data):
            raise ConfigError(f"labellers.pool: {self.cfg.labellers.pool} has {len(records)} items; "
                              f"need enough for traffic and a held-out share (every {every}-th)")
        out = self.folder / "prompts"
        out.mkdir(exist_ok=True)
        write_jsonl(traffic, out / "pool.jsonl")
        if not held:
            return {"pool": str(out / "pool.jsonl")}
        write_jsonl(held, out / "heldout.jsonl")
        return {"pool": str(out / "pool.jsonl"), "heldout_data": str(out / "heldout.jsonl")}

    def _path_of(self, version: str) -> str:
        for row in self.store.models():
            if row["version"] == version:
                return row["path"]
        raise ConfigError(f"version {version} is served but not in the registry; is the loop on the server's database?")

    # --- one iteration ------------------------------------------------------------------------
    def done(self, i: int) -> bool:
        state = read_json(self.folder / f"iter-{i}" / "state.json")
        return bool(state) and all(step in state["steps"] for step in STEPS)

    def iteration(self, i: int) -> dict:
        folder = self.folder / f"iter-{i}"
        folder.mkdir(exist_ok=True)
        state_path = folder / "state.json"
        state = read_json(state_path) or {"steps": {}}
        if "start" not in state:  # what is deployed when the iteration starts: the parent and baseline
            version = self.server.served_version(self.cfg.model_name)
            state["start"] = {"version": version, "path": self._path_of(version)}
            write_json(state_path, state)
        steps: dict[str, Callable[[int, Path, dict], dict]] = {
            "collect": self.collect, "export": self.export, "train": self.train,
            "evaluate": self.evaluate, "register": self.register, "promote": self.promote}
        for name in STEPS:
            if name in state["steps"]:
                continue
            log.info("loop: iteration %d/%d: %s", i, self.cfg.iterations, name)
            started = time.perf_counter()
            result = steps[name](i, folder, state)
            state["steps"][name] = {**result, "seconds": round(time.perf_counter() - started, 2)}
            write_json(state_path, state)  # the marker: this step is done
        return state

    def collect(self, i: int, folder: Path, state: dict) -> dict:
        """Simulated users chat with the deployed model and give feedback (HTTP, their own keys)."""
        if self.cfg.trains_classifier:
            return self.collect_verdicts(i)
        s = self.cfg.simulation
        if s.preference == "none":
            return {"skipped": "no simulation: the feedback comes from real users"}
        from alignloop.data.load import load_records
        from alignloop.envs.preferences import preference_named
        from alignloop.envs.users import SimulatedUser, run_session
        from alignloop.rollout.rewards import prompt_text

        prompts = [prompt_text(r.fields["prompt"]) for r in load_records(self.meta["user_prompts"], ("prompt",))[0]]
        tastes = _tastes(preference_named(s.preference))
        users = [SimulatedUser(u["name"], u["key"], tastes[u["taste"]], s.noise, u["troll"]) for u in self.meta["users"]]
        with self.server.client() as client:
            stats = run_session(client, users, prompts, self.cfg.model_name, s.turns_per_user, seed=s.seed * 1000 + i,
                                max_tokens=s.max_tokens, temperature=s.temperature)
        log.info("loop: %d simulated users asked for %d completions and gave %s", len(users), stats.completions,
                 dict(stats.feedback))
        return stats.as_dict()

    def collect_verdicts(self, i: int) -> dict:
        """Simulated labellers send this iteration's share of the pool through ``/v1/classify`` and
        mark each prediction correct or wrong (HTTP, their own keys)."""
        lab = self.cfg.labellers
        if lab.pool == "none":
            return {"skipped": "no simulation: the verdicts come from real users"}
        from alignloop.envs.labellers import Labeller, pool_from_records, run_labelling

        pool = pool_from_records(self.meta["pool"])
        share = lab.per_iteration or max(1, len(pool) // self.cfg.iterations)
        start = (i - 1) * share % len(pool)  # past the end the traffic comes round again, as a stream would
        items = (pool + pool)[start:start + min(share, len(pool))]
        labellers = [Labeller(u["name"], u["key"], lab.noise, lab.name_label, u["liar"]) for u in self.meta["users"]]
        with self.server.client() as client:
            stats = run_labelling(client, labellers, items, self.cfg.model_name, lab.batch_size, seed=lab.seed * 1000 + i)
        summary = stats.as_dict()
        log.info("loop: %d simulated labellers judged %d predictions (they said correct to %.0f%%; %.0f%% were right)",
                 len(labellers), summary["predictions"], 100 * (summary["said_correct"] or 0), 100 * (summary["shown_accuracy"] or 0))
        return summary

    def export(self, i: int, folder: Path, state: dict) -> dict:
        """The votes of this iteration's window → training sets (JSONL) and the feedback rows used."""
        from alignloop.feedback.datasets import RECORD_KINDS, DatasetRules, build_datasets

        r = self.cfg.rules
        since = self._window_start(i)
        if "export_until" not in state:  # fixed once: an interrupted export is redone over the same window
            state["export_until"] = datetime.now(timezone.utc).isoformat()
            write_json(folder / "state.json", state)
        until = datetime.fromisoformat(state["export_until"])
        rules = DatasetRules(since=datetime.fromisoformat(since) if since else None, until=until,
                             model_versions=[state["start"]["version"]] if r.only_deployed else None,
                             max_votes_per_user=r.max_votes_per_user, min_agreement=r.min_agreement,
                             sibling_thumbs=r.sibling_thumbs, both_bad_as_kto=r.both_bad_as_kto, dedupe=r.dedupe)
        votes = self.store.votes()
        sets = build_datasets(votes, rules)
        out = folder / "datasets"
        out.mkdir(exist_ok=True)
        counts = {}
        for kind in RECORD_KINDS:
            records = getattr(sets, kind)
            write_jsonl(records, out / f"{kind}.jsonl")
            counts[kind] = len(records)
        prompts = _unique_prompts(sets)
        write_jsonl([{"prompt": p} for p in prompts], out / "prompts.jsonl")
        used = sets.feedback_ids
        write_jsonl([{"feedback_id": v.feedback_id, "user": v.user, "kind": v.kind} for v in votes if v.feedback_id in used],
                    out / "feedback.jsonl")
        summary = {"since": since, "until": until.isoformat(), "counts": counts, "prompts": len(prompts),
                   "feedback_rows": len(used), "skipped": dict(sets.skipped)}
        write_json(out / "summary.json", summary)
        log.info("loop: %d feedback rows → %s (skipped: %s)", len(used), counts, dict(sets.skipped) or "none")
        return summary

    def _window_start(self, i: int) -> str | None:
        """Where iteration ``i``'s export window opens (``rules.window``); None: at the first vote."""
        window = self.cfg.rules.window
        for j in range(i - 1, 0, -1) if window != "all" else ():
            steps = (read_json(self.folder / f"iter-{j}" / "state.json") or {}).get("steps", {})
            if window == "new" or steps.get("promote", {}).get("promoted"):
                return steps["export"]["until"]
        return None

    def train(self, i: int, folder: Path, state: dict) -> dict:
        """The recipe's stages in order; each resumes from its checkpoints when rerun. A stage that
        trains on prompts scores them with the reward model an earlier stage of the recipe made."""
        data = folder / "datasets"
        counts = state["steps"]["export"]["counts"]
        policy, reward, ran, skipped = state["start"]["path"], None, [], {}
        for name in self.cfg.recipe:
            stage = STAGES[name]
            on_prompts = stage.loop_data == "prompts"
            records = state["steps"]["export"]["prompts"] if on_prompts else counts[stage.loop_data]
            if records < self.cfg.rules.min_records:
                skipped[name] = f"{records} records < rules.min_records={self.cfg.rules.min_records}"
                log.info("loop: %s skipped this iteration: %s", name, skipped[name])
                continue
            if on_prompts and reward is None:
                skipped[name] = "no reward model this iteration"
                continue
            overrides = {"run.output_dir": str(folder), "run.name": f"train-{name}",
                         "data.path": str(data / f"{stage.loop_data}.jsonl")}
            if stage.makes == "policy":
                overrides["model.name_or_path"] = policy
            if on_prompts:
                overrides["rl.reward"] = reward
            overrides.update(stage.loop_options)
            overrides.update(self.cfg.options_for(name))
            run = stage.run(stage.load(overrides=overrides))
            ran.append(name)
            if stage.makes == "reward":
                reward = str(run.final_dir)
            else:
                policy = str(run.final_dir)
        candidate = policy if any(STAGES[name].makes == "policy" for name in ran) else None
        return {"candidate": candidate, "stages": ran, "skipped_stages": skipped}

    def evaluate(self, i: int, folder: Path, state: dict) -> dict:
        """The candidate against the deployed model; the gate's verdict and the metrics it read."""
        candidate = state["steps"]["train"]["candidate"]
        if candidate is None:
            return {"passed": False, "reasons": ["nothing was trained this iteration"]}
        return self.compare(candidate, state["start"]["path"], folder, "evaluate", self.gate())

    def gate(self) -> str:
        if self.cfg.evaluate.gate:
            return self.cfg.evaluate.gate
        return CLASSIFIER_GATE[self.meta["task"]] if self.cfg.trains_classifier else LANGUAGE_MODEL_GATE

    def compare(self, candidate: str, baseline: str, folder: Path, name: str, gate: str | None) -> dict:
        from alignloop.evaluate.gates import check_gate, parse_gate
        from alignloop.evaluate.run import run_evaluate

        if self.cfg.trains_classifier:
            return self.compare_classifiers(candidate, baseline, folder, name, gate)
        e, s = self.cfg.evaluate, self.cfg.simulation
        prompts = e.prompts or self.meta.get("heldout_prompts", "")
        reward = e.reward or (f"alignloop.envs.preferences:{s.preference}_utility" if s.preference != "none" else None)
        if not prompts:
            raise ConfigError("evaluate.prompts: name the held-out prompts the gate compares on")
        cfg = EvaluateConfig(candidate=candidate, baseline=baseline, prompts=prompts, max_prompts=e.max_prompts,
                             reward=reward, gate=gate, sampling=e.sampling, judge=e.judge)
        cfg.run.output_dir, cfg.run.name = str(folder), name
        run_evaluate(cfg)
        metrics = json.loads((folder / name / "metrics.json").read_text())
        passed, reasons = check_gate(parse_gate(gate), metrics) if gate else (True, [])
        keep = ("prompts", "win_rate", "win_rate_lower", "win_rate_upper", "wins", "ties", "losses", "kl_per_token",
                "kl_mean", "candidate_reward_mean", "baseline_reward_mean", "candidate_length_mean", "baseline_length_mean")
        return {"passed": passed, "reasons": reasons, "gate": gate, "reward": reward,
                "metrics": {k: metrics[k] for k in keep if k in metrics}}

    def compare_classifiers(self, candidate: str, baseline: str, folder: Path, name: str, gate: str | None) -> dict:
        """``alignloop evaluate --task classification|ner``: both classifiers on held-out labelled
        data, the F1 differences with paired bootstrap intervals, the gate's verdict."""
        from alignloop.evaluate.classifier import run_classifier_evaluate
        from alignloop.evaluate.gates import check_gate, parse_gate

        e = self.cfg.evaluate
        data = e.data or self.meta.get("heldout_data", "")
        if not data:
            raise ConfigError("evaluate.data: name the held-out labelled records the gate compares classifiers on")
        cfg = EvaluateConfig(task=self.meta["task"], candidate=candidate, baseline=baseline, data=data,
                             max_prompts=e.max_prompts, gate=gate, sampling=e.sampling)
        cfg.run.output_dir, cfg.run.name = str(folder), name
        run_classifier_evaluate(cfg)
        metrics = json.loads((folder / name / "metrics.json").read_text())
        passed, reasons = check_gate(parse_gate(gate), metrics) if gate else (True, [])
        return {"passed": passed, "reasons": reasons, "gate": gate, "data": data,
                "metrics": {k: metrics[k] for k in CLASSIFIER_KEEP if k in metrics}}

    def register(self, i: int, folder: Path, state: dict) -> dict:
        """The candidate in the registry with its lineage and evaluation (promoted or refused)."""
        candidate = state["steps"]["train"]["candidate"]
        if candidate is None:
            return {"version": None}
        version = weights_version(candidate)
        data = folder / "datasets"
        # The rows behind the datasets the recipe's stages actually trained on; a stage on prompts
        # learnt from feedback only through the reward stage before it, whose pairs are counted.
        files = {STAGES[name].loop_data for name in state["steps"]["train"]["stages"]} - {"prompts"}
        behind = {fid for name in files for record in read_jsonl(data / f"{name}.jsonl") for fid in record["feedback_ids"]}
        feedback = [(r["feedback_id"], r["user"], r["kind"]) for r in read_jsonl(data / "feedback.jsonl")
                    if r["feedback_id"] in behind]
        export = state["steps"]["export"]
        # Absolute, like the model's path: the registry is read by servers and commands started elsewhere.
        datasets = {"folder": str(data.resolve()), "counts": export["counts"], "window": [export["since"], export["until"]]}
        self.store.register_trained(self.cfg.model_name, version, candidate, state["start"]["version"],
                                    str(folder.resolve()), datasets, feedback)
        self.store.record_evaluation(version, {**state["steps"]["evaluate"], "iteration": i})
        return {"version": version, "feedback_rows": len(feedback)}

    def promote(self, i: int, folder: Path, state: dict) -> dict:
        """Redeploy when the gate passed; otherwise the deployed model stays."""
        verdict = state["steps"]["evaluate"]
        version = state["steps"]["register"]["version"]
        if not verdict["passed"]:
            log.info("loop: gate refused %s: %s; %s stays deployed", version, "; ".join(verdict["reasons"]),
                     state["start"]["version"])
            return {"promoted": False, "deployed": state["start"]["version"]}
        # Absolute: a server started from another folder resolves a relative path against its own.
        answer = self.server.deploy(self.cfg.model_name, str(Path(state["steps"]["train"]["candidate"]).resolve()))
        if answer["version"] != version:
            log.warning("loop: the server hashes the promoted weights as %s (registered as %s): it serves another dtype",
                        answer["version"], version)
        log.info("loop: promoted %s (was %s)", answer["version"], answer.get("previous_version"))
        return {"promoted": True, "deployed": answer["version"], "previous": answer.get("previous_version")}

    # --- after the iterations -----------------------------------------------------------------
    def final_comparison(self) -> dict | None:
        """The deployed version against v0 on the held-out prompts (no gate): the loop's net effect."""
        v0 = self.meta["v0"]
        version = self.server.served_version(self.cfg.model_name)
        marker = self.folder / "final-vs-v0.json"
        done = read_json(marker)
        if done and done.get("version") == version:
            return done
        if version == v0["version"]:
            result = {"version": version, "same_as_v0": True}
        else:
            log.info("loop: the deployed version %s against v0 %s", version, v0["version"])
            result = {"version": version, **self.compare(self._path_of(version), v0["path"], self.folder, "final-vs-v0", None)}
        write_json(marker, result)
        return result


def weights_version(path: str) -> str:
    """The version the server would give the folder at ``path`` (float32 weights): a classifier
    hashed as ``alignloop serve --classifier`` loads it, anything else as a causal LM."""
    from alignloop.models.load import model_family
    from alignloop.serve.engine import model_version

    if model_family(path, "candidate")[0] == "classifier":
        from alignloop.models.classifier import load_classifier

        model, _ = load_classifier(path, None, "candidate")
    else:
        from alignloop.evaluate.run import load_policy

        model, _ = load_policy(path, "candidate")
    return model_version(model)


def _tastes(preference: Any) -> dict[str, Any]:
    """Group name → preference: a mixture's groups, or the preference itself."""
    groups = getattr(preference, "groups", None)
    found = {p.name: p for _, p in groups} if groups else {}
    return {preference.name: preference, **found}


def _unique_prompts(sets: Any) -> list[Any]:
    seen, prompts = set(), []
    for records in (sets.pairs, sets.kto, sets.sft):
        for r in records:
            key = json.dumps(r["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(r["prompt"])
    return prompts


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

